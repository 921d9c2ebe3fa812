"""The training loop behind `convdsl train`: batches in, checkpoints and metrics out.

A run lives in one folder:

    config.json      the resolved recipe, the network and the data it was trained on
    checkpoint.npz   weights, optimizer state and position; replaced whole, atomically
    metrics.jsonl    one JSON object per finished epoch
    curves.png       loss and accuracy per epoch (when matplotlib is installed)

Everything random is a function of the seed and the position: the initial
weights (seed), the validation split (seed), each epoch's order (seed, epoch)
and each dropout mask (seed, step, layer). A checkpoint stores the position
(epoch, batch, step) and the optimizer's state, so a resumed run computes the
same arithmetic in the same order and ends with the same weights, bit for bit.

Ctrl-C or SIGTERM only raise a flag; the loop saves a checkpoint between two
steps, never in the middle of an update, and stops.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdsl.errors import RunError
from convdsl.ir.training import TrainSettings
from convdsl.network import Network
from convdsl.runtime import checkpoint as ckpt
from convdsl.runtime import data as datasets
from convdsl.runtime.evaluation import classes_of, score, targets_for
from convdsl.runtime.executor import CompiledNetwork
from convdsl.runtime.optim import Optimizer, Schedule, make_optimizer

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
REDRAW_SECONDS = 10.0

Log = Callable[[str], None]


class TrainingStopped(RunError):
    """Training could not go on (NaN or infinity); the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint of the current position was written."""


@dataclass
class Position:
    """Where a run stands: the next batch to train, and the sums of the epoch so far."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # training forwards so far: decides dropout masks
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / ckpt.FILE_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def curves(self) -> Path:
        return self.path / CURVES_FILE


def read_config(folder: Path) -> dict[str, Any]:
    path = RunFolder(folder).config
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read the run's configuration '{path}': {exc}",
                       "is this a folder written by `convdsl train`?") from None
    if not isinstance(config, dict) or "settings" not in config:
        raise RunError(f"'{path}' is not a convdsl run configuration")
    return config


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = RunFolder(folder).metrics
    if not path.is_file():
        raise RunError(f"no metrics in '{folder}'", "train first: convdsl train FILE --out DIR")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"{path}:{number}: not a JSON line") from None
    return rows


class Trainer:
    """One run: a compiled network, its data, optimizer and schedule, and a folder."""

    def __init__(self, network: Network, data: datasets.Dataset, settings: TrainSettings,
                 folder: Path, algo: str | None = None, log: Log = print,
                 progress: bool | None = None, plot: bool = True,
                 config: dict[str, Any] | None = None, fuse: bool = True,
                 device: str = "cpu") -> None:
        self.network = network
        self.settings = settings
        self.run = RunFolder(folder)
        self.log = log
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.plot = plot
        self.config = config or {}
        self.classes = classes_of(network)
        fitted = datasets.fit_to_network(data, network.input_shape, self.classes,
                                         settings.dtype)
        self.x_test, self.y_test = fitted.x_test, fitted.y_test
        (self.x, self.y, self.x_val, self.y_val) = datasets.split_validation(
            fitted.x, fitted.y, settings.val_split, settings.seed)
        self.steps_per_epoch = len(datasets.epoch_batches(len(self.x), settings.batch,
                                                          settings.seed, 0))
        self.net = CompiledNetwork(network, settings.batch, settings.dtype, algo,
                                   settings.seed, settings.init, fuse=fuse, device=device)
        # packed, as the gradients are: one pass per step
        self.optimizer: Optimizer = make_optimizer(settings, self.net.trained)
        self.schedule = Schedule(settings, self.steps_per_epoch)
        self.fingerprint = ckpt.fingerprint(network)
        self.position = Position()
        self._stop_requested = False
        self._drawn_at = -math.inf
        self._bar_options: dict[str, Any] = {}

    # --- starting and resuming ---------------------------------------------

    def start(self) -> None:
        """A new run: refuse a folder that already holds one, then record the recipe."""
        if self.run.checkpoint.exists():
            raise RunError(f"'{self.run.path}' already holds a training run",
                           "pass --resume to continue it, or choose another --out folder")
        config = {**self.config, "network_name": self.network.name,
                  "fingerprint": self.fingerprint, "settings": self.settings.to_dict(),
                  "examples": {"train": len(self.x), "validation": len(self.x_val)},
                  "classes": self.classes}
        ckpt.write_text(self.run.config, json.dumps(config, indent=2) + "\n")

    def resume(self) -> None:
        """Load the run's checkpoint: weights, optimizer state and position."""
        saved = ckpt.load(self.run.checkpoint)
        if saved.meta.get("fingerprint") != self.fingerprint:
            raise ckpt.CheckpointError(
                f"the checkpoint in '{self.run.path}' was trained on network "
                f"'{saved.meta.get('network', '?')}' as it was then, and this network differs",
                "resume with the same .cnn file, or start a new run with --out")
        ckpt.check_fits(saved, self.network, self.net.params, str(self.run.checkpoint))
        self.net.load_state_dict(saved.params)
        self.optimizer.load_state_dict(saved.optimizer)
        self.position = Position(**saved.meta["position"])
        self.net.step = self.position.step
        config = read_config(self.run.path)
        if config["settings"] != self.settings.to_dict():  # --epochs changed: keep it
            config["settings"] = self.settings.to_dict()
            ckpt.write_text(self.run.config, json.dumps(config, indent=2) + "\n")

    # --- the loop ------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Train to the last epoch; returns the metrics of every epoch."""
        # Overflow is caught after each step and reported with the layer it started
        # in, so NumPy's own warnings would only repeat it, less clearly.
        with self._stop_on_signals(), np.errstate(over="ignore", invalid="ignore"):
            while self.position.epoch < self.settings.epochs:
                self._train_epoch()
                self._finish_epoch()
        return self.position.history

    def _train_epoch(self) -> None:
        position, settings = self.position, self.settings
        order = datasets.epoch_batches(len(self.x), settings.batch, settings.seed,
                                       position.epoch)
        bar = self._bar(len(order), position.batch)
        try:
            while position.batch < len(order):
                if self._stop_requested:
                    self._save()
                    raise Interrupted
                started = time.perf_counter()
                self._train_step(order[position.batch])
                position.seconds += time.perf_counter() - started
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(self._running_text(), refresh=False)
        finally:
            if bar is not None:
                bar.close()

    def _train_step(self, indices: np.ndarray) -> None:
        position = self.position
        lr = self.schedule.lr(position.epoch, position.batch)
        step = self.net.step
        x, labels = self.x[indices], self.y[indices]
        result = self.net.train_step(x, targets_for(self.network, labels), self.optimizer, lr)
        if result.nonfinite is not None:  # the step changed no parameter
            self._stop_on_nonfinite(x, step, result.nonfinite)
        position.batch += 1
        position.step = self.net.step
        position.loss_sum += result.loss * len(indices)
        position.correct += int(np.count_nonzero(result.scores.argmax(axis=1) == labels))
        position.seen += len(indices)

    def _finish_epoch(self) -> None:
        position = self.position
        validation = score(self.net, self.x_val, self.y_val)
        row = {
            "epoch": position.epoch + 1,
            "lr": self.schedule.lr(position.epoch, max(position.batch - 1, 0)),
            "loss": position.loss_sum / max(position.seen, 1),
            "accuracy": position.correct / max(position.seen, 1),
            "val_loss": _or_none(validation.loss),
            "val_accuracy": _or_none(validation.accuracy),
            "seconds": round(position.seconds, 3),
            "examples_per_second": round(position.seen / max(position.seconds, 1e-9), 1),
        }
        position.history.append(row)
        position.epoch += 1
        position.batch = position.loss_sum = position.correct = position.seen = 0
        position.seconds = 0.0
        self._save()
        self.log(epoch_line(row, self.settings.epochs))
        # Drawing takes a fraction of a second: more than a small epoch, so the curves
        # are redrawn at most every few seconds, and after the last epoch.
        last = position.epoch == self.settings.epochs
        if self.plot and (last or time.monotonic() - self._drawn_at > REDRAW_SECONDS):
            self._draw_curves()
            self._drawn_at = time.monotonic()

    # --- saving ----------------------------------------------------------------

    def _save(self) -> None:
        meta = {"network": self.network.name, "fingerprint": self.fingerprint,
                "settings": self.settings.to_dict(), "position": self.position.to_dict()}
        ckpt.save(self.run.checkpoint, ckpt.Checkpoint(
            self.net.state_dict(), self.optimizer.state_dict(), meta))
        lines = "".join(json.dumps(row) + "\n" for row in self.position.history)
        ckpt.write_text(self.run.metrics, lines)

    def _draw_curves(self) -> None:
        from convdsl.report import curves

        try:
            curves.draw(self.position.history, self.run.curves, title=self.network.name)
        except curves.PlotUnavailable as exc:
            if self.plot:  # say it once
                self.log(f"note: {exc.message}; {exc.hint}")
            self.plot = False

    # --- NaN and infinity ---------------------------------------------------------

    def _stop_on_nonfinite(self, x: np.ndarray, step: int, what: str) -> None:
        """Find the first layer whose output is not finite by rerunning the same batch
        with checks on (same step, so the same dropout masks), and stop."""
        stage = self.net.first_nonfinite(x, train=True, step=step)
        where = ("no layer's output, so the backward pass" if stage is None else
                 f"output of '{stage.name}' ({stage.description or stage.layer.op.value})")
        position = self.position
        kept = (f"the last good checkpoint (after epoch {position.epoch}) is kept in "
                f"'{self.run.checkpoint}'" if self.run.checkpoint.exists()
                else "no checkpoint was written yet")
        lr = self.schedule.lr(position.epoch, position.batch)
        raise TrainingStopped(
            f"training stopped at step {step + 1} (epoch {position.epoch + 1}, batch "
            f"{position.batch + 1}): {what}; the first NaN or infinity appeared in {where}",
            f"lower the learning rate (it was {lr:g}) or check the data; {kept}")

    # --- output -----------------------------------------------------------------

    def _bar(self, total: int, done: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=done, leave=False, unit="batch",
                    desc=f"epoch {self.position.epoch + 1}/{self.settings.epochs}",
                    dynamic_ncols=True, **self._bar_options)

    def _running_text(self) -> str:
        p = self.position
        speed = p.seen / max(p.seconds, 1e-9)
        return (f"loss {p.loss_sum / max(p.seen, 1):.4f}, acc {p.correct / max(p.seen, 1):.1%}"
                f", {speed:,.0f} ex/s")

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """The first Ctrl-C or SIGTERM asks the loop to save and stop between steps; a
        second one stops at once (the last checkpoint is still whole)."""
        def request(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            previous = {sig: signal.signal(sig, request)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals stay as they are
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  "
            f"accuracy {row['accuracy']:.2%}")
    if row.get("val_loss") is not None:
        text += f"  val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.2%}"
    return text + f"  {row['examples_per_second']:,.0f} examples/s  {row['seconds']:.1f} s"


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
