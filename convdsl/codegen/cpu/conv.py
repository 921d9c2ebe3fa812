"""Convolution and fixed-filter layers on the CPU, in three interchangeable algorithms.

    direct  generated loop nests (conv_direct.py): no extra memory, best for few
            channels or outputs per group (depthwise layers, filters, LeNet's first layer)
    gemm    generated im2col / col2im kernels around NumPy's BLAS matrix products
            (conv_gemm.py): the workhorse for many channels; 1x1 layers skip im2col
    fft     zero-padded numpy.fft transforms, products summed over channels by BLAS
            (conv_fft.py): its cost does not grow with the window

All three render one module per kernel spec with the same driver (conv_common.py), so
this file only picks the algorithm, describes the layer as a spec, allocates buffers and
calls the driver. A filter layer is a depthwise convolution (groups = channels) with
its fixed kernel as weight and no weight or bias gradient.

Threads: the jitted kernels run on Numba's thread pool, the matrix products on
OpenBLAS's, the FFTs on a small pool of Python threads (conv_fft.in_threads). A pool
that spins after its work steals the cores from the next one: with Numba's OpenMP
layer, a GEMM layer's forward took 48 ms instead of 33 ms (ResNet 64->64 3x3, batch
32, 2 cores) unless OMP_WAIT_POLICY=passive; convdsl.codegen.cache now selects Numba's
workqueue pool, which sleeps.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import ActivationStep, act_options, is_elementwise
from convdsl.codegen.cpu import conv_direct, conv_fft, conv_gemm  # noqa: F401  (templates)
from convdsl.codegen.layer import ALGORITHMS, KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ConvAttrs, FilterAttrs, Op

# The "auto" rule's thresholds (see choose_algorithm), set from float32 timings of the
# three algorithms on 2 cores (LeNet, ResNet-CIFAR and 1-D layers, batch 16-64).
FFT_MIN_WINDOW = 64  # window positions from which FFT wins at stride 1
GEMM_MIN_REDUCTION = 16  # products per output from which im2col + BLAS can win...
GEMM_MIN_OUTPUTS = 8  # ...if at least this many outputs per group reuse each column

# The im2col buffer of one batch chunk stays under this many bytes; larger batches are
# processed in chunks (the matrix products stay large enough for BLAS).
GEMM_CHUNK_BYTES = 32 << 20


def choose_algorithm(setup: LayerSetup) -> tuple[str, str]:
    """The algorithm for a convolution or filter layer, and why.

    An explicit request (the file's `algo=` or the command line) wins. Otherwise, with
    V = prod(window), R = (in channels per group) * V the products summed per output,
    and M = out channels per group (1 for a filter):
      1. fft     if V >= 64 and every stride is 1: direct and GEMM cost grows with V,
                 FFT's does not, and a stride would discard most of what FFT computes;
      2. gemm    if R >= 16 and M >= 8: im2col copies R values per output position once
                 and M outputs reuse each in a BLAS product near the machine's peak;
      3. direct  otherwise (depthwise layers, filters, few outputs or a short
                 reduction): the copy would cost more than BLAS saves.
    One function on purpose: a measured cost model will replace it.
    """
    if setup.algo != "auto":
        if setup.algo not in ALGORITHMS:
            raise ValueError(f"unknown convolution algorithm {setup.algo!r}; choose auto or "
                             f"one of {', '.join(ALGORITHMS)}")
        return setup.algo, "requested"
    window = setup.window
    assert window is not None
    volume = math.prod(window.window)
    if setup.layer.op is Op.FILTER:
        per_group, outputs = 1, 1
    else:
        per_group, outputs = _per_group(setup)
    reduction = per_group * volume
    if volume >= FFT_MIN_WINDOW and all(s == 1 for s in window.stride):
        return "fft", f"window of {volume} positions (>= {FFT_MIN_WINDOW}) at stride 1"
    if reduction >= GEMM_MIN_REDUCTION and outputs >= GEMM_MIN_OUTPUTS:
        return "gemm", (f"{reduction} products per output (>= {GEMM_MIN_REDUCTION}), "
                        f"{outputs} outputs per group (>= {GEMM_MIN_OUTPUTS}): im2col + BLAS")
    return "direct", (f"{reduction} products per output, {outputs} outputs per group: "
                      f"too few for im2col + BLAS (needs >= {GEMM_MIN_REDUCTION} and "
                      f">= {GEMM_MIN_OUTPUTS})")


def _per_group(setup: LayerSetup) -> tuple[int, int]:
    """Input and output channels per group of a convolution."""
    attrs = setup.layer.attrs
    assert isinstance(attrs, ConvAttrs)
    return setup.in_shapes[0][0] // attrs.groups, attrs.out_channels // attrs.groups


def conv_spec(setup: LayerSetup, algorithm: str) -> KernelSpec:
    """The kernel spec of a conv or filter layer computed by `algorithm`."""
    attrs = setup.layer.attrs
    window = setup.window
    assert window is not None and isinstance(attrs, (ConvAttrs, FilterAttrs))
    channels = setup.in_shapes[0][0]
    if isinstance(attrs, ConvAttrs):
        groups, bias, weight_grad = attrs.groups, attrs.bias, True
        weight = (attrs.out_channels, channels // groups, *window.window)
    else:
        groups, bias, weight_grad = channels, False, False
        weight = (channels, 1, *window.window)
    act = setup.layer.act if is_elementwise(setup.layer.act) else None  # softmax: outside
    extra: dict[str, Any] = {}
    if algorithm == "gemm":
        per_sample = (channels * math.prod(window.window) * math.prod(setup.out_shape[1:])
                      * np.dtype(setup.dtype).itemsize)
        fits = max(1, min(setup.batch, GEMM_CHUNK_BYTES // per_sample))
        chunks = -(-setup.batch // fits)
        extra["chunk"] = -(-setup.batch // chunks)  # chunks of (nearly) equal size
    return KernelSpec.make(
        f"conv_{algorithm}", setup.dtype, (setup.batched_inputs[0], weight,
                                           setup.batched_output),
        groups=groups, stride=window.stride, dilation=window.dilation, pads=window.pads,
        flip=attrs.flip, bias=bias, weight_grad=weight_grad,
        **act_options(act), **extra)


class ConvLayer(KernelLayer):
    """A convolution (or filter) computed by one generated module."""

    def __init__(self, setup: LayerSetup, algorithm: str, reason: str,
                 fixed_weight: np.ndarray | None) -> None:
        super().__init__(setup)
        self.algorithm, self.reason = algorithm, reason
        spec = conv_spec(setup, algorithm)
        self.specs.append(spec)
        self._module: ModuleType = cache.load(spec)
        self._workspace: dict[str, Any] = self._module.workspace()
        self._fixed_weight = fixed_weight
        self._y = setup.output_buffer()
        self._dx = setup.input_buffer()
        self._x: np.ndarray | None = None  # the last forward's input
        act = setup.layer.act
        self._softmax = None
        if not is_elementwise(act):
            self._softmax = ActivationStep(act, setup.batched_output, setup.dtype)
            self.specs.append(self._softmax.spec)

    def _weight(self, params: dict[str, np.ndarray]) -> np.ndarray:
        return self._fixed_weight if self._fixed_weight is not None else params["weight"]

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        (x,) = inputs
        self._module.forward(x, self._weight(params), params.get("bias"), self._y,
                             self._workspace)
        if self._softmax is not None:
            self._softmax.forward(self._y, self._y)
        self._x = x
        return self._y

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self._x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        dy = grad_output
        if self._softmax is not None and not skip_act:
            self._softmax.backward(self._y, dy, dy)  # in place: dy becomes d/d(pre-act)
        self._module.backward(self._x, self._weight(params), self._y, dy, self._dx,
                              grads.get("weight") if self._fixed_weight is None else None,
                              grads.get("bias"), self._workspace, not skip_act)
        return [self._dx]


@builder(Op.CONV, Op.FILTER)
def build(setup: LayerSetup) -> KernelLayer:
    algorithm, reason = choose_algorithm(setup)
    fixed = None
    attrs = setup.layer.attrs
    if isinstance(attrs, FilterAttrs):
        assert setup.window is not None
        kernel = np.array(attrs.kernel, dtype=setup.dtype).reshape(setup.window.window)
        channels = setup.in_shapes[0][0]
        fixed = np.ascontiguousarray(np.broadcast_to(kernel, (channels, 1, *kernel.shape)))
    return ConvLayer(setup, algorithm, reason, fixed)
