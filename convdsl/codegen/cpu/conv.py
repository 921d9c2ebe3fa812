"""Convolution and fixed-filter layers on the CPU, in three interchangeable algorithms.

    direct  generated loop nests (conv_direct.py): no extra memory, best for few
            channels or outputs per group (depthwise layers, filters, LeNet's first layer)
    gemm    generated im2col / col2im kernels around NumPy's BLAS matrix products
            (conv_gemm.py): the workhorse for many channels; 1x1 layers skip im2col
    fft     zero-padded numpy.fft transforms, products summed over channels by BLAS
            (conv_fft.py): its cost does not grow with the window
    winograd  F(2x2, 3x3) or F(4x4, 3x3) tiles, 16 or 36 BLAS products per pass
            (conv_winograd.py): 4 or 2.25 multiplications per output instead of 9, for
            3x3 layers at stride 1

All four render one module per kernel spec with the same driver (conv_common.py; a
Winograd layer's bias and activation are a second, small module), so
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
import time
import weakref
from types import ModuleType
from typing import Any

import numba
import numpy as np

from convdsl.codegen import cache, cost
from convdsl.codegen.activations import ActivationStep, act_options, is_elementwise
from convdsl.codegen.cpu import (  # noqa: F401  (templates)
    conv_direct,
    conv_fft,
    conv_gemm,
    conv_winograd,
)
from convdsl.codegen.cpu.conv_common import Geometry, spec_layout
from convdsl.codegen.layer import ALGORITHMS, KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ActSpec, ConvAttrs, FilterAttrs, Op

# The im2col buffer of one batch chunk stays under this many bytes; larger batches are
# processed in chunks. Smaller chunks keep the columns in cache between im2col's writes
# and the product's reads, larger ones make fewer, larger products. Measured on the
# 2-core development machine against 32 MiB, training step / inference: ResNet-20-CIFAR
# b32 -17% / -18%, voxel3d b8 -16% / -22%, LeNet-5 b256 -12% / -6%, ResNet-18-CIFAR b32
# -1% / -6%; 2 MiB and less lost again to the number of calls.
GEMM_CHUNK_BYTES = 8 << 20

# Algorithms that decline an output given as a concatenation's channel slice (contiguous
# within each example only, see codegen/buffers.py) and write memory of their own, which
# the concatenation then copies: Numba cannot vectorise the direct kernel's inner loops
# over such an array (inception's 5x5 branch at batch 32, 32 -> 96 channels on 28x28:
# 163 ms forward against 42 ms, where the copy costs about 2 ms). The other algorithms
# write the output once, in an epilogue, at the same speed either way.
STRIDED_OUTPUT_SLOW = ("direct",)

# The Winograd output tiles the cost model chooses from (conv_winograd.TILINGS): 2x2
# tiles (F2) or 4x4 (F4, fewer products, heavier transforms, thin products on small maps).
WINOGRAD_TILES = (2, 4)


def choose_algorithm(setup: LayerSetup) -> tuple[str, str]:
    """The algorithm for a convolution or filter layer, and why.

    An explicit request (the file's `algo=` or the command line) wins. `auto` takes the
    algorithm the cost model (convdsl/codegen/cost.py) expects to run forward and
    backward fastest on this machine; `tune` times the candidates the model does not
    rule out, once, and keeps the decision in the kernel cache.
    """
    if setup.algo not in cost.CHOICES:
        raise ValueError(f"unknown convolution algorithm {setup.algo!r}; choose one of "
                         f"{', '.join(cost.CHOICES)}")
    if setup.algo in ALGORITHMS and applies(setup, setup.algo):
        return setup.algo, "requested"
    rates = cost.rates()
    specs = {algorithm: conv_spec(setup, algorithm) for algorithm in ALGORITHMS
             if applies(setup, algorithm)}
    estimates = {algorithm: cost.estimate(spec, rates) * 1e3 for algorithm, spec in specs.items()}
    best = min(estimates, key=estimates.__getitem__)
    if setup.algo == "tune":
        return _tune(setup, estimates)
    reason = f"estimated {_listing(estimates)} ms forward + backward; {_shape(setup)}"
    if best == "winograd":
        tile = specs[best].option("tile")
        reason += f"; {tile}x{tile} output tiles"
    if setup.algo in ALGORITHMS:  # asked for one that cannot compute this layer
        why = conv_winograd.why_not(Geometry.from_spec(conv_spec(setup, "direct")))
        reason = f"{setup.algo} does not apply ({why}); {reason}"
    return best, reason


def applies(setup: LayerSetup, algorithm: str) -> bool:
    """Whether `algorithm` can compute the layer: direct, GEMM and FFT compute any
    convolution; Winograd only 2-D 3x3 ones at stride 1 (conv_winograd.applies)."""
    if algorithm != "winograd":
        return True
    return conv_winograd.applies(Geometry.from_spec(conv_spec(setup, "direct")))


# Candidates the model expects to take more than this many times the best estimate
# are not timed by `tune` (a direct 512-channel layer would take seconds).
TUNE_WITHIN = 4.0


def _tune(setup: LayerSetup, estimates: dict[str, float]) -> tuple[str, str]:
    """Time each plausible candidate's forward + backward once (after a warm-up run that
    compiles or loads its kernels), or reuse the decision cached for this layer."""
    best = min(estimates.values())
    candidates = [name for name in estimates if estimates[name] <= TUNE_WITHIN * best]
    if len(candidates) == 1:
        return candidates[0], (f"tune: only candidate within {TUNE_WITHIN:g}x of the best "
                               f"estimate ({_listing(estimates)} ms)")
    # the layer's geometry, batch and dtype, and the threads the timings ran on
    key = f"{conv_spec(setup, 'direct').key}-threads{numba.get_num_threads()}"
    chosen, ms, cached = cost.tuned(key, candidates, lambda name: _time(setup, name))
    how = "measured earlier" if cached else "measured"
    return chosen, f"tune: {how} {_listing(ms)} ms forward + backward"


def _time(setup: LayerSetup, algorithm: str) -> float:
    """Seconds of one forward and backward pass of the layer computed by `algorithm`, on
    random data (after one untimed pass)."""
    layer = ConvLayer(setup, algorithm, "tuning", _fixed_weight(setup))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(setup.batched_inputs[0]).astype(setup.dtype)
    params = {field: rng.standard_normal(shape).astype(setup.dtype)
              for field, shape in setup.param_shapes}
    grads = {field: np.zeros_like(value) for field, value in params.items()}
    dy = rng.standard_normal(setup.batched_output).astype(setup.dtype)
    seconds = math.inf
    for _ in range(2):  # the first run compiles or loads the kernels
        started = time.perf_counter()
        layer.forward([x], params, Mode(train=True))
        layer.backward(dy.copy(), params, grads)
        seconds = time.perf_counter() - started
    return seconds


def _listing(ms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3g}" for name, value in ms.items())


def _shape(setup: LayerSetup) -> str:
    """The layer's products per output and outputs per group, for the reason."""
    window = setup.window
    assert window is not None
    if setup.layer.op is Op.FILTER:
        per_group, outputs = 1, 1
    else:
        per_group, outputs = _per_group(setup)
    return (f"{per_group * math.prod(window.window)} products per output, "
            f"{outputs} outputs per group")


def _per_group(setup: LayerSetup) -> tuple[int, int]:
    """Input and output channels per group of a convolution."""
    attrs = setup.layer.attrs
    assert isinstance(attrs, ConvAttrs)
    return setup.in_shapes[0][0] // attrs.groups, attrs.out_channels // attrs.groups


def conv_spec(setup: LayerSetup, algorithm: str, tile: int | None = None) -> KernelSpec:
    """The kernel spec of a conv or filter layer computed by `algorithm`; Winograd's
    `tile` (2 or 4) defaults to the one the cost model expects to run faster."""
    weight, layout = spec_layout(setup)
    act = setup.layer.act if is_elementwise(setup.layer.act) else None  # softmax: outside
    extra: dict[str, Any] = {}
    if algorithm == "winograd":
        extra["tile"] = tile or _winograd_tile(setup)
    if algorithm in ("gemm", "winograd"):
        extra["chunk"] = _chunk(setup, weight, algorithm, layout["groups"], extra.get("tile"))
    return KernelSpec.make(
        f"conv_{algorithm}", setup.dtype, (setup.batched_inputs[0], weight,
                                           setup.batched_output),
        **layout, **act_options(act), **extra)


def _winograd_tile(setup: LayerSetup) -> int:
    """The tile of WINOGRAD_TILES with the lowest estimate for this layer."""
    if len(WINOGRAD_TILES) == 1:
        return WINOGRAD_TILES[0]
    rates = cost.rates()
    return min(WINOGRAD_TILES,
               key=lambda tile: cost.estimate(conv_spec(setup, "winograd", tile), rates))


def _chunk(setup: LayerSetup, weight: tuple[int, ...], algorithm: str, groups: int,
           tile: int | None) -> int:
    """Samples per chunk: as many as keep the largest scratch matrix (im2col's columns, or
    Winograd's transformed patches or products) under GEMM_CHUNK_BYTES."""
    item = np.dtype(setup.dtype).itemsize
    if algorithm == "gemm":
        per_sample = (weight[1] * groups * math.prod(weight[2:])
                      * math.prod(setup.out_shape[1:]) * item)
    else:
        assert tile is not None
        tiling = conv_winograd.TILINGS[tile]
        tiles = math.prod(conv_winograd.tile_counts(setup.out_shape[1:], tile))
        channels = max(weight[0], weight[1] * groups)
        per_sample = tiling.points * channels * tiles * item
    fits = max(1, min(setup.batch, GEMM_CHUNK_BYTES // per_sample))
    chunks = -(-setup.batch // fits)
    return -(-setup.batch // chunks)  # chunks of (nearly) equal size


def _own_shapes(spec: KernelSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of a GEMM or Winograd module's own_buffers(), which Scratch lends."""
    g = Geometry.from_spec(spec)
    if spec.template == "conv_winograd":
        return conv_winograd.own_shapes(g, conv_winograd.tiling(spec),
                                        -(-g.batch // int(spec.option("chunk"))))
    return conv_gemm.own_shapes(g)


class ConvLayer(KernelLayer):
    """A convolution (or filter) computed by one generated module."""

    def __init__(self, setup: LayerSetup, algorithm: str, reason: str,
                 fixed_weight: np.ndarray | None, tile: int | None = None) -> None:
        super().__init__(setup)
        self.algorithm, self.reason = algorithm, reason
        spec, epilogue = conv_spec(setup, algorithm, tile), None
        if algorithm == "winograd":
            # Winograd's bias and activation run in an epilogue module of their own
            # (conv_winograd.split_epilogue); the other algorithms' in their kernels.
            spec, epilogue = conv_winograd.split_epilogue(spec)
        self.specs.append(spec)
        self._module: ModuleType = cache.load(spec)
        self._epilogue: ModuleType | None = None
        self._epilogue_spec = epilogue
        self._residual = False  # whether forward takes a residual (take_residual)
        if epilogue is not None:
            self.specs.append(epilogue)
            self._epilogue = cache.load(epilogue)
        self._maps = (setup.batch, setup.out_shape[0], math.prod(setup.out_shape[1:]))
        # GEMM layers borrow the im2col buffers every such layer shares, and the
        # buffers only their backward reads (see Scratch); the others keep their own,
        # small, workspace, made at the first call.
        self._shares_scratch = hasattr(self._module, "SCRATCH")
        self._own_shapes = (_own_shapes(spec) if self._shares_scratch else {})
        self._own_workspace: dict[str, Any] | None = None
        # The input gradient is made at the first backward: a layer that only ever runs
        # forward (the folded twin of a convolution followed by batch norm) never has one.
        self._dx: np.ndarray | None = None
        self._fixed_weight = fixed_weight
        self._y = setup.output_buffer()
        if algorithm in STRIDED_OUTPUT_SLOW and not self._y.flags.c_contiguous:
            self._y = LayerSetup.output_buffer(setup)  # its own: the caller copies it
        self._x: np.ndarray | None = None  # the last forward's input
        act = setup.layer.act
        self._softmax = None
        if not is_elementwise(act):
            self._softmax = ActivationStep(act, setup.batched_output, setup.dtype)
            self.specs.append(self._softmax.spec)

    def _workspace(self) -> dict[str, Any]:
        if self._shares_scratch:
            return _scratch(self.setup.dtype).workspace_for(self, self._module,
                                                            self._own_shapes)
        if self._own_workspace is None:
            self._own_workspace = self._module.workspace()
        return self._own_workspace

    def _weight(self, params: dict[str, np.ndarray]) -> np.ndarray:
        return self._fixed_weight if self._fixed_weight is not None else params["weight"]

    def take_residual(self, act: ActSpec | None) -> bool:
        """Make forward take a second input, a residual added before the activation
        `act` (which replaces the layer's own) in the epilogue, where the layer has an
        epilogue module of its own (Winograd with a bias); False where it has not. For a
        forward-only layer: backward refuses (codegen/fused.py, ProductNormLayer)."""
        if self._epilogue_spec is None or self._softmax is not None or not is_elementwise(act):
            return False
        spec = conv_winograd.with_residual(self._epilogue_spec, act_options(act))
        self.specs[self.specs.index(self._epilogue_spec)] = spec
        self._epilogue_spec, self._epilogue = spec, cache.load(spec)
        self._residual = True
        return True

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        x, *residual = inputs  # a residual only after take_residual
        bias = params.get("bias")
        self._module.forward(x, self._weight(params), None if self._epilogue else bias,
                             self._y, self._workspace())
        if self._epilogue is not None:
            self._epilogue.finish(self._y.reshape(self._maps),
                                  *([bias] if bias is not None else []),
                                  *(r.reshape(self._maps) for r in residual))
        if self._softmax is not None:
            self._softmax.forward(self._y, self._y)
        self._x = x
        return self._y

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self._x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        if self._residual:
            raise RuntimeError(f"'{self.name}': a convolution that adds a residual in its "
                               "epilogue runs forward only")
        dy = grad_output
        if self._softmax is not None and not skip_act:
            self._softmax.backward(self._y, dy, dy)  # in place: dy becomes d/d(pre-act)
        if self._dx is None and self.input_grad_needed:
            self._dx = self.setup.input_buffer()
        dx = self._dx if self.input_grad_needed else None
        db = grads.get("bias")
        if self._epilogue is not None:  # dy *= act'(y), db = sum(dy), before the products
            y, dyv = self._y.reshape(self._maps), dy.reshape(self._maps)
            if db is not None:
                self._epilogue.prepare(y, dyv, db, not skip_act)
            else:
                self._epilogue.prepare(y, dyv, not skip_act)
            db = None
        self._module.backward(self._x, self._weight(params), self._y, dy, dx,
                              grads.get("weight") if self._fixed_weight is None else None,
                              db, self._workspace(), not skip_act)
        return [dx]


class Scratch:
    """The im2col buffers of every GEMM convolution of one dtype, shared.

    A layer needs its columns and product buffers only while its forward or backward
    runs, so one pair, as large as the largest layer's, serves them all (on ResNet-18 at
    batch 32, about 36 MB instead of about 400). So does a third buffer for what only
    one call reads and writes before it returns: the transposed weight and the weight
    gradient before it is transposed back (ResNet-18-CIFAR: 19 MB instead of 79), or
    Winograd's transformed weight and weight gradient. A fourth holds a weight with
    batch norm folded in, between the fold and the convolution that reads it (lend).
    The buffers' last user may keep what they hold: a layer whose forward filled them
    and whose backward comes next (the last GEMM layer) skips one im2col. Any other
    layer gets a new workspace, which says the columns are not its own. The last user is
    held weakly: the buffers never keep a discarded network alive."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.cols = np.zeros(0, dtype=dtype)
        self.outs = np.zeros(0, dtype=dtype)
        self.backward = np.zeros(0, dtype=dtype)
        self.folded = np.zeros(0, dtype=dtype)  # see lend
        self.owner: weakref.ref[object] | None = None
        self.workspace: dict[str, Any] = {}

    def workspace_for(self, layer: object, module: ModuleType,
                      own: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """The layer's workspace over the shared buffers; `own`: the shapes of its
        own_buffers(), which become consecutive views of the backward buffer."""
        if self.owner is not None and self.owner() is layer:
            return self.workspace
        cols, outs = module.SCRATCH
        if self.cols.size < cols:
            self.cols = np.zeros(cols, dtype=self.dtype)
        if self.outs.size < outs:
            self.outs = np.zeros(outs, dtype=self.dtype)
        sizes = [math.prod(shape) for shape in own.values()]
        if self.backward.size < sum(sizes):
            self.backward = np.zeros(sum(sizes), dtype=self.dtype)
        starts = np.cumsum([0, *sizes]).tolist()
        views = {name: self.backward[start:start + size].reshape(shape)
                 for (name, shape), start, size in zip(own.items(), starts, sizes)}
        self.workspace = module.workspace(self.cols, self.outs, views)
        self.owner = weakref.ref(layer)
        return self.workspace


    def lend(self, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the folded buffer for an array that is written and then read
        between two layers' calls, such as the weight of a convolution or dense layer
        with batch norm folded in (codegen/fused.py): no other layer's call runs between.
        Not the backward buffer: a Winograd layer's forward writes its transformed
        weight there while reading the folded one."""
        size = math.prod(shape)
        if self.folded.size < size:
            self.folded = np.zeros(size, dtype=self.dtype)
        return self.folded[:size].reshape(shape)


_SCRATCH: dict[str, Scratch] = {}


def _scratch(dtype: str) -> Scratch:
    if dtype not in _SCRATCH:
        _SCRATCH[dtype] = Scratch(dtype)
    return _SCRATCH[dtype]


def lend_scratch(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Scratch.lend from the scratch of `dtype`."""
    return _scratch(dtype).lend(shape)


def _fixed_weight(setup: LayerSetup) -> np.ndarray | None:
    """A filter layer's kernel as a depthwise weight; None for a convolution."""
    attrs = setup.layer.attrs
    if not isinstance(attrs, FilterAttrs):
        return None
    assert setup.window is not None
    kernel = np.array(attrs.kernel, dtype=setup.dtype).reshape(setup.window.window)
    channels = setup.in_shapes[0][0]
    return np.ascontiguousarray(np.broadcast_to(kernel, (channels, 1, *kernel.shape)))


@builder(Op.CONV, Op.FILTER)
def build(setup: LayerSetup) -> KernelLayer:
    algorithm, reason = choose_algorithm(setup)
    return ConvLayer(setup, algorithm, reason, _fixed_weight(setup))
