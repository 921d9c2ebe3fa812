"""What each layer call accepts: positional order, options, defaults and value checks.

Values reach this module already evaluated (block parameters substituted,
arithmetic done). Every check raises a located error that names the option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from convdsl.errors import ConvDslError, Span, did_you_mean, known_list
from convdsl.ir import ops
from convdsl.ir.ops import Activation, ActSpec, Op, Padding, PadMode

__all__ = ["LAYER_TYPES", "SIGNATURES", "Argument", "Evaluated", "Signature", "bind",
           "known_list", "make_attrs"]

# The largest size, channel count or padding accepted: what 32-bit indices hold,
# as the frameworks that run these networks need.
MAX_SIZE = 2**31 - 1

# An evaluated value: a number, a word, sizes (3x3) or a (nested) list.
Evaluated = int | float | str | tuple[int, ...] | list[Any]


@dataclass(frozen=True)
class Argument:
    key: str | None
    value: Evaluated
    span: Span | None


def describe(value: Evaluated) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, list):
        return "[" + " ".join(describe(v) for v in value) + "]"
    return str(value)


def _fail(option: str, value: Evaluated, expected: str, span: Span | None,
          hint: str | None = None) -> ConvDslError:
    return ConvDslError.single(f"invalid value '{describe(value)}' for '{option}': "
                               f"expected {expected}", span, hint)


# --- value converters: (option name, value, span) -> typed value -------------

Converter = Callable[[str, Evaluated, Span | None], Any]


def positive_int(option: str, value: Evaluated, span: Span | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(option, value, "a whole number of at least 1", span)
    if value > MAX_SIZE:
        raise _fail(option, value, f"a whole number from 1 to {MAX_SIZE}", span)
    return value


def sizes(minimum: int) -> Converter:
    """One whole number per spatial axis (3 or 3x3), or one for all axes."""

    def convert(option: str, value: Evaluated, span: Span | None) -> tuple[int, ...]:
        values = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if len(numbers) != len(values) or len(numbers) > 3 or min(numbers) < minimum:
            raise _fail(option, value, f"sizes of at least {minimum}, such as 3 or 3x3", span)
        if max(numbers) > MAX_SIZE:
            raise _fail(option, value, f"sizes from {minimum} to {MAX_SIZE}", span)
        return tuple(numbers)

    return convert


def fraction(option: str, value: Evaluated, span: Span | None) -> float:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise _fail(option, value, "a number from 0 up to (not including) 1", span)
    return float(value)


def positive_number(option: str, value: Evaluated, span: Span | None) -> float:
    if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise _fail(option, value, "a positive number", span)
    return float(value)


def non_negative_number(option: str, value: Evaluated, span: Span | None) -> float:
    # A negative leaky slope would make the activation non-monotonic, and its
    # derivative could no longer be read off its output, which the kernels do.
    if not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise _fail(option, value, "a number of at least 0", span)
    return float(value)


_TRUE = {"yes", "true", "on"}
_FALSE = {"no", "false", "off"}


def boolean(option: str, value: Evaluated, span: Span | None) -> bool:
    if isinstance(value, list):  # unhashable, so never in the sets below
        raise _fail(option, value, "yes or no (also true/false, on/off)", span)
    if value in _TRUE or value == 1:
        return True
    if value in _FALSE or value == 0:
        return False
    raise _fail(option, value, "yes or no (also true/false, on/off)", span)


def choice(*words: str) -> Converter:
    def convert(option: str, value: Evaluated, span: Span | None) -> str:
        if not isinstance(value, str) or value not in words:
            hint = did_you_mean(str(value), words) if isinstance(value, str) else None
            raise _fail(option, value, "one of " + ", ".join(words), span, hint)
        return value

    return convert


ACTIVATION_NAMES = tuple(a.value for a in Activation)


def activation(option: str, value: Evaluated, span: Span | None) -> ActSpec:
    if value == "none":
        return ActSpec(Activation.IDENTITY)
    return ActSpec(Activation(choice(*ACTIVATION_NAMES)(option, value, span)))


def padding(option: str, value: Evaluated, span: Span | None) -> Padding:
    """valid, same, full, one number, one per axis (1x2), or [before after ...] per axis."""
    if isinstance(value, str):
        mode = choice("valid", "same", "full")(option, value, span)
        return Padding(PadMode(mode))
    if _too_large(value):
        raise _fail(option, value, f"padding of at most {MAX_SIZE}", span)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Padding(PadMode.EXPLICIT, ((value, value),))
    if isinstance(value, tuple):
        return Padding(PadMode.EXPLICIT, tuple((v, v) for v in value))
    if (isinstance(value, list) and value and len(value) % 2 == 0 and len(value) <= 6
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return Padding(PadMode.EXPLICIT, tuple(zip(value[::2], value[1::2])))
    raise _fail(option, value, "valid, same, full, a number, sizes such as 1x2, "
                "or [before after] per axis", span)


def _too_large(value: Evaluated) -> bool:
    values = value if isinstance(value, (tuple, list)) else [value]
    return any(isinstance(v, int) and v > MAX_SIZE for v in values)


def pool_padding(option: str, value: Evaluated, span: Span | None) -> tuple[int, ...]:
    if value == "valid":
        return (0,)
    if isinstance(value, str):
        raise _fail(option, value, "valid, a number such as 1, or sizes such as 1x0", span,
                    hint="'same' and 'full' are for conv and filter; pooling pads explicitly"
                    if value in ("same", "full") else did_you_mean(value, ["valid"]))
    padding: tuple[int, ...] = sizes(0)(option, value, span)
    return padding


def kernel_values(option: str, value: Evaluated, span: Span | None) -> tuple[tuple[float, ...],
                                                                          tuple[int, ...]]:
    """A fixed kernel: a flat or nested list of numbers; returns (values, nesting shape)."""
    if not isinstance(value, list) or not value:
        raise _fail(option, value, "a list of numbers such as [1 4 6 4 1] / 16", span)
    shape = _nesting(value)
    if shape is None:
        raise _fail(option, value, "a list of numbers, or equal-length nested lists", span)
    if len(shape) > 3:
        raise _fail(option, value, "a list nested at most 3 deep, one level per axis", span)
    flat = _flatten(value)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in flat):
        raise _fail(option, value, "numbers only", span)
    return tuple(float(v) for v in flat), (shape if len(shape) > 1 else ())


def _nesting(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list):
        return ()
    inner = {_nesting(v) for v in value}
    if len(inner) != 1 or None in inner:
        return None
    (shape,) = inner
    return (len(value), *shape)  # type: ignore[misc]


def _flatten(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    return [x for v in value for x in _flatten(v)]


# --- call signatures --------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    op: Op
    positional: tuple[str, ...]
    options: dict[str, Converter]
    required: tuple[str, ...] = ()
    # Merge layers take layer names as positional arguments instead of values.
    merges: bool = False


_CONV_OPTIONS: dict[str, Converter] = {
    "stride": sizes(1), "pad": padding, "dilation": sizes(1), "mode": choice(
        "correlation", "convolution"), "act": activation,
}
_POOL_OPTIONS: dict[str, Converter] = {
    "stride": sizes(1), "pad": pool_padding, "round": choice("floor", "ceil"),
}

SIGNATURES: dict[str, Signature] = {
    "conv": Signature(Op.CONV, ("channels", "window"), {
        "channels": positive_int, "window": sizes(1), **_CONV_OPTIONS,
        "groups": positive_int, "bias": boolean,
        # convdsl.codegen.cost.CHOICES (the language does not import the code generator)
        "algo": choice("auto", "tune", "direct", "gemm", "fft", "winograd"),
    }, required=("channels", "window")),
    "filter": Signature(Op.FILTER, ("window",), {
        "window": sizes(1), "kernel": kernel_values, **_CONV_OPTIONS,
    }, required=("window", "kernel")),
    "maxpool": Signature(Op.MAXPOOL, ("window",), {
        "window": sizes(1), **_POOL_OPTIONS, "dilation": sizes(1)}, required=("window",)),
    "avgpool": Signature(Op.AVGPOOL, ("window",), {
        "window": sizes(1), **_POOL_OPTIONS, "count_pad": boolean}, required=("window",)),
    "softpool": Signature(Op.SOFTPOOL, ("window",), {
        "window": sizes(1), **_POOL_OPTIONS}, required=("window",)),
    "global_maxpool": Signature(Op.GLOBAL_MAXPOOL, (), {}),
    "global_avgpool": Signature(Op.GLOBAL_AVGPOOL, (), {}),
    "bn": Signature(Op.BATCHNORM, (), {
        "eps": positive_number, "momentum": fraction, "affine": boolean, "act": activation}),
    "dropout": Signature(Op.DROPOUT, ("p",), {"p": fraction}),
    "flatten": Signature(Op.FLATTEN, (), {}),
    "dense": Signature(Op.DENSE, ("units",), {
        "units": positive_int, "bias": boolean, "act": activation}, required=("units",)),
    "concat": Signature(Op.CONCAT, (), {"act": activation}, merges=True),
    "add": Signature(Op.ADD, (), {"act": activation}, merges=True),
}
for _act in Activation:
    _options: dict[str, Converter] = {}
    _positional: tuple[str, ...] = ()
    if _act is Activation.LEAKY_RELU:
        _options, _positional = {"slope": non_negative_number}, ("slope",)
    elif _act is Activation.ELU:
        _options, _positional = {"alpha": positive_number}, ("alpha",)
    SIGNATURES[_act.value] = Signature(Op.ACTIVATION, _positional, _options)

LAYER_TYPES = tuple(SIGNATURES)


def bind(signature: Signature, op_name: str, arguments: list[Argument],
         call_span: Span | None) -> tuple[dict[str, Any], dict[str, Span | None]]:
    """Match arguments to option names, convert them, and report what is wrong."""
    values: dict[str, Any] = {}
    spans: dict[str, Span | None] = {}
    positional = [a for a in arguments if a.key is None]
    if len(positional) > len(signature.positional):
        extra = positional[len(signature.positional)]
        if not signature.options:
            raise ConvDslError.single(f"'{op_name}' takes no arguments", extra.span,
                                      hint=f"write just '{op_name}'")
        takes = (f"takes {len(signature.positional)} positional argument"
                 f"{'s' if len(signature.positional) != 1 else ''}")
        names = ", ".join(signature.positional)
        raise ConvDslError.single(
            f"too many arguments for '{op_name}': it {takes}" + (f" ({names})" if names else ""),
            extra.span, hint=_extra_hint(op_name, signature))
    for name, argument in zip(signature.positional, positional):
        values[name], spans[name] = argument.value, argument.span
    for argument in arguments:
        if argument.key is None:
            continue
        key = argument.key
        if key not in signature.options:
            hint = did_you_mean(key, signature.options) or (
                known_list(f"options of '{op_name}'", signature.options)
                if signature.options else f"'{op_name}' takes no options")
            raise ConvDslError.single(f"unknown option '{key}' for '{op_name}'",
                                      argument.span, hint=hint)
        if key in values:
            raise ConvDslError.single(f"option '{key}' is given twice", argument.span)
        values[key], spans[key] = argument.value, argument.span
    for name in signature.required:
        if name not in values:
            raise ConvDslError.single(f"'{op_name}' needs a value for '{name}'", call_span,
                                      hint=_usage(op_name, signature))
    converted = {k: signature.options[k](k, v, spans[k]) for k, v in values.items()}
    return converted, spans


def _extra_hint(op_name: str, signature: Signature) -> str:
    """What to write instead of one positional argument too many."""
    named = [k for k in signature.options if k not in signature.positional]
    if not named:
        return _usage(op_name, signature)
    example = "stride=2" if "stride" in named else f"{named[0]}=..."
    return f"name the option, as in {example}"


def _usage(op_name: str, signature: Signature) -> str:
    args = [*signature.positional, *(f"{k}=..." for k in signature.options
                                     if k not in signature.positional)]
    return f"write {op_name}({', '.join(args)})"


def make_attrs(op_name: str, values: dict[str, Any]) -> ops.Attrs:
    """Typed payload of a layer from its bound, converted options."""
    signature = SIGNATURES[op_name]
    op = signature.op
    flip = values.get("mode") == "convolution"
    pad = values.get("pad", Padding(PadMode.VALID))
    act = values.get("act")
    if op is Op.CONV:
        return ops.ConvAttrs(values["channels"], values["window"], values.get("stride", (1,)),
                             pad, values.get("dilation", (1,)), values.get("groups", 1),
                             values.get("bias", True), flip, act, values.get("algo", "auto"))
    if op is Op.FILTER:
        kernel, shape = values["kernel"]
        return ops.FilterAttrs(values["window"], kernel, shape, values.get("stride", (1,)),
                               pad, values.get("dilation", (1,)), flip, act)
    if op in (Op.MAXPOOL, Op.AVGPOOL, Op.SOFTPOOL):
        return ops.PoolAttrs(values["window"], values.get("stride"), values.get("pad", (0,)),
                             values.get("dilation", (1,)), values.get("round") == "ceil",
                             values.get("count_pad", True))
    if op is Op.ACTIVATION:
        return ops.ActivationAttrs(ActSpec(Activation(op_name), values.get("slope", 0.01),
                                           values.get("alpha", 1.0)))
    if op is Op.BATCHNORM:
        return ops.BatchNormAttrs(values.get("eps", 1e-5), values.get("momentum", 0.1),
                                  values.get("affine", True), act)
    if op is Op.DROPOUT:
        return ops.DropoutAttrs(values.get("p", 0.5))
    if op is Op.DENSE:
        return ops.DenseAttrs(values["units"], values.get("bias", True), act)
    if op in (Op.CONCAT, Op.ADD):
        return ops.MergeAttrs(act)
    return ops.NoAttrs()
