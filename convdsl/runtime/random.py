"""Seeded randomness shared by every back end, so that all of them drop the same units.

A dropout mask depends only on (seed, step, layer name): the reference and the
generated kernels draw identical masks, and a resumed run draws the masks the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import zlib

import numpy as np


def dropout_mask(seed: int, step: int, layer: str, shape: tuple[int, ...], p: float,
                 dtype: str = "float64") -> np.ndarray:
    """Inverted dropout: each value kept with probability 1-p and scaled by 1/(1-p)."""
    rng = np.random.default_rng([seed, step, zlib.crc32(layer.encode())])
    if p >= 1.0:
        return np.zeros(shape, dtype=dtype)
    keep = rng.random(shape) >= p
    return (keep / (1.0 - p)).astype(dtype)
