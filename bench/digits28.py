"""scikit-learn's 8x8 digits, blown up to the size LeNet-5 reads, as an .npz for `--data`.

    python bench/digits28.py /tmp/digits28.npz             # 1x28x28: networks/lenet5.cnn
    python bench/digits28.py /tmp/digits28.npz --size 32   # 1x32x32: each pixel 4x4
    convdsl train networks/lenet5.cnn --data /tmp/digits28.npz

Why: the GPU check trains LeNet-5 on a real data set with no network access, and the
machine has scikit-learn but not MNIST. The 1,797 digits are few but real handwriting.

How: the images, their [0, 1] scaling (pixel counts 0..16 divided by 16) and the fixed
20% test split are exactly those of convdsl's built-in `digits` source
(convdsl/runtime/data.py), so accuracies compare with `--data digits`. Each pixel
becomes a block of equal pixels (np.kron, nearest-neighbour upsampling):
- size 28 (the default, what networks/lenet5.cnn takes: input 1x28x28, padded to 32
  by its first convolution): 3x3 blocks, a 24x24 digit, framed by 2 zero pixels on each
  side, as MNIST frames a 20x20 digit in 28x28;
- size 32: 4x4 blocks, for a LeNet-5 that reads 1x32x32 as in the 1998 paper.
The arrays are float32 samples of shape (N, 1, S, S) and int64 labels: the .npz loader
uses values as stored, so nothing is rescaled a second time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convdsl.runtime.data import load_data

# size -> (block of each source pixel, zero frame on each side)
LAYOUTS = {28: (3, 2), 32: (4, 0)}


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) images as (N, 1, size, size) float32: pixel blocks, then a zero frame."""
    block, frame = LAYOUTS[size]
    big = np.kron(images, np.ones((1, block, block)))
    big = np.pad(big, ((0, 0), (frame, frame), (frame, frame)))
    assert big.shape[1:] == (size, size)
    return np.ascontiguousarray(big[:, None], dtype=np.float32)


def make(size: int = 28) -> dict[str, np.ndarray]:
    """The arrays of the .npz: x, y (training split), x_test, y_test (convdsl's split)."""
    data = load_data("digits")
    assert data.x_test is not None and data.y_test is not None
    return {"x": upsample(data.x, size), "y": data.y.astype(np.int64),
            "x_test": upsample(data.x_test, size), "y_test": data.y_test.astype(np.int64)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("path", type=Path, help="the .npz file to write")
    parser.add_argument("--size", type=int, choices=sorted(LAYOUTS), default=28,
                        help="image side: 28 for networks/lenet5.cnn (default), or 32")
    args = parser.parse_args(argv)
    arrays = make(args.size)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.path, **arrays)  # type: ignore[arg-type]
    print(f"wrote {args.path}: {len(arrays['x'])} training and {len(arrays['x_test'])} test "
          f"images of 1x{args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
