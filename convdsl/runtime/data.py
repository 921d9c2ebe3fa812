"""Training data: where examples come from, how they meet a network, and in what order.

    data = load_data("digits")                      # or "mnist1d", "mine.npz", "mnist/"
    data = fit_to_network(data, (1, 8, 8), classes=10, dtype="float32")
    x, y, x_val, y_val = split_validation(data.x, data.y, fraction=0.1, seed=0)
    for indices in epoch_batches(len(x), batch=32, seed=0, epoch=0):
        ...  # x[indices], y[indices]

Sources:

- `digits`: scikit-learn's 8x8 handwritten digits (1797 of them), values scaled
  from 0..16 to [0, 1]. The set has no test split of its own, so a fixed 20% (chosen
  by a permutation with seed DIGITS_TEST_SEED, whatever the training seed) is held
  out as the test split: every run and every seed tests on the same images.
- `mnist1d`: the MNIST-1D signals (4000 for training, 1000 for test, 40 values each,
  already centred to mean 0 and standard deviation 1 by the generator), generated
  locally by the mnist1d package and cached under `<cache dir>/data/`.
- an `.npz` file with arrays `x`, `y` and optionally `x_test`, `y_test`. Values are
  used as stored (integers become float64 but are not rescaled).
- IDX files, MNIST's format, gzipped or not: a directory holding
  train-images-idx3-ubyte / train-labels-idx1-ubyte (and t10k-* for the test split),
  or the path of one images file, whose labels file is found by name. uint8 pixel
  values are scaled by 1/255 to [0, 1].

Orders are pure functions of their seeds, so that a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import json
import math
import os
import random
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from convdsl.codegen.cache import cache_dir
from convdsl.errors import RunError, did_you_mean

BUILTIN = ("digits", "mnist1d")
FILE_KINDS = ("an .npz file (arrays x, y, and optionally x_test, y_test), "
              "a directory of IDX files (train-images-idx3-ubyte[.gz], "
              "train-labels-idx1-ubyte[.gz], optionally t10k-*), or an IDX images file")
INSTALL_HINT = 'pip install "convdsl[data]" (or pip install {package})'
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Dataset:
    """Examples and their class labels, with the source's own test split if it has one."""

    name: str  # "digits", "mnist1d", or the file name
    x: np.ndarray  # (N, ...) float32 or float64 samples, as the source shapes them
    y: np.ndarray  # (N,) int64 labels
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


# --------------------------------------------------------------------------- loading


def load_data(source: str | Path) -> Dataset:
    """The data set `source` names: a built-in name (a string), or a file or directory.

    A string that is a built-in name means the built-in set even if a file of that
    name exists; write `./digits` (or pass a Path) to mean the file."""
    if isinstance(source, str) and source in BUILTIN:
        return _load_digits() if source == "digits" else _load_mnist1d()
    path = Path(source)
    if path.is_dir():
        return _load_idx_directory(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path)
        if _looks_like_idx(path):
            return _load_idx_file(path)
        raise RunError(f"cannot read data file '{path}': not an .npz or IDX file",
                       f"data can be a built-in set ({', '.join(BUILTIN)}) or {FILE_KINDS}")
    close = did_you_mean(str(source), BUILTIN)
    raise RunError(f"no data source '{source}': not a built-in data set, file or directory",
                   (f"{close} " if close else "")
                   + f"data can be a built-in set ({', '.join(BUILTIN)}) or {FILE_KINDS}")


def _optional(module: str, dataset: str, package: str) -> ModuleType:
    """An optional package's module, imported only when its data set is asked for."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RunError(f"the '{dataset}' data set needs the {package} package, which could "
                       f"not be imported ({exc})", INSTALL_HINT.format(package=package)) from None


def _load_digits() -> Dataset:
    bunch = _optional("sklearn.datasets", "digits", "scikit-learn").load_digits()
    x = np.asarray(bunch.images, dtype=np.float64) / 16.0  # pixel counts 0..16 -> [0, 1]
    y = np.asarray(bunch.target, dtype=np.int64)
    # The same held-out images for every run: a fixed seed, not the training seed.
    order = np.random.default_rng(DIGITS_TEST_SEED).permutation(len(y))
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset("digits", x[train], y[train], x[test], y[test])


# ----- mnist1d: generated once, then read from the cache


def _load_mnist1d() -> Dataset:
    generator = _optional("mnist1d.data", "mnist1d", "mnist1d")
    # get_dataset would download a pickle; make_dataset generates the same arrays here.
    args = generator.get_dataset_args()
    path = _mnist1d_cache_path(vars(args))
    arrays = _read_cached(path)
    if arrays is None:
        arrays = _generate_mnist1d(generator, args)
        _write_npz_atomically(path, arrays)
    return Dataset("mnist1d", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"])


def _mnist1d_cache_path(args: Mapping[str, Any]) -> Path:
    """Named by the generator's settings, so that other settings never read these arrays."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mnist1d")
    except PackageNotFoundError:
        package = "unknown"
    recipe = {key: value for key, value in args.items() if key != "url"}
    text = json.dumps({"mnist1d": package, "args": recipe}, sort_keys=True, default=str)
    return cache_dir() / "data" / f"mnist1d-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"


def _generate_mnist1d(generator: ModuleType, args: Any) -> dict[str, np.ndarray]:
    # make_dataset reseeds Python's and NumPy's global generators; put them back so
    # that loading data does not change the caller's random numbers.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = generator.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x": np.asarray(generated["x"], dtype=np.float64),
        "y": np.asarray(generated["y"], dtype=np.int64),
        "x_test": np.asarray(generated["x_test"], dtype=np.float64),
        "y_test": np.asarray(generated["y_test"], dtype=np.int64),
    }


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then they are made again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_npz_atomically(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Temporary file, then rename: a concurrent reader sees the whole file or none.
    A cache that cannot be written only costs time, so failures are ignored."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        named: dict[str, Any] = dict(arrays)  # (savez's own keywords are typed apart)
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **named)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


# ----- .npz files


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            found = list(archive.files)
            missing = [key for key in ("x", "y") if key not in found]
            if missing:
                raise RunError(
                    f"data file '{path}' has no array {' or '.join(map(repr, missing))} "
                    f"(it holds: {', '.join(found) or 'nothing'})",
                    "save the samples as x and the labels as y: np.savez(path, x=x, y=y), "
                    "optionally with x_test=..., y_test=...")
            if ("x_test" in found) != ("y_test" in found):
                raise RunError(f"data file '{path}' has only one of x_test and y_test",
                               "give both arrays of the test split, or neither")
            arrays = {key: _npz_array(archive, key, path)
                      for key in ("x", "y", "x_test", "y_test") if key in found}
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise RunError(f"cannot read data file '{path}': {exc}",
                       "is it a complete .npz file written by numpy.savez?") from None
    where = f"data file '{path}'"
    x, y = _samples(arrays["x"], f"{where}, array x"), _labels(arrays["y"], f"{where}, array y")
    _same_length(x, y, where, "x", "y")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test = _samples(arrays["x_test"], f"{where}, array x_test")
        y_test = _labels(arrays["y_test"], f"{where}, array y_test")
        _same_length(x_test, y_test, where, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise RunError(f"{where}: test samples have shape {x_test.shape[1:]} but training "
                           f"samples {x.shape[1:]}", "both splits need samples of one shape")
    return Dataset(path.name, x, y, x_test, y_test)


def _npz_array(archive: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(archive[key])
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise RunError(f"array '{key}' in data file '{path}' cannot be loaded: {exc}",
                       "save plain numeric arrays, e.g. x.astype(np.float32) and "
                       "y.astype(np.int64), not Python objects") from None


# ----- IDX files (MNIST's format)

# The third byte of an IDX file's magic number: the type of its values (big-endian).
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def _looks_like_idx(path: Path) -> bool:
    """A gzip file, or a file starting with an IDX magic number (two zero bytes, a type)."""
    with path.open("rb") as stream:
        head = stream.read(4)
    return head[:2] == GZIP_MAGIC or (len(head) == 4 and head[:2] == b"\0\0"
                                      and head[2] in IDX_TYPES)


def _read_idx(path: Path) -> np.ndarray:
    """The array in one IDX file, gzipped or not, with native byte order."""
    data = path.read_bytes()
    if data[:2] == GZIP_MAGIC:  # by content, not name: a renamed file still reads
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise RunError(f"IDX file '{path}' is a damaged gzip file ({exc})",
                           "download or unpack it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise RunError(f"'{path}' is not an IDX file: it starts with {data[:4].hex(' ')}, "
                       "not 00 00 <type> <dimensions>",
                       "IDX files are MNIST's format, e.g. train-images-idx3-ubyte[.gz]")
    code, ndim = data[2], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise RunError(f"IDX file '{path}' has a damaged header ({ndim} dimensions, "
                       f"{len(data)} bytes in all)", "download or unpack it again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    value_type = np.dtype(IDX_TYPES[code])
    expected = math.prod(dims) * value_type.itemsize
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "longer than its header says"
        raise RunError(f"IDX file '{path}' is {state}: shape {dims} needs {expected} bytes of "
                       f"values, it holds {len(data) - header}", "download or unpack it again")
    values = np.frombuffer(data, dtype=value_type, offset=header).reshape(dims)
    return values.astype(value_type.newbyteorder("="))


def _idx_images(values: np.ndarray, where: str) -> np.ndarray:
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(255)  # pixels 0..255 -> [0, 1]
    return _samples(values, where)


def _idx_candidates(folder: Path, stem: str, kind: str) -> list[Path]:
    """MNIST's file names, with '-' or '.' before idxN and with or without .gz."""
    rank = "idx3" if kind == "images" else "idx1"
    names = [f"{stem}-{kind}-{rank}-ubyte", f"{stem}-{kind}.{rank}-ubyte"]
    return [folder / f"{name}{gz}" for name in names for gz in ("", ".gz")]


def _find(candidates: list[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = _idx_images(_read_idx(images), f"IDX file '{images}'")
    y = _labels(_read_idx(labels), f"IDX file '{labels}'")
    if len(x) != len(y):
        raise RunError(f"IDX files disagree: '{images}' holds {len(x)} images but "
                       f"'{labels}' holds {len(y)} labels",
                       "the images and labels files must come from the same set")
    return x, y


def _load_idx_directory(folder: Path) -> Dataset:
    train_images = _find(_idx_candidates(folder, "train", "images"))
    train_labels = _find(_idx_candidates(folder, "train", "labels"))
    if train_images is None or train_labels is None:
        missing = "train-images-idx3-ubyte" if train_images is None else "train-labels-idx1-ubyte"
        raise RunError(f"data directory '{folder}' has no {missing}[.gz]",
                       f"a data directory holds IDX files: {FILE_KINDS}")
    x, y = _idx_pair(train_images, train_labels)
    test_images = _find(_idx_candidates(folder, "t10k", "images"))
    test_labels = _find(_idx_candidates(folder, "t10k", "labels"))
    if (test_images is None) != (test_labels is None):
        raise RunError(f"data directory '{folder}' has only one of the t10k images and labels "
                       "files", "give both files of the test split, or neither")
    x_test = y_test = None
    if test_images is not None and test_labels is not None:
        x_test, y_test = _idx_pair(test_images, test_labels)
        if x_test.shape[1:] != x.shape[1:]:
            raise RunError(f"data directory '{folder}': test images have shape "
                           f"{x_test.shape[1:]} but training images {x.shape[1:]}",
                           "both splits need images of one shape")
    return Dataset(folder.name, x, y, x_test, y_test)


def _load_idx_file(images: Path) -> Dataset:
    """One images file; its labels file has 'labels' for 'images' and idx1 for idx3."""
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    stem = name.removesuffix(".gz")
    labels = _find([images.with_name(stem), images.with_name(f"{stem}.gz")])
    if name == images.name or labels is None:
        raise RunError(f"no labels file for IDX images file '{images}'",
                       f"put '{stem}[.gz]' beside it (MNIST's naming: train-images-idx3-ubyte "
                       "and train-labels-idx1-ubyte), or give the directory")
    x, y = _idx_pair(images, labels)
    return Dataset(images.name, x, y, None, None)


# ----- checks shared by every file kind


def _samples(values: np.ndarray, where: str) -> np.ndarray:
    """Samples as float32 or float64; integers are converted, not rescaled."""
    if values.ndim == 0 or len(values) == 0:
        raise RunError(f"{where} holds no examples (shape {values.shape})",
                       "samples are an array of shape (N, ...) with N at least 1")
    if values.dtype.kind in "iub":
        return values.astype(np.float64)
    if values.dtype.kind == "f":  # float16 -> float32, long double -> float64
        return values.astype(np.float32 if values.dtype.itemsize <= 4 else np.float64,
                             copy=False)
    raise RunError(f"{where} holds values of type {values.dtype}, not numbers",
                   "samples must be integers or floating-point numbers")


def _labels(values: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 class numbers; whole floats (3.0) are accepted."""
    if values.ndim != 1:
        hint = "labels are one class number per example, shape (N,)"
        if values.ndim == 2:
            hint += "; for one-hot labels, save y.argmax(axis=1)"
        raise RunError(f"{where}: labels have shape {values.shape}, expected (N,)", hint)
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2.0**62)
        if whole.all():
            return values.astype(np.int64)
        raise RunError(f"{where}: labels must be whole numbers, found "
                       f"{values[np.flatnonzero(~whole)[0]]}",
                       "labels are class numbers 0, 1, 2, ...")
    raise RunError(f"{where}: labels of type {values.dtype}, not whole numbers",
                   "labels are class numbers 0, 1, 2, ... stored as integers")


def _same_length(x: np.ndarray, y: np.ndarray, where: str, x_name: str, y_name: str) -> None:
    if len(x) != len(y):
        raise RunError(f"{where}: {x_name} holds {len(x)} examples but {y_name} {len(y)} labels",
                       "every example needs exactly one label")


# --------------------------------------------------------------------------- fitting


def fit_to_network(data: Dataset, input_shape: tuple[int, ...], classes: int,
                   dtype: str) -> Dataset:
    """The data shaped as the network's input (one sample: `input_shape`), in `dtype`,
    with labels checked against the network's `classes` outputs. Both splits."""
    if dtype not in DTYPES:
        raise RunError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    x, y = _fit(data.x, data.y, input_shape, classes, dtype, data.name)
    x_test = y_test = None
    if data.x_test is not None and data.y_test is not None:
        x_test, y_test = _fit(data.x_test, data.y_test, input_shape, classes, dtype,
                              f"{data.name} (test split)")
    return dataclasses.replace(data, x=x, y=y, x_test=x_test, y_test=y_test)


def _fit(x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], classes: int,
         dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    sample = tuple(x.shape[1:])
    # Only the layout may change (8x8 -> 1x8x8); different sizes mean another network.
    if math.prod(sample) != math.prod(input_shape):
        raise RunError(
            f"data '{name}' has samples of shape {'x'.join(map(str, sample)) or 'scalar'} "
            f"({math.prod(sample)} values) but the network's input is "
            f"{'x'.join(map(str, input_shape))} ({math.prod(input_shape)} values)",
            "use data made for this network, or change the network's input line")
    labels = _labels(np.asarray(y), f"data '{name}'")
    if len(labels) != len(x):
        raise RunError(f"data '{name}' has {len(x)} examples but {len(labels)} labels",
                       "every example needs exactly one label")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise RunError(f"data '{name}' has labels from {labels.min()} to {labels.max()}, but "
                       f"the network has {classes} outputs (classes 0 to {classes - 1})",
                       "the output layer needs one unit per class")
    shaped = np.ascontiguousarray(x.reshape((len(x), *input_shape)), dtype=dtype)
    return shaped, labels


# --------------------------------------------------------------------------- orders


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out round(fraction * N) examples (at least one when fraction > 0), chosen by
    a permutation seeded with `seed`; both parts keep the source's order."""
    if not 0 <= fraction < 1:
        raise RunError(f"validation fraction {fraction} is outside [0, 1)",
                       "use e.g. 0.1 to hold out a tenth of the data, or 0 for none")
    n = len(x)
    n_val = max(1, round(fraction * n)) if fraction > 0 else 0
    if n_val >= n and n_val > 0:
        raise RunError(f"holding out {n_val} of {n} examples for validation leaves none to "
                       "train on", "use a smaller validation fraction, or 0")
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[train], y[train], x[val], y[val]


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The indices of epoch `epoch`'s batches, in order: a permutation of range(n) drawn
    from (seed, epoch) alone, cut into full batches. The last partial batch is
    dropped, so every step has the compiled batch size."""
    if batch < 1:
        raise RunError(f"batch size {batch} is not positive", "use a batch of at least 1")
    if n < batch:
        raise RunError(f"only {n} training examples, fewer than one batch of {batch}",
                       "use a smaller batch, more data, or a smaller validation split")
    # Seeded by the pair, so epoch 7 is the same whether or not epochs 0..6 ran first.
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[start:start + batch] for start in range(0, n - batch + 1, batch)]
