"""Training runs as the command line uses them: start or resume one, load its
weights into a compiled network, and report a test.

The CLI parses options and prints; the decisions about what a run folder may
hold, which settings win and which weights fit live here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convdsl.codegen import parallel
from convdsl.errors import RunError
from convdsl.ir.training import TrainSettings, resolve
from convdsl.network import Network
from convdsl.runtime import checkpoint as ckpt
from convdsl.runtime import data as datasets
from convdsl.runtime.evaluation import Scores
from convdsl.runtime.executor import CompiledNetwork
from convdsl.runtime.training import Log, RunFolder, Trainer, read_config

# Settings a resumed run may change: more epochs continue the same recipe.
RESUMABLE_CHANGES = ("epochs",)


def prepare(network: Network, network_path: str, data_source: str | None,
            overrides: Mapping[str, Any], out: Path, resume: bool, algo: str | None,
            log: Log = print, progress: bool | None = None, fuse: bool = True,
            device: str = "cpu") -> Trainer:
    """A trainer for a new run in `out`, or for the run there when resuming."""
    if resume:
        settings, source = _resumed_recipe(out, data_source, overrides)
    elif data_source is None:
        raise RunError("no data to train on", "pass --data digits, mnist1d, a .npz file "
                       "or a folder of IDX files")
    else:
        settings, source = resolve(network.training, overrides), data_source
    data = datasets.load_data(source)
    config = {"network": str(network_path), "data": source, "algo": algo}
    trainer = Trainer(network, data, settings, out, algo, log=log, progress=progress,
                      config=config, fuse=fuse, device=device)
    if resume:
        trainer.resume()
    else:
        trainer.start()
    return trainer


def _resumed_recipe(out: Path, data_source: str | None, overrides: Mapping[str, Any]
                    ) -> tuple[TrainSettings, str]:
    if not RunFolder(out).checkpoint.exists():
        raise RunError(f"there is no run to resume in '{out}'",
                       "start one without --resume, or give its folder with --out")
    config = read_config(out)
    settings = TrainSettings(**config["settings"])
    changed = [name for name, value in overrides.items()
               if name not in RESUMABLE_CHANGES and getattr(settings, name) != value]
    if changed:
        raise RunError(f"--resume continues the run's own recipe, and --{changed[0]} "
                       "would change it", "start a new run (another --out) to change "
                       "settings; only --epochs may change on resume")
    if data_source is not None and data_source != config["data"]:
        raise RunError(f"the run in '{out}' trained on '{config['data']}', not "
                       f"'{data_source}'", "leave --data out when resuming")
    return settings.replace(**{k: v for k, v in overrides.items()
                               if k in RESUMABLE_CHANGES}), str(config["data"])


def compile_for_run(trainer: Trainer, log: Log = print) -> None:
    """Compile (or load from the cache) every kernel before the first step."""
    started = time.perf_counter()
    parallel.warm(trainer.net)
    log(f"{trainer.network.name}: {len(trainer.x):,} training and {len(trainer.x_val):,} "
        f"validation examples, {trainer.steps_per_epoch} steps per epoch of "
        f"{trainer.settings.batch}; kernels ready in {time.perf_counter() - started:.1f} s")


# --- weights for testing and prediction ----------------------------------------

def weights_settings(weights: Path, network: Network) -> TrainSettings:
    """The recipe a run was trained with (for its batch and dtype), else the file's."""
    if weights.is_dir() and RunFolder(weights).config.exists():
        return TrainSettings(**read_config(weights)["settings"])
    return resolve(network.training, {})


def load_weights(network: Network, weights: Path, batch: int, dtype: str,
                 device: str = "cpu") -> CompiledNetwork:
    """A compiled network holding the weights of a run folder or a .npz file."""
    saved = ckpt.load(weights)
    if "fingerprint" in saved.meta and saved.meta["fingerprint"] != ckpt.fingerprint(network):
        raise ckpt.CheckpointError(
            f"the weights in '{weights}' were trained on network "
            f"'{saved.meta.get('network', '?')}', which computes something else than "
            f"'{network.name}'", "test with the .cnn file the run was trained from")
    net = CompiledNetwork(network, batch, dtype, device=device)
    ckpt.check_fits(saved, network, net.params, str(weights))
    net.load_state_dict(saved.params)
    return net


def test_report(scores: Scores, name: str) -> str:
    """Accuracy, accuracy per class and the confusion matrix, as text."""
    classes = scores.classes
    lines = [f"{name}: {len(scores.labels):,} examples, loss {scores.loss:.4f}, "
             f"accuracy {scores.accuracy:.2%}", "", "class  examples  accuracy"]
    counts = scores.confusion()
    for label, accuracy in enumerate(scores.per_class_accuracy()):
        shown = "-" if np.isnan(accuracy) else f"{accuracy:.2%}"
        lines.append(f"{label:>5}  {counts[label].sum():>8}  {shown:>8}")
    width = max(5, len(str(counts.max())) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              "true\\pred" + "".join(f"{c:>{width}}" for c in range(classes))]
    lines += [f"{label:>9}" + "".join(f"{n:>{width}}" for n in row)
              for label, row in enumerate(counts)]
    return "\n".join(lines)


def scores_json(scores: Scores) -> str:
    return json.dumps({"examples": len(scores.labels), "loss": scores.loss,
                       "accuracy": scores.accuracy,
                       "per_class_accuracy": [None if np.isnan(a) else float(a)
                                              for a in scores.per_class_accuracy()],
                       "confusion": scores.confusion().tolist()}, indent=2)


def read_inputs(path: Path, input_shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Examples from a .npy file: one example shaped as the input (or with its channel
    axis left out), or a batch of them."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RunError(f"cannot read '{path}' as a .npy array: {exc}",
                       "save inputs with np.save('inputs.npy', x)") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise RunError(f"'{path}' does not hold a numeric array")
    size = int(np.prod(input_shape))
    if array.size == size and array.ndim <= len(input_shape):
        return array.reshape(1, *input_shape).astype(dtype)
    if array.ndim >= 2 and int(np.prod(array.shape[1:])) == size:
        return np.ascontiguousarray(array.reshape(len(array), *input_shape), dtype=dtype)
    shape = "x".join(map(str, input_shape))
    raise RunError(f"'{path}' holds an array of shape {array.shape}, which is neither one "
                   f"input of shape {shape} nor a batch of them",
                   f"reshape it to (N, {', '.join(map(str, input_shape))})")
