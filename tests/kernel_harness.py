"""Check one layer's generated kernels against the NumPy reference, forward and backward.

    check_layer("input x: 3x9x9\\nc = conv(4, 3, stride=2)\\noutput c", "c", batch=2,
                dtype="float32", algo="gemm")

builds the network, draws random inputs, parameters and output gradient (never
zeros), runs the layer's kernels and the reference's `layer_forward` and
`layer_backward` in float64, and asserts that outputs, input gradients,
parameter gradients and (in training) the updated running statistics agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import convdsl
from convdsl.codegen.layer import KernelLayer, Mode, build_layer, layer_setups
from convdsl.runtime import reference
from convdsl.runtime.params import init_params

# Relative tolerances: forward and gradients, per dtype.
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-10, 1e-10)}


def random_array(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values pushed away from zero, so no test passes on zeros."""
    values = rng.standard_normal(shape)
    return values + np.sign(values) * 0.05


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str,
                 atol: float = 0.0) -> None:
    """Relative error measured against the largest expected magnitude; `atol` for values
    that are zero in exact arithmetic (a bias before batch norm has no gradient)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    error = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0
    assert error <= rtol * scale + atol, f"{what}: error {error:.3g} > {rtol:g} x {scale:.3g}"


def layer_params(network: convdsl.Network, name: str, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """The layer's arrays by field, with batch-norm scale, shift and statistics randomised."""
    arrays = init_params(network, seed=int(rng.integers(1 << 30)))
    fields = {}
    for full, array in arrays.items():
        layer, _, field = full.rpartition(".")
        if layer != name:
            continue
        if field in ("weight", "bias") and array.ndim == 1 and np.all(array == array.flat[0]):
            array = random_array(rng, array.shape)
        elif field == "running_mean":
            array = random_array(rng, array.shape) * 0.1
        elif field == "running_var":
            array = rng.uniform(0.5, 2.0, array.shape)
        fields[field] = array
    return fields


def to_device(array: np.ndarray, device: str) -> Any:
    """The array where the kernels of `device` read it (a copy on the GPU for cuda)."""
    if device == "cpu":
        return array
    from convdsl.codegen.cuda import arrays

    return arrays.to_device(array)


def to_host(array: Any) -> np.ndarray:
    return array.copy_to_host() if hasattr(array, "copy_to_host") else array


def check_layer(text: str, name: str, batch: int = 2, dtype: str = "float32",
                algo: str | None = None, train: bool = False, seed: int = 0,
                inputs: list[np.ndarray] | None = None, device: str = "cpu") -> KernelLayer:
    """Run layer `name` of the network `text` both ways and assert they agree; `device`
    picks the target whose kernels run (cuda: under the simulator in the tests)."""
    network = convdsl.loads(text)
    setup = layer_setups(network, batch, dtype, algo, device)[name]
    rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = [random_array(rng, shape) for shape in setup.batched_inputs]
    params64 = layer_params(network, name, rng)
    params = {field: (array.astype(dtype) if array.dtype.kind == "f" else array.copy())
              for field, array in params64.items()}
    kernel = build_layer(setup)
    mode = reference.RunContext(train=train, seed=seed, step=3)
    forward_tol, grad_tol = TOLERANCES[dtype]

    expected, saved = reference.layer_forward(
        setup.layer, [x.astype(np.float64) for x in inputs], params64, setup.window, mode)
    on_device = {field: to_device(array, device) for field, array in params.items()}
    actual = to_host(kernel.forward(
        [to_device(np.ascontiguousarray(x, dtype=dtype), device) for x in inputs],
        on_device, Mode(train=train, seed=seed, step=3)))
    params = {field: to_host(array) for field, array in on_device.items()}
    assert actual.dtype == np.dtype(dtype), f"output dtype {actual.dtype}"
    assert_close(actual, expected, forward_tol, f"{name} forward")
    for field in ("running_mean", "running_var"):
        if field in params:
            assert_close(params[field], params64[field], forward_tol, f"{name}.{field}")
    if "num_batches_tracked" in params:
        assert int(params["num_batches_tracked"]) == int(params64["num_batches_tracked"])

    grad_output = random_array(rng, expected.shape)
    expected_inputs, expected_params = reference.layer_backward(
        setup.layer, grad_output, saved, params64)
    grads = {field: to_device(np.full_like(params[field], np.nan), device)
             for field in expected_params}  # NaN: a gradient never written shows
    actual_inputs = kernel.backward(to_device(grad_output.astype(dtype), device), on_device,
                                    grads)
    for index, (got, want) in enumerate(zip(actual_inputs, expected_inputs, strict=True)):
        assert got is not None, f"{name}: no gradient for input {index}"
        assert_close(to_host(got), want, grad_tol, f"{name} grad of input {index}")
    for field, want in expected_params.items():
        assert_close(to_host(grads[field]), want, grad_tol, f"{name} grad of {field}")
    return kernel
