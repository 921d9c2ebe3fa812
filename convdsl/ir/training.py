"""Training settings: what a `train` line in a .cnn file and `convdsl train` set.

    train epochs=20 batch=100 optimizer=adam lr=0.01 schedule=cosine

A file's `train` lines give defaults for its network, as Darknet's [net] section
or a Caffe solver does; options on the command line override them. Every value is
checked here, once, so a bad value in a file gets a located error and a bad
value on the command line a plain one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convdsl.errors import ConvDslError, Span
from convdsl.ir import signatures as sig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64")
INITS = ("pytorch", "he", "glorot")


@dataclass(frozen=True)
class TrainSettings:
    """One training run's recipe. The defaults are PyTorch's where it has one."""

    epochs: int = 10
    batch: int = 32
    optimizer: str = "sgd"  # sgd (with momentum, optionally Nesterov), adam, adamw
    lr: float = 0.01
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # L2 added to the gradient; decoupled for adamw
    beta1: float = 0.9  # adam, adamw
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # constant, step (x gamma every step_size epochs), cosine
    step_size: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0  # where the cosine ends
    warmup: int = 0  # epochs of linear warm-up from lr/warmup-steps, before the schedule
    seed: int = 0  # initialisation, data order, validation split and dropout
    val_split: float = 0.1  # share of the training data held out for validation
    dtype: str = "float32"
    init: str = "pytorch"

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _whole(option: str, value: sig.Evaluated, span: Span | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(option, value, "a whole number of at least 0", span)
    return value


def _gamma(option: str, value: sig.Evaluated, span: Span | None) -> float:
    number = sig.positive_number(option, value, span)
    if number > 1:
        raise _invalid(option, value, "a number above 0 and at most 1", span)
    return number


def _invalid(option: str, value: sig.Evaluated, expected: str,
             span: Span | None) -> ConvDslError:
    return ConvDslError.single(f"invalid value '{sig.describe(value)}' for '{option}': "
                               f"expected {expected}", span)


# Each setting's check and conversion, shared by the file and the command line.
CONVERTERS: dict[str, sig.Converter] = {
    "epochs": sig.positive_int,
    "batch": sig.positive_int,
    "optimizer": sig.choice(*OPTIMIZERS),
    "lr": sig.positive_number,
    "momentum": sig.fraction,
    "nesterov": sig.boolean,
    "weight_decay": sig.non_negative_number,
    "beta1": sig.fraction,
    "beta2": sig.fraction,
    "eps": sig.positive_number,
    "schedule": sig.choice(*SCHEDULES),
    "step_size": sig.positive_int,
    "gamma": _gamma,
    "min_lr": sig.non_negative_number,
    "warmup": _whole,
    "seed": _whole,
    "val_split": sig.fraction,
    "dtype": sig.choice(*DTYPES),
    "init": sig.choice(*INITS),
}
assert set(CONVERTERS) == {field.name for field in dataclasses.fields(TrainSettings)}


def convert(option: str, value: sig.Evaluated, span: Span | None = None) -> Any:
    """One setting's value, checked; raises ConvDslError (located when span is given)."""
    return CONVERTERS[option](option, value, span)


def resolve(from_file: Mapping[str, Any], overrides: Mapping[str, Any]) -> TrainSettings:
    """The defaults, then the file's `train` lines, then the command line's options.
    Both mappings hold values already checked by `convert`."""
    return TrainSettings().replace(**{**from_file, **overrides})
