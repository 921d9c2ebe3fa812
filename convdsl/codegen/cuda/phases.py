"""The input gradient of a strided convolution, split into phases: no tap multiplies a zero.

The input gradient reads dy at output position q = (i + p - tap*d) / s for every input
position i and window tap, and only where s divides the numerator; elsewhere the tap
falls between two strided outputs and contributes nothing. Done as one product, with
stride 2 in two dimensions, three of every four loads are such zeros.

Split the input positions by e = i + p modulo s instead (per axis, one *phase* per
residue rho): inside a phase, exactly the taps with tap*d = rho (mod s) land on outputs,
and they land on every position of the phase. So each phase is its own product, with its
own K (only its taps) and N (only its positions), and no test of divisibility:

    input positions   i = first + j*s,                 j = 0 .. count-1
    weight taps       w = w0 + wstep*t,                t = 0 .. taps-1
    dy position       q = j + shift0 + shift_step*t    (read where 0 <= q < Q)

The taps of one residue form an arithmetic progression (step s / gcd(s, d)), so a phase
is this handful of integers per axis, and a phase of several axes is the product of one
phase per axis. A phase with no taps on some axis has a zero gradient, still written.
At unit stride there is one phase, the whole input and every tap.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AxisPhase:
    """One residue class of input positions along one axis, and the taps that reach it."""

    first: int  # the first input position of the phase
    count: int  # input positions: first, first + stride, ...
    stride: int
    w0: int  # the first weight tap (index into the weight's axis)
    wstep: int
    taps: int  # weight taps w0, w0 + wstep, ...
    shift0: int  # dy position of input j and tap t: j + shift0 + shift_step * t
    shift_step: int


@dataclass(frozen=True)
class Phase:
    """A phase of every axis: its input positions and taps are the products of theirs."""

    axes: tuple[AxisPhase, ...]

    @property
    def positions(self) -> int:
        return math.prod(axis.count for axis in self.axes)

    @property
    def volume(self) -> int:
        """Weight taps of the phase (0: its gradient is zero)."""
        return math.prod(axis.taps for axis in self.axes)

    def every_tap(self, window: tuple[int, ...]) -> bool:
        """True when the phase's taps are the whole window in the weight's order."""
        return all(a.w0 == 0 and a.wstep == 1 and a.taps == k
                   for a, k in zip(self.axes, window))


def axis_phases(size: int, window: int, stride: int, dilation: int, pad: int,
                flip: bool) -> list[AxisPhase]:
    """The phases of one axis, one per residue of (i + pad) mod stride that holds an
    input position, in order of their first position."""
    # each weight tap's reach into the padded input (a true convolution flips the taps)
    reach = [(window - 1 - w if flip else w) * dilation for w in range(window)]
    found = []
    for residue in range(stride):
        first = (residue - pad) % stride
        count = len(range(first, size, stride))
        if count == 0:
            continue
        taps = [w for w in range(window) if (reach[w] - residue) % stride == 0]
        if not taps:  # no tap lands on an output from here: a zero gradient
            found.append(AxisPhase(first, count, stride, 0, 1, 0, 0, 0))
            continue
        wstep = taps[1] - taps[0] if len(taps) > 1 else 1
        assert taps == list(range(taps[0], taps[0] + wstep * len(taps), wstep))
        # dy position of input j, tap w: (first + j*stride + pad - reach[w]) / stride
        shifts = [(first + pad - reach[w]) // stride for w in taps]
        shift_step = shifts[1] - shifts[0] if len(taps) > 1 else 0
        found.append(AxisPhase(first, count, stride, taps[0], wstep, len(taps),
                               shifts[0], shift_step))
    return sorted(found, key=lambda phase: phase.first)


def phases(sizes: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...],
           dilation: tuple[int, ...], pads: tuple[tuple[int, int], ...], flip: bool
           ) -> list[Phase]:
    """Every phase of the input: the product of each axis's phases (one at unit stride)."""
    per_axis = [axis_phases(n, k, s, d, p[0], flip)
                for n, k, s, d, p in zip(sizes, window, stride, dilation, pads)]
    return [Phase(tuple(combination)) for combination in itertools.product(*per_axis)]
