"""A pass that repeats, launched as CUDA graphs.

Packed launches (common.Launch) took most of numba.cuda's Python out of a launch, but
each launch is still a call into the driver, and a training step of LeNet-5 is some
thirty of them for kernels that run a few microseconds each. A CUDA graph is a recorded
sequence of launches that the driver replays with one call. The launches of a training
step are the same from step to step (the same kernels on the same buffers: the batch is
copied into a buffer kept for it, dropout's masks too), so the executor runs each of
its repeating passes (a training step, an inference) inside `StepGraph.pass_()`:

- every launch of the pass reports to the recorder instead of reaching the driver;
- while a pass has launched exactly what the pass before it launched (the same packed
  launches, compared by identity, in the same order), the recorder holds its launches
  back and launches them as graphs of CHUNK launches each, built (by stream capture) the
  first time and replayed after; the rest at the end of the pass, as one more graph. A
  graph per chunk rather than one per pass lets the GPU start on a long pass (ResNet-18's
  step is some 200 launches) while the host still walks the rest of it;
- the first launch that differs (another learning rate, a new buffer, a kernel that is not
  packed) sends every held launch to the driver in order, and the rest of the pass runs
  launch by launch, as without graphs; so does a pass whose predecessor differed from
  its own predecessor: the recorder waits until a pass has repeated once before it holds
  launches back, so that a pass that changes every time (a learning rate warming up,
  an argument of SGD's update) never waits for its own end to start. Adam's step count
  and rate reach its update in device memory instead (Optimizer.send, before the step's
  first launch), so Adam's steps repeat.

The order of the GPU's work never changes, only when the host hands it over: everything
the pass needs from the host was copied before its first launch, and nothing is read
back before its end (tests/test_train_step.py checks both), so a held launch never
misses a copy. Under the CUDA simulator nothing is packed, so nothing is recorded; the
tests stand in a packing launcher and a graph builder that replay in Python
(tests/test_cuda_graphs.py). CONVDSL_CUDA_GRAPHS=0 switches graphs off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from convdsl.codegen.cuda import common
from convdsl.codegen.cuda.common import PackedLaunch

GRAPHS = os.environ.get("CONVDSL_CUDA_GRAPHS", "1") != "0"
CHUNK = 32  # launches per graph

# Graphs built and launched; passes that went out wholly as graphs, and passes that
# launched kernels one by one while recorded; why graphs were switched off (a failure to
# build or launch one), for bench/gpu.py's note.
GRAPH_COUNTS = {"built": 0, "launched": 0, "replayed": 0, "plain": 0}
FAILURE: list[str] = []


class StepGraph:
    """The recorder of one repeating pass of one network (see the module's text)."""

    def __init__(self) -> None:
        self._previous: list[PackedLaunch | None] | None = None  # the last pass's launches
        self._repeated = False  # whether the last pass launched what the one before did
        self._graphs: dict[int, Any] = {}  # by first launch: built from _previous's
        # graphs dropped during a pass may still run on the GPU: kept until the next pass,
        # which starts after the host has read this one's results (and so waited for it)
        self._retired: list[Any] = []
        self._current: list[PackedLaunch | None] = []
        self._sent = 0  # how many of _current have gone to the driver
        self._holding = False  # whether this pass still holds its launches back

    @contextlib.contextmanager
    def pass_(self) -> Iterator[None]:
        """Run one pass of launches inside the block, recorded (see the module's text)."""
        if not GRAPHS or FAILURE or common.RECORDER is not None or common.LAUNCH_TIMER:
            yield
            return
        self._current, self._sent, self._retired = [], 0, []
        self._holding = self._repeated
        common.RECORDER = self
        try:
            yield
        except BaseException:
            self._send_held()
            self._previous, self._repeated = None, False
            self._drop_graphs()
            raise
        finally:
            common.RECORDER = None
        self._finish()

    # --- what common.Launch calls ---

    def launch(self, packed: PackedLaunch) -> None:
        at = len(self._current)
        self._current.append(packed)
        if self._holding:
            previous = self._previous
            if previous is not None and at < len(previous) and previous[at] is packed:
                if len(self._current) - self._sent == CHUNK:
                    self._launch_graph()
                return
            self._holding = False
        self._send_held()

    def interrupt(self) -> None:
        self._holding = False
        self._send_held()
        self._current.append(None)  # a pass with an unpacked launch is never a graph
        self._sent += 1

    # --- the end of a pass ---

    def _finish(self) -> None:
        same = (self._previous is not None and len(self._current) == len(self._previous)
                and all(now is before for now, before in zip(self._current, self._previous)))
        if self._holding and same:
            self._launch_graph()
        if self._sent < len(self._current) or not self._holding or not same:
            GRAPH_COUNTS["plain"] += 1
            self._send_held()
        else:
            GRAPH_COUNTS["replayed"] += 1
        if not same:
            self._drop_graphs()
        self._repeated = same and None not in self._current
        self._previous = self._current

    def _drop_graphs(self) -> None:
        self._retired.extend(self._graphs.values())
        self._graphs = {}

    def _send_held(self) -> None:
        """Hand every held launch to the driver, in order."""
        while self._sent < len(self._current):
            packed = self._current[self._sent]
            self._sent += 1
            if packed is not None:
                packed()

    def _launch_graph(self) -> None:
        """The held launches as one graph, built the first time; on a failure, one by
        one, and graphs off from then on."""
        first, held = self._sent, self._current[self._sent:]
        launches = [packed for packed in held if packed is not None]
        if not launches:
            return
        try:
            graph = self._graphs.get(first)
            if graph is None:
                graph = self._graphs[first] = build(launches)
                GRAPH_COUNTS["built"] += 1
            graph.launch(launches[0].stream)
        except Exception as exc:  # a driver or cuda.core that cannot: launch by launch
            FAILURE.append(f"{type(exc).__name__}: {exc}")
            self._drop_graphs()
            self._holding = False
            self._send_held()
            return
        GRAPH_COUNTS["launched"] += 1
        self._sent = len(self._current)


def build(launches: list[PackedLaunch]) -> Any:
    """An executable CUDA graph of `launches`, in order, by stream capture: each launch
    goes into the builder's stream, which records instead of running (as numba.cuda's
    own launch into a graph builder does)."""
    builder = new_builder().begin_building()
    for packed in launches:
        packed.into(builder.stream)
    builder.end_building()
    return builder.complete()


def new_builder() -> Any:
    """A graph builder on the current device (cuda.core's)."""
    try:
        from cuda.core import Device
    except ImportError:  # cuda.core before 0.4
        from cuda.core.experimental import Device
    device = Device()
    device.set_current()
    return device.create_graph_builder()
