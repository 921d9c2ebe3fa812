"""Syntax tree to graph: expand blocks and repetitions, name every layer, resolve references.

Naming follows PyTorch's containers so that parameter names line up with
torchvision's: a named statement with one layer gives it the name
(`conv1`); a named chain numbers its links (`features.0`, `features.1`, as
nn.Sequential does); a block call opens a prefix (`layer1.0.conv1`).
Unnamed layers are called after their type (`relu_1`, `relu_2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from convdsl.errors import (
    ConvDslError,
    Diagnostic,
    Source,
    Span,
    did_you_mean,
    error,
    known_list,
    warning,
)
from convdsl.frontend import syntax as ast
from convdsl.ir import signatures as sig
from convdsl.ir import training
from convdsl.ir.graph import Graph
from convdsl.ir.ops import InputAttrs, Layer, Loss, Op, Output

MAX_REPEAT = 1000
# Far above real networks (ResNet-1001 has about 3,000 layers), low enough that
# checking a runaway repetition fails in well under a second.
MAX_LAYERS = 10_000
MAX_BLOCK_DEPTH = 32
BLOCK_INPUT = "input"  # inside a block, the name of whatever flows into it


@dataclass(frozen=True)
class Ref:
    """A layer named in the source, resolved once its whole scope is known."""

    scope: Scope
    name: str
    span: Span | None


Flow = str | Ref  # what flows into a layer: a layer's full name or a name to resolve


@dataclass(eq=False)
class Scope:
    prefix: str
    params: dict[str, sig.Evaluated]
    block_input: Flow | None = None
    names: dict[str, Flow] = field(default_factory=dict)
    declared: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    calls: tuple[str, ...] = ()  # the block calls that led here, to catch recursion
    context: tuple[str, ...] = ()  # where those calls are, innermost first, for errors

    @property
    def in_block(self) -> bool:
        return bool(self.calls)


@dataclass(frozen=True)
class _Draft:
    name: str
    op: Op
    attrs: object
    inputs: tuple[Flow, ...]
    span: Span | None
    option_spans: tuple[tuple[str, Span | None], ...]
    context: tuple[str, ...] = ()


@dataclass
class BuildResult:
    graph: Graph
    warnings: list[Diagnostic]
    training: dict[str, Any] = field(default_factory=dict)  # the `train` lines' settings


def build_graph(module: ast.Module, source: Source) -> BuildResult:
    return _Builder(module, source).build()


class _Builder:
    def __init__(self, module: ast.Module, source: Source) -> None:
        self.module = module
        self.source = source
        self.blocks: dict[str, ast.BlockDef] = {}
        self.drafts: list[_Draft] = []
        self.outputs: list[tuple[ast.OutputStmt, Loss, float]] = []
        self.network_name: str | None = None
        self.training: dict[str, Any] = {}
        self.training_spans: dict[str, Span | None] = {}  # where each setting was given
        self.top = Scope("", {})

    # --- the whole module -------------------------------------------------

    def build(self) -> BuildResult:
        if not self.module.statements:
            what = "is empty" if not self.source.text.strip() else "holds only comments"
            raise ConvDslError.single(
                f"no network here: the file {what}",
                # A span into no text: the file's name, and no line quoted.
                Span(Source(self.source.name, ""), 1, 1, 1, 1),
                hint="a network needs an input, layers and an output, as in "
                "'input 1x28x28', 'fc = flatten -> dense(10)', 'output fc'")
        self._collect_blocks()
        self._expand(self.module.lines, self.top)
        layers = self._resolve()
        graph = Graph(self.network_name or _stem(self.source.name))
        for layer in layers:
            graph.add(layer)
        graph.connect()
        self._check_cycles(graph)
        graph.outputs = self._outputs(graph)
        return BuildResult(graph, self._unused(graph), self.training)

    def _collect_blocks(self) -> None:
        for statement in self.module.statements:
            if not isinstance(statement, ast.BlockDef):
                continue
            if statement.name in self.blocks:
                raise ConvDslError.single(f"block '{statement.name}' is defined twice",
                                          statement.span, notes=[_first_at(
                                              self.blocks[statement.name].span)])
            if statement.name in sig.SIGNATURES:
                raise ConvDslError.single(
                    f"block '{statement.name}' has the name of a built-in layer type",
                    statement.span, hint="choose another name for the block")
            self.blocks[statement.name] = statement

    # --- statements in a scope --------------------------------------------

    def _expand(self, lines: tuple[ast.Line, ...], scope: Scope) -> Flow | None:
        statements = self._taken_branches(lines, scope)
        self._declare(statements, scope)
        current: Flow | None = scope.block_input
        for statement in statements:
            if isinstance(statement, ast.LayerStmt):
                current = self._chain(statement, scope, current)
            elif isinstance(statement, ast.BlockDef):
                if scope.in_block:
                    raise ConvDslError.single("blocks are defined at the top level, not inside "
                                              "another block", statement.span)
            elif scope.in_block:
                keyword = _keyword(statement)
                raise ConvDslError.single(f"'{keyword}' cannot appear inside a block",
                                          statement.span,
                                          hint=f"move the '{keyword}' line out of the block")
            elif isinstance(statement, ast.InputStmt):
                current = self._input(statement, scope)
            elif isinstance(statement, ast.OutputStmt):
                self._output(statement, scope)
            elif isinstance(statement, ast.TrainStmt):
                self._train(statement, scope)
            elif isinstance(statement, ast.NetworkStmt):
                if self.network_name is not None:
                    raise ConvDslError.single("the network is named twice", statement.span)
                self.network_name = statement.name
        return current

    def _taken_branches(self, lines: tuple[ast.Line, ...], scope: Scope) -> list[ast.Statement]:
        """The statements of a scope with each `if` replaced by the branch it takes."""
        out: list[ast.Statement] = []
        for statement in ast.statements_of(lines):
            if not isinstance(statement, ast.IfStmt):
                out.append(statement)
                continue
            if statement.condition not in scope.params:
                raise self._bad_condition(statement, scope)
            taken = sig.boolean(statement.condition, scope.params[statement.condition],
                                statement.condition_span)
            branch = statement.then if taken else (statement.otherwise or ())
            out.extend(self._taken_branches(branch, scope))
        return out

    @staticmethod
    def _bad_condition(statement: ast.IfStmt, scope: Scope) -> ConvDslError:
        condition = statement.condition
        if not scope.in_block:
            return ConvDslError.single(
                "'if' can only be used inside a block", statement.condition_span,
                hint=f"it tests a block parameter, as in block stage({condition}=no) "
                f"{{ if {condition} {{ ... }} }}")
        block = scope.calls[-1]
        known = sorted(scope.params)
        hint = did_you_mean(condition, known) or (
            f"'if' tests a parameter of the block; '{block}' has "
            + (", ".join(f"'{name}'" for name in known) if known else "none"))
        return ConvDslError.single(f"'{condition}' is not a parameter of block '{block}'",
                                   statement.condition_span, hint=hint)

    def _declare(self, statements: list[ast.Statement], scope: Scope) -> None:
        first_use: dict[str, Span | None] = {}
        for statement in statements:
            name, span = _declared_name(statement)
            if name is None:
                continue
            if name in first_use:
                raise ConvDslError.single(f"duplicate layer name '{name}'", span,
                                          notes=[_first_at(first_use[name])],
                                          hint="give each layer its own name")
            if scope.in_block and name == BLOCK_INPUT:
                raise ConvDslError.single(f"'{BLOCK_INPUT}' is reserved inside blocks", span,
                                          hint="it names what flows into the block")
            first_use[name] = span
        scope.declared = set(first_use)

    def _input(self, statement: ast.InputStmt, scope: Scope) -> str:
        name = statement.name or "input"
        problem = _shape_problem(statement.dims)
        if problem is not None:
            shape = "x".join(map(str, statement.dims))
            raise ConvDslError.single(
                f"invalid input shape {shape}: {problem}", self._shape_span(statement),
                hint="write channels, then 1 to 3 sizes: 1x40 (signal), 3x32x32 (image), "
                "1x16x32x32 (volume or video)")
        self._add(_Draft(name, Op.INPUT, InputAttrs(statement.dims), (), statement.span, ()))
        scope.names[name] = name
        return name

    def _shape_span(self, statement: ast.InputStmt) -> Span | None:
        """Just the sizes of an input statement: the digits and x's that end it."""
        span = statement.span
        if span is None:
            return None
        text = self.source.line(span.end_line)[:span.end_column - 1]
        start = len(text.rstrip("0123456789x"))
        if span.end_line != span.line or start >= len(text):
            return span
        return Span(span.source, span.line, start + 1, span.line, span.end_column)

    def _output(self, statement: ast.OutputStmt, scope: Scope) -> None:
        arguments = [sig.Argument(o.key, self._evaluate(o.value, scope), o.span)
                     for o in statement.options]
        options: dict[str, sig.Converter] = {
            "loss": sig.choice(*(loss.value for loss in Loss)), "weight": _loss_weight}
        signature = sig.Signature(Op.INPUT, (), options)
        keyword = "aux" if statement.aux else "output"
        values, _ = sig.bind(signature, keyword, arguments, statement.span)
        loss = Loss(values.get("loss", "cross_entropy"))
        self.outputs.append((statement, loss, values.get("weight", 1.0)))

    def _train(self, statement: ast.TrainStmt, scope: Scope) -> None:
        """Add one `train` line's settings. Several lines merge, but a setting may be
        given only once, so that no line silently overrides another."""
        if not statement.options:
            raise ConvDslError.single(
                "a 'train' line needs at least one setting", statement.span,
                hint="write settings as key=value, as in 'train epochs=20 lr=0.01'")
        for option in statement.options:
            key = option.key or ""  # options always have a key; "" is never a setting
            if key not in training.CONVERTERS:
                raise _unknown_setting(key, option.span)
            if key in self.training_spans:
                raise ConvDslError.single(
                    f"training setting '{key}' is given twice", option.span,
                    notes=[_first_given_at(self.training_spans[key])],
                    hint="give each setting once; a later 'train' line does not override "
                    "an earlier one")
            value = self._evaluate(option.value, scope)
            self.training[key] = training.convert(key, value, option.span)
            self.training_spans[key] = option.span

    # --- chains and calls -------------------------------------------------

    def _chain(self, statement: ast.LayerStmt, scope: Scope, current: Flow | None) -> Flow:
        elements = list(statement.chain)
        head = elements[0].call
        if self._is_reference(elements[0], scope):
            current = Ref(scope, head.op, head.span)
            elements.pop(0)
            if not elements:
                raise ConvDslError.single(
                    f"'{head.op}' names a layer, so this line adds no layer", head.span,
                    hint=f"follow it with a layer, as in {head.op} -> relu")
        follows_arrow = len(elements) < len(statement.chain)
        calls = [e.call for e in elements for _ in range(self._repeat(e, scope))]
        for index, call in enumerate(calls):
            if statement.name is not None:
                suffix = f".{index}" if len(calls) > 1 else ""
                name = f"{scope.prefix}{statement.name}{suffix}"
            else:
                name = self._auto_name(call.op, scope)
            current = self._call(call, scope, current, name, follows_arrow or index > 0)
        assert current is not None
        if statement.name is not None:
            scope.names[statement.name] = current
        return current

    def _is_reference(self, element: ast.Element, scope: Scope) -> bool:
        call = element.call
        if call.parens or element.repeat is not None:
            return False
        if scope.in_block and call.op == BLOCK_INPUT:
            return True
        return call.op in scope.declared

    def _repeat(self, element: ast.Element, scope: Scope) -> int:
        if element.repeat is None:
            return 1
        value = self._evaluate(element.repeat, scope)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEAT:
            raise ConvDslError.single(
                f"a repeat count must be a whole number from 1 to {MAX_REPEAT}, "
                f"not '{sig.describe(value)}'", element.repeat.span or element.span)
        return value

    def _auto_name(self, op: str, scope: Scope) -> str:
        while True:
            scope.counters[op] = scope.counters.get(op, 0) + 1
            local = f"{op}_{scope.counters[op]}"
            if local not in scope.declared:
                return scope.prefix + local

    def _call(self, call: ast.Call, scope: Scope, current: Flow | None, name: str,
              follows_arrow: bool) -> Flow:
        if call.op in self.blocks:
            return self._block_call(call, scope, current, name)
        signature = sig.SIGNATURES.get(call.op)
        if signature is None:
            raise self._unknown_call(call, scope, at_head=not follows_arrow)
        if signature.merges:
            inputs = self._merge_inputs(call, scope, current if follows_arrow else None)
            arguments = [a for a in call.args if a.key is not None]
        else:
            if current is None:
                raise ConvDslError.single(f"'{call.op}' has no input", call.span,
                                          hint="declare the input first, as in "
                                          "'input image: 1x28x28'")
            inputs = (current,)
            arguments = list(call.args)
        bound = [sig.Argument(a.key, self._evaluate(a.value, scope), a.span) for a in arguments]
        values, spans = sig.bind(signature, call.op, bound, call.span)
        attrs = sig.make_attrs(call.op, values)
        # Where each named input was written ("#0", "#1", ...), so that shape errors
        # can call it what the user called it rather than by its full name.
        written = [(f"#{i}", flow.span) for i, flow in enumerate(inputs) if isinstance(flow, Ref)]
        self._add(_Draft(name, signature.op, attrs, inputs, call.span,
                         (*spans.items(), *written), scope.context))
        return name

    def _merge_inputs(self, call: ast.Call, scope: Scope, current: Flow | None
                      ) -> tuple[Flow, ...]:
        inputs: list[Flow] = [current] if current is not None else []
        for argument in call.args:
            if argument.key is not None:
                continue
            if not isinstance(argument.value, ast.Word):
                raise ConvDslError.single(
                    f"'{call.op}' takes the names of layers, not values", argument.span,
                    hint=f"write {call.op}(a, b) with layer names")
            word = argument.value
            inputs.append(Ref(scope, word.name, word.span))
        if len(inputs) < 2:
            raise ConvDslError.single(
                f"'{call.op}' needs at least two inputs, got {len(inputs)}", call.span,
                hint=f"name the layers to join, as in {call.op}(a, b), or follow a layer "
                f"with -> {call.op}(b)")
        return tuple(inputs)

    def _block_call(self, call: ast.Call, scope: Scope, current: Flow | None,
                    name: str) -> Flow:
        block = self.blocks[call.op]
        if call.op in scope.calls:
            path = " -> ".join((*scope.calls, call.op))
            raise ConvDslError.single(f"block '{call.op}' calls itself ({path})", call.span,
                                      hint="blocks cannot be recursive")
        if len(scope.calls) >= MAX_BLOCK_DEPTH:
            raise ConvDslError.single(f"blocks nested more than {MAX_BLOCK_DEPTH} deep",
                                      call.span)
        if current is None:
            raise ConvDslError.single(f"block '{call.op}' has no input", call.span,
                                      hint="declare the input first")
        params = self._bind_block(block, call, scope)
        where = f" at line {call.span.line}" if call.span else ""
        note = f"in block '{call.op}', called as '{name}'{where}"
        child = Scope(name + ".", params, block_input=current, calls=(*scope.calls, call.op),
                      context=(note, *scope.context))
        try:
            out = self._expand(block.body, child)
        except ConvDslError as exc:
            raise exc.with_note(note) from None
        if out is current:
            raise ConvDslError.single(f"block '{call.op}' has no layers", block.span)
        assert out is not None
        return out

    def _bind_block(self, block: ast.BlockDef, call: ast.Call, scope: Scope
                    ) -> dict[str, sig.Evaluated]:
        params = {p.name: p for p in block.params}
        values: dict[str, sig.Evaluated] = {}
        positional = [a for a in call.args if a.key is None]
        if len(positional) > len(block.params):
            raise ConvDslError.single(
                f"too many arguments for block '{block.name}': it takes "
                f"{len(block.params)}", positional[len(block.params)].span,
                hint=_block_usage(block))
        for param, argument in zip(block.params, positional):
            values[param.name] = self._evaluate(argument.value, scope)
        for argument in call.args:
            if argument.key is None:
                continue
            if argument.key not in params:
                raise ConvDslError.single(
                    f"block '{block.name}' has no parameter '{argument.key}'", argument.span,
                    hint=did_you_mean(argument.key, params) or _block_usage(block))
            if argument.key in values:
                raise ConvDslError.single(f"parameter '{argument.key}' is given twice",
                                          argument.span)
            values[argument.key] = self._evaluate(argument.value, scope)
        for param in block.params:
            if param.name in values:
                continue
            if param.default is None:
                raise ConvDslError.single(
                    f"block '{block.name}' needs a value for '{param.name}'", call.span,
                    hint=_block_usage(block))
            values[param.name] = self._evaluate(param.default, Scope("", {}))
        return values

    def _unknown_call(self, call: ast.Call, scope: Scope, at_head: bool) -> ConvDslError:
        span = _name_span(call)
        types = [*sig.LAYER_TYPES, *self.blocks]
        what = "layer type or block" if self.blocks else "layer type"
        if call.op in scope.declared or (scope.in_block and call.op == BLOCK_INPUT):
            if at_head:  # a layer's name with arguments or a repeat count
                hint = f"to use the layer, write just '{call.op}'"
            else:
                hint = (f"only the start of a chain can name a layer; join layers with "
                        f"add({call.op}, ...) or concat({call.op}, ...)")
            return ConvDslError.single(f"'{call.op}' is a layer, not a {what}", span, hint=hint)
        if at_head and not call.parens:
            # A bare name at the start of a chain: a layer or a layer type was meant.
            hint = did_you_mean(call.op, [*types, *scope.declared]) or (
                f"check the spelling, or define the layer, as in '{call.op} = conv(16, 3)'")
            message = (f"'{call.op}' is not a layer, a layer type or a block" if self.blocks
                       else f"'{call.op}' is neither a layer nor a layer type")
            return ConvDslError.single(message, span, hint=hint)
        hint = did_you_mean(call.op, types) or known_list("layer types", sig.LAYER_TYPES)
        return ConvDslError.single(f"unknown {what} '{call.op}'", span, hint=hint)

    # --- values -----------------------------------------------------------

    def _evaluate(self, value: ast.Value, scope: Scope) -> sig.Evaluated:
        if isinstance(value, ast.Int):
            return value.value
        if isinstance(value, ast.Float):
            return value.value
        if isinstance(value, ast.Dims):
            return value.values
        if isinstance(value, ast.Word):
            return scope.params.get(value.name, value.name)
        if isinstance(value, ast.Neg):
            operand = self._evaluate(value.operand, scope)
            return -self._number(operand, value.operand)
        if isinstance(value, ast.BinOp):
            return self._arithmetic(value, scope)
        items = [self._evaluate(item, scope) for item in value.items]
        if value.scale is None:
            return items
        scale = self._number(self._evaluate(value.scale, scope), value.scale)
        if scale == 0:
            raise ConvDslError.single("a list divided by zero", value.scale.span)
        return _scale(items, scale, value)

    def _arithmetic(self, value: ast.BinOp, scope: Scope) -> int | float:
        left = self._number(self._evaluate(value.left, scope), value.left)
        right = self._number(self._evaluate(value.right, scope), value.right)
        if value.op == "+":
            result = left + right
        elif value.op == "-":
            result = left - right
        elif value.op == "*":
            result = left * right
        elif right == 0:
            raise ConvDslError.single("division by zero", value.span)
        elif isinstance(left, int) and isinstance(right, int) and left % right == 0:
            result = left // right
        else:
            result = left / right
        if isinstance(result, float) and not math.isfinite(result):  # as 1 / 1e-320 is
            raise ConvDslError.single("number too large", value.span)
        return result

    @staticmethod
    def _number(value: sig.Evaluated, node: ast.Value) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConvDslError.single(f"'{sig.describe(value)}' is not a number",
                                      getattr(node, "span", None),
                                      hint="arithmetic works on numbers and number parameters")
        if abs(value) > 1e18:
            raise ConvDslError.single("number too large", getattr(node, "span", None))
        return value

    # --- resolution and whole-graph checks --------------------------------

    def _add(self, draft: _Draft) -> None:
        if len(self.drafts) >= MAX_LAYERS:
            raise ConvDslError.single(f"the network has more than {MAX_LAYERS} layers",
                                      draft.span)
        self.drafts.append(draft)

    def _resolve(self) -> list[Layer]:
        problems: list[Diagnostic] = []
        layers = []
        for draft in self.drafts:
            inputs = []
            for flow in draft.inputs:
                resolved = self._resolve_flow(flow, problems)
                if resolved is not None:
                    inputs.append(resolved)
            layers.append(Layer(draft.name, draft.op, draft.attrs,  # type: ignore[arg-type]
                                tuple(inputs), draft.span, draft.option_spans,
                                draft.context))
        if problems:
            raise ConvDslError(problems)
        return layers

    def _resolve_flow(self, flow: Flow, problems: list[Diagnostic],
                      seen: frozenset[int] = frozenset()) -> str | None:
        while isinstance(flow, Ref):
            scope = flow.scope
            if scope.in_block and flow.name == BLOCK_INPUT:
                target = scope.block_input
            else:
                target = scope.names.get(flow.name)
            if target is None or id(flow) in seen:
                problems.append(self._undefined(flow))
                return None
            seen = seen | {id(flow)}
            flow = target
        return flow

    def _undefined(self, ref: Ref) -> Diagnostic:
        names = list(ref.scope.names)
        if ref.scope.in_block:
            names.append(BLOCK_INPUT)
        hint = did_you_mean(ref.name, names)
        if hint is None and ref.scope.in_block and ref.name in self.top.names:
            hint = (f"blocks see only their own layers and '{BLOCK_INPUT}'; pass "
                    f"'{ref.name}' in by calling the block after it")
        if hint is None and 0 < len(names) <= 12:  # few enough to list
            hint = "the layers here are " + ", ".join(f"'{name}'" for name in sorted(names))
        return error(f"undefined layer '{ref.name}'", ref.span, hint, ref.scope.context)

    def _check_cycles(self, graph: Graph) -> None:
        cycle = graph.find_cycle()
        if cycle is None:
            return
        path = " -> ".join([*cycle, cycle[0]])
        layer = graph.layer(cycle[0])
        raise ConvDslError.single(f"the layers form a cycle: {path}", layer.span,
                                  hint="a layer can only use layers computed before it")

    def _outputs(self, graph: Graph) -> list[Output]:
        outputs: list[Output] = []
        seen: dict[str, Span | None] = {}
        for statement, loss, weight in self.outputs:
            target = self.top.names.get(statement.name)
            if target is None:
                hint = did_you_mean(statement.name, self.top.names)
                raise ConvDslError.single(f"undefined layer '{statement.name}'",
                                          statement.name_span, hint=hint)
            assert isinstance(target, str)
            if target in seen:
                raise ConvDslError.single(f"'{statement.name}' is declared as an output twice",
                                          statement.span, notes=[_first_at(seen[target])])
            if graph.layer(target).op is Op.INPUT:
                raise ConvDslError.single(f"the input '{statement.name}' cannot be an output",
                                          statement.name_span)
            seen[target] = statement.span
            outputs.append(Output(target, loss, weight, statement.aux, statement.span))
        if not outputs:
            raise self._no_output()
        if all(output.aux for output in outputs):
            raise ConvDslError.single("the network has only auxiliary outputs",
                                      outputs[0].span,
                                      hint="declare the main result with 'output'")
        return outputs

    def _no_output(self) -> ConvDslError:
        """Points at the last layer written, the likely result, and names it in the hint."""
        layers = [s for s in self.module.statements if isinstance(s, ast.LayerStmt)]
        if layers and layers[-1].name is not None:
            last = layers[-1]
            return ConvDslError.single(
                "the network has no output", last.name_span,
                hint=f"declare the layer that gives the result, as in "
                f"'output {last.name} loss=cross_entropy'")
        line = max(1, len(self.source.text.rstrip().split("\n")))
        span = layers[-1].span if layers else Span(self.source, line, 1, line, 1)
        return ConvDslError.single(
            "the network has no output", span,
            hint="name the layer that gives the result and declare it, as in "
            "'fc = dense(10)' and 'output fc loss=cross_entropy'")

    def _unused(self, graph: Graph) -> list[Diagnostic]:
        outputs = {output.name for output in graph.outputs}
        return [warning(f"layer '{layer.name}' is never used", layer.span,
                        hint="use it, declare it as an output, or delete it")
                for layer in graph.layers()
                if not graph.consumers(layer.name) and layer.name not in outputs]


def _name_span(call: ast.Call) -> Span | None:
    """Just the called name, for errors about the name itself."""
    if call.span is None:
        return None
    end = call.span.column + len(call.op)
    return Span(call.span.source, call.span.line, call.span.column, call.span.line, end)


def _scale(items: list[sig.Evaluated], scale: int | float, node: ast.ListValue
           ) -> list[sig.Evaluated]:
    out: list[sig.Evaluated] = []
    for item in items:
        if isinstance(item, list):
            out.append(_scale(item, scale, node))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            if not math.isfinite(item / scale):
                raise ConvDslError.single("number too large in a scaled list", node.span)
            out.append(item / scale)
        else:
            raise ConvDslError.single(f"'{sig.describe(item)}' in a scaled list is not a "
                                      "number", node.span)
    return out


def _shape_problem(dims: tuple[int, ...]) -> str | None:
    if len(dims) < 2:
        return "it gives channels but no size"
    if len(dims) > 4:
        return f"it gives {len(dims) - 1} sizes after the channels, and at most 3 are allowed"
    if min(dims) < 1:
        return "every size, channels included, must be at least 1"
    if max(dims) > sig.MAX_SIZE:
        return f"sizes can be at most {sig.MAX_SIZE}"
    return None


def _loss_weight(option: str, value: sig.Evaluated, span: Span | None) -> float:
    return sig.non_negative_number(option, value, span)


def _unknown_setting(key: str, span: Span | None) -> ConvDslError:
    """The closest setting as the hint when there is one, and always the full list."""
    settings = known_list("training settings", training.CONVERTERS)
    close = did_you_mean(key, training.CONVERTERS)
    if close is None:
        return ConvDslError.single(f"unknown training setting '{key}'", span, hint=settings)
    return ConvDslError.single(f"unknown training setting '{key}'", span, hint=close,
                               notes=[settings])


def _first_given_at(span: Span | None) -> str:
    if span is None:
        return "first given earlier"
    return f"first given at {span.file}:{span.line}:{span.column}"


def _declared_name(statement: ast.Statement) -> tuple[str | None, Span | None]:
    if isinstance(statement, ast.LayerStmt):
        return statement.name, statement.name_span
    if isinstance(statement, ast.InputStmt):
        return statement.name or "input", statement.span
    return None, None


def _keyword(statement: ast.Statement) -> str:
    if isinstance(statement, ast.OutputStmt):
        return "aux" if statement.aux else "output"
    return {ast.InputStmt: "input", ast.NetworkStmt: "network",
            ast.TrainStmt: "train"}.get(type(statement), "statement")


def _first_at(span: Span | None) -> str:
    return f"first defined at line {span.line}" if span else "first defined earlier"


def _block_usage(block: ast.BlockDef) -> str:
    params = ", ".join(p.name if p.default is None else f"{p.name}=..." for p in block.params)
    return f"write {block.name}({params})"


def _stem(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] or "network"
