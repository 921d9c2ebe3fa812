"""What every CUDA kernel shares: the numba.cuda module, the decorator, launch sizes.

Generated CUDA kernels live in the same cache as the CPU ones (codegen/cache.py): a
spec renders to a `.py` file whose kernels carry `@cuda.jit(cache=True)`, so that
Numba keeps their machine code per compute capability next to the source. Under the
CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the same source runs on the CPU, slowly,
which is how the tests check every kernel on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from convdsl.codegen import cache
from convdsl.errors import RunError

# A device array (numba.cuda DeviceNDArray, or the simulator's stand-in): typed as Any,
# since numba.cuda ships no type information.
DeviceArray = Any

PRELUDE = "import math\n\nfrom numba import cuda\n"
JIT = "@cuda.jit(cache=True, fastmath=False)"
DEVICE_JIT = "@cuda.jit(device=True, inline=True)"
THREADS = 256  # threads per block of the one-thread-per-element kernels
WARP = 32
# At most this many threads sum one channel in a one-block-per-channel kernel (batch norm,
# a convolution's bias gradient). Such a kernel has as many blocks as channels (64 in
# ResNet-18-CIFAR's first layers, 6 in LeNet-5's), and a thread waits on each of its
# loads, so a channel's loads in flight grow with its threads. 512 threads fit any kernel
# of up to 128 registers (these use fewer than 50 on sm_90).
CHANNEL_THREADS = 512

_CUDA: Any = None


def cuda() -> Any:
    """numba.cuda, once a usable GPU (or the simulator) is known to be there.

    Never falls back to the CPU: without numba-cuda or without a GPU the error says
    so and how to fix it."""
    global _CUDA
    if _CUDA is not None:
        return _CUDA
    if not hasattr(np, "row_stack"):  # numba-cuda 0.30 still calls it; NumPy 2.5 removed it
        vars(np)["row_stack"] = np.vstack
    try:
        from numba import cuda as module
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RunError(f"--device cuda needs numba's CUDA target, which failed to load "
                       f"({exc})", 'install it with: pip install "convdsl[cuda]"') from None
    if not _has_numba_cuda() and not simulated():
        raise RunError("--device cuda needs NVIDIA's numba-cuda package",
                       'install it with: pip install "convdsl[cuda]"')
    try:
        available = bool(module.is_available())
    except Exception:  # a broken driver raises many kinds of error
        available = False
    if not available:
        raise RunError("--device cuda found no usable NVIDIA GPU (no CUDA driver, or no "
                       "device)", "run on a machine with an NVIDIA GPU and its driver, or "
                       "use --device cpu; NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels "
                       "in Numba's simulator, slowly, for testing")
    _CUDA = module
    return module


def simulated() -> bool:
    """Whether numba.cuda is Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def _has_numba_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba_cuda") is not None


def blocks(count: int, threads: int = THREADS) -> int:
    """Blocks of `threads` threads that cover `count` elements (at least one)."""
    return max(1, math.ceil(count / threads))


def grid_for(count: int) -> tuple[int, int]:
    """(blocks, threads) for one thread per element of `count`: whole warps, at most
    THREADS per block, so that a small array (a bias, a tiny layer) does not start
    hundreds of idle threads. On a GPU they would cost little; in the simulator each
    thread is a Python thread."""
    threads = min(THREADS, max(WARP, math.ceil(count / WARP) * WARP))
    return blocks(count, threads), threads


def zeros(shape: tuple[int, ...], dtype: Any) -> DeviceArray:
    """A device array of zeros (cuda.device_array leaves memory unset)."""
    return cuda().to_device(np.zeros(shape, dtype=dtype))


def empty(shape: tuple[int, ...], dtype: Any) -> DeviceArray:
    """A device array whose values the next kernel overwrites."""
    return cuda().device_array(shape, dtype=np.dtype(dtype))


def is_device_array(value: Any) -> bool:
    return hasattr(value, "copy_to_host")


# --- Launches -------------------------------------------------------------------------
#
# numba.cuda's launch path works hard on every call: it types each argument, resolves the
# overload, and packs each array into a dozen scalars (pointer, shape, strides...), tens
# of microseconds per launch. A training step of a small network is dozens of launches
# of small kernels, so that Python work, not the GPU, set its time. But a layer launches
# its kernels on the same buffers every step (they are made once), so a `Launch` packs
# its arguments the first time it sees a set of arrays and afterwards hands the packed
# arguments straight to the driver: one call into cuda.core per launch.

FLAT = "flat"  # a view: the array reshaped to one axis
View = tuple[int, ...] | str | None  # a shape, FLAT, or None (the array as it is)

# CONVDSL_CUDA_PACKED_LAUNCH=0 sends every launch through numba.cuda's own path.
PACKED = os.environ.get("CONVDSL_CUDA_PACKED_LAUNCH", "1") != "0"

# How many times arguments were packed, and how many launches could not be (`_pack`).
LAUNCH_COUNTS = {"packed": 0, "unpacked": 0}

# Sets of arguments a launch site keeps packed besides its last: a site called on two
# sets in turn (dropout's multiply, forward then backward) packs each once.
KEPT_SETS = 4

# Set while `convdsl time --kernels` measures (report/timing.py): every launch is handed
# to it, with its kernel's name, to run between two synchronisations.
LaunchTimer = Callable[[str, Callable[[], None]], None]
LAUNCH_TIMER: LaunchTimer | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLaunch:
    """One launch with its arguments packed for the driver: `launcher(target, config,
    function, *args)` is cuda.core's `launch`, whose target is a stream or a graph
    builder. `keep` holds the arrays whose addresses are packed, so that their memory
    lives as long as the launch may still run (queued, or in a graph)."""

    launcher: Callable[..., Any]
    stream: Any
    config: Any
    function: Any
    args: tuple[Any, ...]
    keep: tuple[Any, ...]

    def __call__(self) -> None:
        self.launcher(self.stream, self.config, self.function, *self.args)

    def into(self, builder: Any) -> None:
        """Record this launch in a CUDA graph being built by stream capture."""
        self.launcher(builder, self.config, self.function, *self.args)


class Recorder(Protocol):
    """What sees every launch while a pass is recorded (codegen/cuda/graphs.py)."""

    def launch(self, packed: PackedLaunch) -> None:
        """Launch `packed`, now or later in order, maybe as part of a graph."""

    def interrupt(self) -> None:
        """A launch that is not packed comes next, on numba.cuda's own path: whatever
        waits must go first."""


RECORDER: Recorder | None = None  # set while a pass is recorded (graphs.StepGraph)


class Launch:
    """One launch site of a kernel: grid and block fixed, arguments packed once per set.

    Calling it with arrays and scalars launches the kernel on them, each array first
    reshaped to its view. When a call passes the very same objects as an earlier one (the
    same arrays by identity, equal scalars of one type), the packed arguments of that
    call are reused: the last set and KEPT_SETS more. The arrays of a kept set stay
    referenced here, so their memory (whose addresses are packed) cannot be freed and
    reused under it."""

    def __init__(self, kernel: Any, grid: Any, threads: Any,
                 views: Sequence[View] | None = None, every: View = None) -> None:
        self._configured = kernel[grid, threads]
        self.kernel, self.grid, self.threads = kernel, grid, threads
        self.name = _kernel_name(kernel)
        self._views = None if views is None else tuple(views)
        self._every = every
        self._last: tuple[Any, ...] | None = None
        self._packed: PackedLaunch | None = None
        self._kept: OrderedDict[tuple[Any, ...], PackedLaunch] = OrderedDict()

    def __call__(self, *args: Any) -> None:
        if LAUNCH_TIMER is not None:
            LAUNCH_TIMER(self.name, lambda: self._launch(args))
        else:
            self._launch(args)

    def _launch(self, args: tuple[Any, ...]) -> None:
        if PACKED and self._packed is not None:
            if not _same(args, self._last):
                self._recall(args)
            _run(self._packed)
            return
        shaped = self._shaped(args)
        if RECORDER is not None:
            RECORDER.interrupt()
        self._configured(*shaped)  # numba.cuda's path: compiles or loads on first use
        packed = _pack(self._configured, shaped, args) if PACKED else None
        self._last, self._packed = args, packed

    def _recall(self, args: tuple[Any, ...]) -> None:
        """Make `args` the last set: packed before and kept, or packed now. Once a call
        has packed, the kernel is compiled, so new arguments (an optimizer's learning
        rate, another batch's buffer) only need packing."""
        assert self._packed is not None and self._last is not None
        self._kept[_key(self._last)] = self._packed
        key = _key(args)
        packed = self._kept.pop(key, None)
        if packed is None:
            packed = _pack(self._configured, self._shaped(args), args)
        while len(self._kept) > KEPT_SETS:
            self._kept.popitem(last=False)
        if packed is None:  # cannot be packed after all: numba.cuda's path this time
            if RECORDER is not None:
                RECORDER.interrupt()
            self._configured(*self._shaped(args))
        self._last, self._packed = args, packed

    def _shaped(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        views = self._views if self._views is not None else (self._every,) * len(args)
        if len(views) != len(args):
            raise TypeError(f"a launch with {len(views)} views got {len(args)} arguments")
        return tuple(_view(arg, view) for arg, view in zip(args, views))


def _run(packed: PackedLaunch | None) -> None:
    """Launch packed arguments: now, or through the recorder of the pass."""
    if packed is None:
        return
    if RECORDER is None:
        packed()
    else:
        RECORDER.launch(packed)


def _kernel_name(kernel: Any) -> str:
    """The kernel's function, after its template where it was generated: conv.weight_grad."""
    function = getattr(kernel, "py_func", kernel)
    template = cache.template_of(function.__module__)
    if template is None:
        return str(function.__name__)
    return f"{template.removeprefix('cuda_')}.{function.__name__}"


def _view(arg: Any, view: View) -> Any:
    if view is None or isinstance(arg, _SCALARS):
        return arg
    return arg.reshape(arg.size if view == FLAT else view)


_SCALARS = (bool, int, float, np.generic)


def _same(args: tuple[Any, ...], last: tuple[Any, ...] | None) -> bool:
    """The same arrays (by identity) and equal scalars of the same type."""
    if last is None or len(args) != len(last):
        return False
    for now, before in zip(args, last):
        if now is before:
            continue
        if type(now) is not type(before) or not isinstance(now, _SCALARS) or now != before:
            return False
    return True


def _key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What `_same` compares, as a dictionary key: arrays by identity (their ids stay
    unique while the set that holds them is kept), scalars by type and value."""
    return tuple((type(arg), arg) if isinstance(arg, _SCALARS) else id(arg) for arg in args)


def _pack(configured: Any, shaped: tuple[Any, ...], args: tuple[Any, ...]
          ) -> PackedLaunch | None:
    """The launch of `configured` on `shaped` (`args` in their views) as one prepared
    driver call, or None where that is not possible: the simulator, a kernel not
    compiled for exactly these types, a debug or cooperative kernel, or an argument
    numba.cuda would copy to the device."""
    if simulated():
        return None
    try:
        from numba.cuda import dispatcher as numba_dispatcher

        dispatcher = configured.dispatcher
        if dispatcher.specialized:
            kernel = next(iter(dispatcher.overloads.values()))
        else:
            types = tuple(dispatcher.typeof_pyval(arg) for arg in shaped)
            kernel = dispatcher.overloads.get(types)
        if kernel is None or kernel.debug or kernel.cooperative:
            raise LookupError("no plain overload for these argument types")
        writebacks: list[Any] = []
        packed: list[Any] = []
        for kind, value in zip(kernel.argument_types, shaped):
            kernel._prepare_args(kind, value, configured.stream, writebacks, packed)
        if writebacks:
            raise LookupError("an argument is copied to the device on each call")
        config = _launch_config(numba_dispatcher, configured)
        function = kernel._codelibrary.get_cufunc().kernel
    except Exception:  # any surprise in numba.cuda's internals: keep its own path
        LAUNCH_COUNTS["unpacked"] += 1
        return None
    LAUNCH_COUNTS["packed"] += 1
    return PackedLaunch(numba_dispatcher.launch, configured.stream, config, function,
                        tuple(packed), (*args, *shaped))


def _launch_config(numba_dispatcher: Any, configured: Any) -> Any:
    """cuda.core's LaunchConfig, as numba.cuda builds it (its keyword changed at 1.0)."""
    cooperative = ("is_cooperative" if numba_dispatcher.CUDA_CORE_GE_1_0
                   else "cooperative_launch")
    return numba_dispatcher.LaunchConfig(grid=configured.griddim, block=configured.blockdim,
                                         shmem_size=configured.sharedmem,
                                         **{cooperative: False})


_SITES: OrderedDict[tuple[Any, ...], Launch] = OrderedDict()
SITES_KEPT = 2048  # launch sites of whole-array kernels remembered, least recent dropped


def launch_on(kernel: Any, grid: Any, threads: Any, *args: Any, every: View = FLAT) -> None:
    """Launch a whole-array kernel (fill, add, an optimizer's update...) that is called on
    many different arrays: one `Launch` per set of arrays, so each set is packed once."""
    key = (kernel, grid, threads, *(type(arg) if isinstance(arg, _SCALARS) else id(arg)
                                    for arg in args))
    site = _SITES.get(key)
    if site is None:
        site = _SITES[key] = Launch(kernel, grid, threads, every=every)
        if len(_SITES) > SITES_KEPT:
            _SITES.popitem(last=False)
    else:
        _SITES.move_to_end(key)
    site(*args)
