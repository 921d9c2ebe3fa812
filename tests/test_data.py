"""Data sources: the built-in sets, .npz and IDX files, fitting to a network, and orders."""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from convdsl.errors import RunError
from convdsl.runtime import data as data_module
from convdsl.runtime.data import (
    Dataset,
    epoch_batches,
    fit_to_network,
    load_data,
    split_validation,
)

# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, values: np.ndarray, code: int = 0x08) -> Path:
    """An IDX file as MNIST's are written: magic 00 00 <type> <ndim>, big-endian sizes."""
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, code, values.ndim]) + np.array(values.shape, ">u4").tobytes()
    payload = header + values.astype(types[code]).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def mnist_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


def error_of(source: str | Path) -> RunError:
    with pytest.raises(RunError) as caught:
        load_data(source)
    return caught.value


# --------------------------------------------------------------------------- digits


def test_digits_is_scaled_to_unit_range_with_a_fixed_test_split() -> None:
    data = load_data("digits")
    assert data.name == "digits"
    assert data.x_test is not None and data.y_test is not None
    assert data.x.shape[1:] == data.x_test.shape[1:] == (8, 8)
    assert len(data.x) + len(data.x_test) == 1797
    assert len(data.x_test) == round(0.2 * 1797)
    assert data.x.dtype == np.float64 and data.y.dtype == np.int64
    assert data.x.min() == 0.0 and data.x.max() == 1.0  # 0..16 divided by 16
    assert set(np.unique(data.y)) == set(range(10)) == set(np.unique(data.y_test))
    again = load_data("digits")
    np.testing.assert_array_equal(again.x_test, data.x_test)  # the same images every time


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    error = error_of("digits")
    assert "scikit-learn" in error.message
    assert error.hint is not None
    assert 'pip install "convdsl[data]"' in error.hint and "pip install scikit-learn" in error.hint


# --------------------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_mnist1d_is_generated_once_then_read_from_the_cache(
        mnist1d_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVDSL_CACHE", str(mnist1d_cache))
    random.seed(123)
    np.random.seed(123)
    data = load_data("mnist1d")
    # make_dataset reseeds the global generators; the loader puts them back.
    assert random.random() == random.Random(123).random()
    assert np.random.random() == np.random.RandomState(123).random()
    assert data.name == "mnist1d"
    assert data.x.shape == (4000, 40) and data.y.shape == (4000,)
    assert data.x_test is not None and data.y_test is not None
    assert data.x_test.shape == (1000, 40) and data.y_test.shape == (1000,)
    assert data.y.dtype == np.int64 and set(np.unique(data.y)) == set(range(10))
    cached = list((mnist1d_cache / "data").glob("mnist1d-*.npz"))
    assert len(cached) == 1
    assert not list((mnist1d_cache / "data").glob(".tmp-*"))  # written atomically

    def must_not_run(*args: object) -> None:
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(data_module, "_generate_mnist1d", must_not_run)
    again = load_data("mnist1d")
    for name in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, name), getattr(data, name))


def test_a_damaged_mnist1d_cache_is_made_again(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    fake = {"x": np.zeros((3, 40)), "y": np.arange(3), "x_test": np.ones((2, 40)),
            "y_test": np.arange(2)}
    monkeypatch.setattr(data_module, "_generate_mnist1d", lambda generator, args: fake)
    first = load_data("mnist1d")
    (cached,) = (tmp_path / "data").glob("mnist1d-*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # cut short, as by a crash
    second = load_data("mnist1d")
    np.testing.assert_array_equal(second.x_test, first.x_test)
    assert np.load(cached)["x"].shape == (3, 40)  # rewritten whole


def test_mnist1d_without_its_package_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    error = error_of("mnist1d")
    assert "mnist1d" in error.message
    assert error.hint is not None and 'pip install "convdsl[data]"' in error.hint


# --------------------------------------------------------------------------- .npz


def test_npz_with_a_test_split(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.arange(24, dtype=np.float32).reshape(6, 4), y=np.array([0, 1, 2] * 2),
             x_test=np.ones((2, 4), np.float32), y_test=np.array([1.0, 2.0]))
    data = load_data(path)
    assert data.name == "mine.npz"
    assert data.x.dtype == np.float32 and data.x.shape == (6, 4)
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.y_test is not None and data.y_test.dtype == np.int64  # whole floats accepted
    assert load_data(str(path)).x.shape == (6, 4)


def test_npz_integer_samples_become_floats_unscaled(tmp_path: Path) -> None:
    path = tmp_path / "ints.npz"
    np.savez(path, x=np.full((3, 2), 200, np.uint8), y=np.zeros(3, np.uint8))
    data = load_data(path)
    assert data.x.dtype == np.float64 and data.x.max() == 200.0
    assert data.x_test is None and data.y_test is None


@pytest.mark.parametrize(("arrays", "message", "hint"), [
    ({"x": np.zeros((3, 2))}, "no array 'y'", "np.savez"),
    ({"X": np.zeros((3, 2)), "Y": np.zeros(3)}, "it holds: X, Y", "save the samples as x"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2, int)}, "x holds 3 examples but y 2", "one label"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, 1.5, 2])}, "whole numbers, found 1.5",
     "class numbers"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, np.nan, 2])}, "whole numbers, found nan",
     "class numbers"),
    ({"x": np.zeros((3, 2)), "y": np.eye(3)}, "shape (3, 3), expected (N,)", "argmax"),
    ({"x": np.array(["a", "b"]), "y": np.zeros(2, int)}, "not numbers", "floating-point"),
    ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "holds no examples", "(N, ...)"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((1, 2))},
     "only one of x_test and y_test", "or neither"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((1, 5)),
      "y_test": np.zeros(1, int)}, "test samples have shape (5,)", "one shape"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((2, 2)),
      "y_test": np.zeros(1, int)}, "x_test holds 2 examples but y_test 1", "one label"),
])
def test_bad_npz_files_are_explained(tmp_path: Path, arrays: dict[str, np.ndarray],
                                     message: str, hint: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    error = error_of(path)
    assert message in error.message
    assert error.hint is not None and hint in error.hint


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([[1.0], None], dtype=object), y=np.zeros(2, int))
    error = error_of(path)
    assert "array 'x'" in error.message and "cannot be loaded" in error.message
    assert error.hint is not None and "numeric" in error.hint


def test_a_damaged_npz_file_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(3, int))
    path.write_bytes(path.read_bytes()[:50])
    error = error_of(path)
    assert "cannot read data file" in error.message
    assert error.hint is not None and "numpy.savez" in error.hint


# --------------------------------------------------------------------------- IDX


def test_idx_directory_with_gzipped_and_plain_files(tmp_path: Path) -> None:
    images, labels = mnist_like(7)
    test_images, test_labels = mnist_like(3, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels)
    data = load_data(tmp_path)
    assert data.name == tmp_path.name
    assert data.x.dtype == np.float32 and data.x.shape == (7, 4, 5)
    np.testing.assert_allclose(data.x, images / 255, rtol=1e-6)  # pixels 0..255 -> [0, 1]
    assert data.y.dtype == np.int64 and data.y.tolist() == labels.tolist()
    assert data.x_test is not None and data.y_test is not None
    np.testing.assert_allclose(data.x_test, test_images / 255, rtol=1e-6)
    assert data.y_test.tolist() == test_labels.tolist()


def test_idx_images_file_finds_its_labels_by_name(tmp_path: Path) -> None:
    images, labels = mnist_like(5)
    path = write_idx(tmp_path / "train-images.idx3-ubyte", images)  # a mirror's spelling
    write_idx(tmp_path / "train-labels.idx1-ubyte.gz", labels)
    data = load_data(path)
    assert data.name == "train-images.idx3-ubyte"
    assert data.x.shape == (5, 4, 5) and data.y.tolist() == labels.tolist()
    assert data.x_test is None


def test_idx_float_images_are_kept_as_they_are(tmp_path: Path) -> None:
    images = np.linspace(-1, 1, 12).reshape(3, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, code=0x0D)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([2, 0, 1]))
    data = load_data(tmp_path)
    assert data.x.dtype == np.float32
    np.testing.assert_allclose(data.x, images, rtol=1e-6)


def test_truncated_idx_file(tmp_path: Path) -> None:
    images, labels = mnist_like(4)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images)
    path.write_bytes(path.read_bytes()[:-7])
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    error = error_of(tmp_path)
    assert "is truncated" in error.message and "(4, 4, 5) needs 80 bytes" in error.message
    assert "holds 73" in error.message


def test_idx_file_longer_than_its_header(tmp_path: Path) -> None:
    images, labels = mnist_like(4)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    path.write_bytes(path.read_bytes() + b"\0")
    assert "longer than its header says" in error_of(tmp_path).message


def test_truncated_header(tmp_path: Path) -> None:
    _, labels = mnist_like(4)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert "damaged header" in error_of(tmp_path).message


def test_wrong_magic_number(tmp_path: Path) -> None:
    images, _ = mnist_like(4)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x08\x01\0\0" + bytes(8))
    error = error_of(tmp_path)
    assert "is not an IDX file" in error.message and "08 01 00 00" in error.message


def test_damaged_gzip(tmp_path: Path) -> None:
    images, labels = mnist_like(40)
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    path.write_bytes(path.read_bytes()[:-20])
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    error = error_of(tmp_path)
    assert "damaged gzip" in error.message
    assert error.hint is not None and "again" in error.hint


def test_idx_label_count_must_match_the_images(tmp_path: Path) -> None:
    images, labels = mnist_like(6)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    error = error_of(tmp_path)
    assert "holds 6 images" in error.message and "holds 5 labels" in error.message


def test_idx_directory_without_training_labels(tmp_path: Path) -> None:
    images, _ = mnist_like(3)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    error = error_of(tmp_path)
    assert "no train-labels-idx1-ubyte[.gz]" in error.message


def test_idx_directory_with_half_a_test_split(tmp_path: Path) -> None:
    images, labels = mnist_like(3)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    assert "only one of the t10k" in error_of(tmp_path).message


def test_idx_images_file_without_labels(tmp_path: Path) -> None:
    images, _ = mnist_like(3)
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    error = error_of(path)
    assert "no labels file" in error.message
    assert error.hint is not None and "train-labels-idx1-ubyte[.gz]" in error.hint


# --------------------------------------------------------------------------- unknown


def test_unknown_source_lists_the_choices() -> None:
    error = error_of("digts")
    assert "no data source 'digts'" in error.message
    assert error.hint is not None
    assert "did you mean 'digits'?" in error.hint
    for kind in ("mnist1d", ".npz", "IDX"):
        assert kind in error.hint


def test_a_built_in_name_given_as_a_path_means_a_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "no data source 'digits'" in error_of(Path("digits")).message


def test_unknown_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    error = error_of(path)
    assert "not an .npz or IDX file" in error.message
    assert error.hint is not None and "digits" in error.hint


# --------------------------------------------------------------------------- fitting


def test_fit_reshapes_and_casts_both_splits() -> None:
    data = fit_to_network(load_data("digits"), (1, 8, 8), classes=10, dtype="float32")
    assert data.x.shape[1:] == (1, 8, 8) and data.x.dtype == np.float32
    assert data.x.flags.c_contiguous
    assert data.x_test is not None and data.x_test.shape[1:] == (1, 8, 8)
    assert data.x_test.dtype == np.float32 and data.x_test.flags.c_contiguous
    flat = fit_to_network(data, (64,), classes=10, dtype="float64")
    assert flat.x.shape[1:] == (64,) and flat.x.dtype == np.float64


def test_fit_keeps_a_dataset_without_test_split() -> None:
    data = Dataset("tiny", np.zeros((4, 40)), np.array([0, 1, 2, 3]), None, None)
    fitted = fit_to_network(data, (1, 40), classes=4, dtype="float64")
    assert fitted.x.shape == (4, 1, 40) and fitted.x_test is None and fitted.y_test is None


def test_fit_refuses_samples_of_another_size() -> None:
    data = Dataset("digits", np.zeros((4, 8, 8)), np.zeros(4, np.int64), None, None)
    with pytest.raises(RunError) as caught:
        fit_to_network(data, (1, 28, 28), classes=10, dtype="float32")
    assert "samples of shape 8x8 (64 values)" in caught.value.message
    assert "input is 1x28x28 (784 values)" in caught.value.message


@pytest.mark.parametrize(("labels", "found"), [([0, 3, 10], "from 0 to 10"),
                                               ([-1, 2, 5], "from -1 to 5")])
def test_fit_refuses_labels_outside_the_classes(labels: list[int], found: str) -> None:
    data = Dataset("mine.npz", np.zeros((3, 2)), np.array(labels), None, None)
    with pytest.raises(RunError) as caught:
        fit_to_network(data, (2,), classes=10, dtype="float32")
    assert found in caught.value.message
    assert "10 outputs (classes 0 to 9)" in caught.value.message


def test_fit_checks_the_test_split_too() -> None:
    data = Dataset("mine.npz", np.zeros((3, 2)), np.zeros(3, np.int64), np.zeros((1, 2)),
                   np.array([4]))
    with pytest.raises(RunError, match=r"mine.npz \(test split\)"):
        fit_to_network(data, (2,), classes=3, dtype="float32")


def test_fit_refuses_an_unknown_dtype() -> None:
    data = Dataset("mine.npz", np.zeros((3, 2)), np.zeros(3, np.int64), None, None)
    with pytest.raises(RunError, match="unknown dtype 'float16'"):
        fit_to_network(data, (2,), classes=3, dtype="float16")


# --------------------------------------------------------------------------- orders


def test_validation_split_is_seeded_and_disjoint() -> None:
    x = np.arange(100, dtype=np.float64).reshape(50, 2)
    y = np.arange(50)
    x_train, y_train, x_val, y_val = split_validation(x, y, 0.2, seed=3)
    assert len(y_val) == 10 and len(y_train) == 40
    assert sorted([*y_train, *y_val]) == list(range(50))
    np.testing.assert_array_equal(x_val[:, 0], 2 * y_val)  # rows stay with their labels
    np.testing.assert_array_equal(x_train[:, 0], 2 * y_train)
    assert split_validation(x, y, 0.2, seed=3)[3].tolist() == y_val.tolist()
    assert split_validation(x, y, 0.2, seed=4)[3].tolist() != y_val.tolist()


def test_no_validation_split() -> None:
    x, y = np.zeros((5, 1, 3)), np.arange(5)
    x_train, y_train, x_val, y_val = split_validation(x, y, 0.0, seed=0)
    assert len(x_train) == len(y_train) == 5 and x_val.shape == (0, 1, 3) and y_val.shape == (0,)


def test_a_tiny_validation_fraction_still_holds_one_out() -> None:
    assert len(split_validation(np.zeros((10, 2)), np.arange(10), 0.01, seed=0)[3]) == 1


def test_a_validation_split_must_leave_training_data() -> None:
    with pytest.raises(RunError, match="leaves none to train on"):
        split_validation(np.zeros((1, 2)), np.arange(1), 0.5, seed=0)


def test_epoch_batches_are_full_and_depend_only_on_seed_and_epoch() -> None:
    batches = epoch_batches(103, 10, seed=1, epoch=2)
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 100 and flat.min() >= 0 and flat.max() < 103
    again = epoch_batches(103, 10, seed=1, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other_epoch = np.concatenate(epoch_batches(103, 10, seed=1, epoch=3))
    other_seed = np.concatenate(epoch_batches(103, 10, seed=2, epoch=2))
    assert not np.array_equal(flat, other_epoch) and not np.array_equal(flat, other_seed)
    assert len(epoch_batches(10, 10, seed=0, epoch=0)) == 1


def test_fewer_examples_than_one_batch() -> None:
    with pytest.raises(RunError) as caught:
        epoch_batches(7, 32, seed=0, epoch=0)
    assert "only 7 training examples" in caught.value.message
    assert "batch of 32" in caught.value.message
