"""`convdsl train`, `test`, `predict` and `plot`, end to end, and the checkpoints they
rely on: atomic, refused when damaged or mismatched, and resumed bit for bit after
a real training process is killed."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

import convdsl
from convdsl.cli import main
from convdsl.runtime import checkpoint as ckpt

# Batch norm, dropout and an auxiliary head: everything whose state a resume must
# restore (running statistics, the dropout step, both heads' weights).
TINY = """\
network tiny
input signal: 1x16
train epochs=3 batch=8 optimizer=sgd lr=0.05 momentum=0.9 val_split=0.1 seed=3

c1 = conv(4, 3, pad=1, act=relu)
n1 = bn
c2 = conv(6, 3, stride=2, act=relu)
flatten
drop = dropout(0.2)
fc = dense(3)
side = c1 -> flatten -> dense(3)

output fc loss=cross_entropy
aux side loss=cross_entropy weight=0.3
"""


def write_data(path: Path, count: int, seed: int = 0, test: int = 60) -> Path:
    """A learnable 3-class problem: the class is the strongest of three patterns."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((3, 16))
    x = rng.standard_normal((count + test, 16))
    y = (x @ patterns.T).argmax(axis=1)
    np.savez(path, x=x[:count], y=y[:count], x_test=x[count:], y_test=y[count:])
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.cnn"
    path.write_text(TINY)
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path / "data.npz", 400)


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def final_arrays(run: Path) -> dict[str, np.ndarray]:
    saved = ckpt.load(run)
    return {**{f"param/{k}": v for k, v in saved.params.items()},
            **{f"optim/{k}": v for k, v in saved.optimizer.items()}}


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not different, f"not bit-identical: {different}"


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "examples_per_second")}
            for row in rows]


# --- checkpoints -------------------------------------------------------------------

def test_checkpoint_round_trip_keeps_arrays_and_meta(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    params = {"c1.weight": rng.standard_normal((4, 1, 3)).astype(np.float32),
              "n1.num_batches_tracked": np.array(7, dtype=np.int64)}
    saved = ckpt.Checkpoint(params, {"step": np.array(3)}, {"position": {"epoch": 2}})
    ckpt.save(tmp_path / "c.npz", saved)
    loaded = ckpt.load(tmp_path / "c.npz")
    assert_identical(loaded.params, params)
    assert loaded.params["c1.weight"].dtype == np.float32
    assert loaded.optimizer["step"] == 3
    assert loaded.meta["position"] == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_checkpoint_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    ckpt.save(path, ckpt.Checkpoint({"w": np.arange(3.0)}))

    def crash(handle: BinaryIO) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_atomically(path, crash)
    assert np.array_equal(ckpt.load(path).params["w"], np.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_damaged_checkpoints_are_refused_clearly(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.npz"
    ckpt.save(path, ckpt.Checkpoint({"w": np.random.default_rng(0).standard_normal(5000)}))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    elif damage == "flip":  # one byte inside the stored array: the zip checksum fails
        at = len(data) // 2
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    else:
        path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="truncated or damaged"):
        ckpt.load(path)


def test_a_pickled_array_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([{"code": "runs"}], dtype=object))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)


def test_a_foreign_meta_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.frombuffer(b'{"format": "something"}', np.uint8))
    with pytest.raises(ckpt.CheckpointError, match="not a convdsl"):
        ckpt.load(path)


def test_weights_of_another_network_are_refused_naming_the_arrays(tiny: Path) -> None:
    network = convdsl.load(tiny)
    net = convdsl.compile(network, batch=2, warm=False)
    other = ckpt.Checkpoint({**net.state_dict(), "fc.weight": np.zeros((5, 24))},
                            meta={"network": "other"})
    with pytest.raises(ckpt.CheckpointError, match=r"'fc\.weight' is \(5, 24\) there"):
        ckpt.check_fits(other, network, net.params, "x.npz")
    del other.params["c1.bias"]
    with pytest.raises(ckpt.CheckpointError, match=r"missing 'c1\.bias'"):
        ckpt.check_fits(other, network, net.params, "x.npz")


def test_fingerprint_ignores_layout_but_not_meaning(tiny: Path) -> None:
    base = ckpt.fingerprint(convdsl.loads(TINY))
    relaid = TINY.replace("c1 = conv(4, 3, pad=1, act=relu)",
                          "c1 = conv(4, 3, pad=1, act=relu)  # a comment")
    assert ckpt.fingerprint(convdsl.loads(relaid.replace("epochs=3", "epochs=9"))) == base
    assert ckpt.fingerprint(convdsl.loads(TINY.replace("act=relu)\nn1", "act=tanh)\nn1"))) \
        != base


# --- the commands ------------------------------------------------------------------

def test_train_writes_a_complete_run(tiny: Path, data: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert run_cli("train", tiny, "--data", data, "--out", run) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "examples/s" in out
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["lr"] == 0.05 and config["settings"]["epochs"] == 3
    assert config["examples"] == {"train": 360, "validation": 40}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = ckpt.load(run)
    assert saved.meta["position"]["epoch"] == 3
    assert "side.1.weight" in saved.params  # the aux head is trained and kept

    assert run_cli("test", tiny, "--weights", run, "--data", data) == 0
    report = capsys.readouterr().out
    assert "test split" in report and "confusion matrix" in report
    assert run_cli("test", tiny, "--weights", run, "--data", data, "--json") == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 60 and sum(map(sum, scores["confusion"])) == 60
    assert scores["accuracy"] > 0.5  # three classes: chance is a third

    example = tmp_path / "one.npy"
    np.save(example, np.load(data)["x_test"][0])
    assert run_cli("predict", tiny, "--weights", run, example) == 0
    assert capsys.readouterr().out.startswith("0: class ")
    several, probs = tmp_path / "several.npy", tmp_path / "probs.npy"
    np.save(several, np.load(data)["x_test"][:5])
    assert run_cli("predict", tiny, "--weights", run, several, "--output", probs) == 0
    assert np.load(probs).shape == (5, 3)
    assert np.allclose(np.load(probs).sum(axis=1), 1)

    (run / "curves.png").unlink()
    assert run_cli("plot", run) == 0
    assert (run / "curves.png").exists()


def test_command_line_settings_override_the_file(tiny: Path, data: Path,
                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", tiny, "--data", data, "--out", run, "--epochs", "1",
                   "--optimizer", "adam", "--lr", "0.002", "--schedule", "cosine",
                   "--no-progress") == 0
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert (settings["epochs"], settings["optimizer"], settings["lr"]) == (1, "adam", 0.002)
    assert settings["batch"] == 8  # from the file


def test_bad_settings_and_data_are_refused_before_training(
        tiny: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("train", tiny, "--data", data, "--optimizer", "adamm")
    assert "did you mean 'adam'" in capsys.readouterr().err
    wide = write_data(tmp_path / "wide.npz", 50)
    np.savez(wide, x=np.zeros((50, 20)), y=np.zeros(50, dtype=np.int64))
    assert run_cli("train", tiny, "--data", wide, "--out", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "20" in err and "16" in err and "Traceback" not in err
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((50, 16)), y=np.full(50, 7))
    assert run_cli("train", tiny, "--data", labels, "--out", tmp_path / "r") == 1
    assert "7" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.npz").exists()


def test_an_existing_run_is_never_overwritten(tiny: Path, data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert run_cli("train", tiny, "--data", data, "--out", run, "--epochs", "1") == 0
    before = (run / "checkpoint.npz").read_bytes()
    assert run_cli("train", tiny, "--data", data, "--out", run) == 1
    assert "--resume" in capsys.readouterr().err
    assert run_cli("train", tiny, "--out", run, "--resume", "--lr", "0.5") == 1
    assert "only --epochs may change" in capsys.readouterr().err
    other = tmp_path / "other.cnn"
    other.write_text(TINY.replace("dense(3)\nside", "dense(3, bias=no)\nside"))
    assert run_cli("train", other, "--out", run, "--resume") == 1
    assert "differs" in capsys.readouterr().err
    assert (run / "checkpoint.npz").read_bytes() == before


def test_nan_stops_training_naming_the_layer_and_keeps_the_last_checkpoint(
        tiny: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert run_cli("train", tiny, "--data", data, "--out", run, "--epochs", "1") == 0
    good = (run / "checkpoint.npz").read_bytes()
    assert run_cli("train", tiny, "--out", run, "--resume", "--epochs", "2") == 0
    assert json.loads((run / "config.json").read_text())["settings"]["epochs"] == 2
    blown = tmp_path / "blown"
    # A learning rate of 1e30 overflows the weights within a few steps.
    assert run_cli("train", tiny, "--data", data, "--out", blown, "--lr", "1e30",
                   "--momentum", "0") == 1
    err = capsys.readouterr().err
    assert "training stopped at step" in err
    assert "first NaN or infinity appeared in output of '" in err
    assert "lower the learning rate" in err
    assert (run / "checkpoint.npz").read_bytes() != good  # the resumed run went on


# --- resuming after a real kill ------------------------------------------------------

def cli_process(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "convdsl.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())


def wait_for_epoch(run: Path, epoch: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # Asked before the look at the checkpoint: a run that ends between the two (this
        # process may wait a while for a core) has written its last checkpoint by then.
        ended = process.poll() is not None
        if (run / "checkpoint.npz").exists() and \
                ckpt.load(run).meta["position"]["epoch"] >= epoch:
            return
        if ended:
            pytest.fail(f"training ended early: {process.stderr.read().decode()[-2000:]}"
                        if process.stderr else "training ended early")
        time.sleep(0.005)
    pytest.fail("no checkpoint appeared")


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_a_run_stopped_and_resumed_ends_bit_identical(tiny: Path, tmp_path: Path,
                                                      how: str) -> None:
    data = write_data(tmp_path / "big.npz", 2400)
    # An epoch takes about 0.1 s: enough of them that the run is still going when this
    # process, on a busy machine, gets to stop it.
    epochs = 20
    options = ("--data", data, "--epochs", str(epochs), "--no-progress")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_cli("train", tiny, *options, "--out", whole) == 0

    # A run that finishes before this process gets to stop it is started over (seen
    # twice in CI: this process was away for seconds, perhaps in a full garbage
    # collection, which late in a session has hundreds of thousands of objects or more
    # to go through; so none runs while it waits).
    for _ in range(3):
        shutil.rmtree(stopped, ignore_errors=True)
        gc.collect()
        gc.disable()
        try:
            process = cli_process("train", tiny, *options, "--out", stopped)
            wait_for_epoch(stopped, 2, process)
            time.sleep(0.05)  # into the next epoch, maybe in the middle of a checkpoint write
            process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        finally:
            gc.enable()
        _, err = process.communicate(timeout=120)
        if process.returncode != 0:
            break
    if how == "kill":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, err.decode()
        assert b"continue with --resume" in err
    position = ckpt.load(stopped).meta["position"]
    assert position["epoch"] < epochs, "the run finished before it was stopped"

    assert run_cli("train", tiny, "--out", stopped, "--resume", "--no-progress") == 0
    assert_identical(final_arrays(stopped), final_arrays(whole))
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert without_times(rows) == without_times(expected)


def test_unzip_of_a_checkpoint_shows_plain_arrays(tiny: Path, data: Path,
                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", tiny, "--data", data, "--out", run, "--epochs", "1") == 0
    with zipfile.ZipFile(run / "checkpoint.npz") as archive:
        names = archive.namelist()
    assert "meta.npy" in names and "param/c1.weight.npy" in names
    assert all(name.endswith(".npy") for name in names)


def test_the_progress_bar_shows_loss_accuracy_and_speed(
        tiny: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convdsl.runtime import runs

    trainer = runs.prepare(convdsl.load(tiny), str(tiny), str(data), {"epochs": 1},
                           tmp_path / "run", resume=False, algo=None, progress=True)
    trainer._bar_options = {"mininterval": 0, "miniters": 1}  # draw every step
    trainer.train()
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss " in err and "acc " in err and "ex/s" in err
