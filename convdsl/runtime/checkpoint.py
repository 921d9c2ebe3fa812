"""Checkpoints: a training run's weights, optimizer state and position, in one .npz.

A checkpoint is a NumPy zip archive (never a pickle, so loading one cannot run
code) holding

    param/<name>   every parameter and buffer, by PyTorch name
    optim/<name>   the optimizer's state (momentum buffers, Adam moments, step)
    meta           a JSON document as UTF-8 bytes: format, version, the network's
                   name and fingerprint, the position (epoch, batch, step) and
                   anything else the trainer keeps (metrics so far, settings)

It is written atomically: to a temporary file in the same folder, flushed and
synced to disk, then renamed over the old one. A kill at any moment leaves
either the old checkpoint or the new one, whole. Loading reads every array
(the zip's checksums catch a damaged file) and refuses anything that is not a
complete checkpoint with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convdsl.errors import RunError
from convdsl.network import Network

FORMAT = "convdsl-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.npz"  # the name inside a run folder


class CheckpointError(RunError):
    """A checkpoint that cannot be used: damaged, not a checkpoint, or for another network."""


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def fingerprint(network: Network) -> str:
    """A hash of what the network computes (layers, options, wiring, outputs), not of
    how its file is written: comments, layout and train lines do not change it."""
    parts = [repr(sorted(network.input_shapes.items()))]
    parts += [repr((layer.name, layer.op.value, layer.attrs, layer.inputs))
              for layer in network.layers]
    parts += [repr((o.name, o.loss.value, o.weight, o.aux)) for o in network.outputs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- writing ---------------------------------------------------------------

def save(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` atomically."""
    meta = {"format": FORMAT, "version": VERSION, **checkpoint.meta}
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(
        json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
    arrays.update({f"param/{name}": np.asarray(a) for name, a in checkpoint.params.items()})
    arrays.update({f"optim/{name}": np.asarray(a) for name, a in checkpoint.optimizer.items()})
    savez: Any = np.savez  # its stubs take the arrays' names for its own keywords
    write_atomically(Path(path), lambda handle: savez(handle, **arrays))


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file (configuration, metrics) atomically."""
    write_atomically(Path(path), lambda handle: handle.write(text.encode()))


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(handle)` on a temporary file beside `path`, sync it, rename it over
    `path`, then sync the folder so that the rename itself survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rename is still atomic
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- reading ---------------------------------------------------------------

def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint, or a plain .npz of arrays by parameter name (weights saved
    by another tool). Raises CheckpointError for anything damaged or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'",
                              "give a run folder written by `convdsl train`, or a .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"'{path}' is not a readable checkpoint: it is truncated or "
                              f"damaged ({_reason(exc)})",
                              "use an earlier copy, or train again; a run's checkpoint is "
                              "only ever replaced whole, so this file was changed by "
                              "something else") from None
    if "meta" not in arrays:  # plain weights, as np.savez(path, **state_dict) writes them
        return Checkpoint(params=arrays, meta={"format": "weights"})
    meta = _read_meta(path, arrays.pop("meta"))
    params = {name[len("param/"):]: a for name, a in arrays.items() if name.startswith("param/")}
    optim = {name[len("optim/"):]: a for name, a in arrays.items() if name.startswith("optim/")}
    return Checkpoint(params, optim, meta)


def _read_meta(path: Path, raw: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' holds a 'meta' entry that is not a convdsl "
                              "checkpoint's", "was it written by another program?")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"'{path}' is a checkpoint of format version "
                              f"{meta.get('version')}, and this convdsl reads version {VERSION}")
    return meta


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


# --- fitting a network ------------------------------------------------------

def check_fits(checkpoint: Checkpoint, network: Network, params: Mapping[str, np.ndarray],
               source: str) -> None:
    """Refuse a checkpoint whose arrays do not match the network's, naming the first
    differences, before anything is loaded."""
    saved_for = checkpoint.meta.get("network")
    missing = [name for name in params if name not in checkpoint.params]
    unexpected = [name for name in checkpoint.params if name not in params]
    wrong = [f"'{name}' is {tuple(checkpoint.params[name].shape)} there but "
             f"{tuple(array.shape)} here"
             for name, array in params.items()
             if name in checkpoint.params and checkpoint.params[name].shape != array.shape]
    problems = ([f"missing {_names(missing)}"] if missing else []) + (
        [f"unexpected {_names(unexpected)}"] if unexpected else []) + wrong[:3]
    if problems:
        trained_on = f" (it was saved from network '{saved_for}')" if saved_for else ""
        raise CheckpointError(f"the weights in '{source}' do not fit network "
                              f"'{network.name}'{trained_on}: " + "; ".join(problems),
                              "load weights saved from this network")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")
