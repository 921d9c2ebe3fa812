"""Syntax tree back to canonical .cnn text (what `convdsl fmt` writes).

The canonical form: one statement per line, four-space indentation in blocks,
`key=value` without spaces, comments kept, runs of blank lines collapsed to one,
and chains longer than the line width broken before each "->".
"""

from __future__ import annotations

from convdsl.frontend import syntax as ast

INDENT = "    "
LINE_WIDTH = 88
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_module(module: ast.Module) -> str:
    return "".join(line + "\n" for line in _lines(module.lines, 0))


def format_value(value: ast.Value) -> str:
    if isinstance(value, ast.Int):
        return str(value.value)
    if isinstance(value, ast.Float):
        return value.text
    if isinstance(value, ast.Dims):
        return "x".join(str(v) for v in value.values)
    if isinstance(value, ast.Word):
        return value.name
    if isinstance(value, ast.Neg):
        inner = format_value(value.operand)
        return f"-({inner})" if isinstance(value.operand, (ast.BinOp, ast.Neg)) else f"-{inner}"
    if isinstance(value, ast.BinOp):
        return _format_binop(value)
    return _format_list(value)


def _format_binop(node: ast.BinOp) -> str:
    level = _PRECEDENCE[node.op]
    left = format_value(node.left)
    right = format_value(node.right)
    if isinstance(node.left, ast.BinOp) and _PRECEDENCE[node.left.op] < level:
        left = f"({left})"
    if isinstance(node.right, ast.BinOp) and _PRECEDENCE[node.right.op] <= level:
        right = f"({right})"
    return f"{left} {node.op} {right}"


def _format_list(node: ast.ListValue) -> str:
    text = "[" + " ".join(format_value(item) for item in node.items) + "]"
    if node.scale is None:
        return text
    scale = format_value(node.scale)
    if isinstance(node.scale, (ast.BinOp, ast.Neg, ast.ListValue)):
        scale = f"({scale})"
    return f"{text} / {scale}"


def format_call(call: ast.Call) -> str:
    if not call.parens:
        return call.op
    args = ", ".join(
        format_value(arg.value) if arg.key is None else f"{arg.key}={format_value(arg.value)}"
        for arg in call.args
    )
    return f"{call.op}({args})"


def _format_element(element: ast.Element) -> str:
    text = format_call(element.call)
    if element.repeat is not None:
        text += f" * {format_value(element.repeat)}"
    return text


def _format_statement(statement: ast.Statement, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(statement, ast.NetworkStmt):
        return [f"{pad}network {statement.name}"]
    if isinstance(statement, ast.InputStmt):
        dims = "x".join(str(d) for d in statement.dims)
        name = f"{statement.name}: " if statement.name is not None else ""
        return [f"{pad}input {name}{dims}"]
    if isinstance(statement, ast.LayerStmt):
        return _format_layer(statement, pad)
    if isinstance(statement, ast.OutputStmt):
        keyword = "aux" if statement.aux else "output"
        return [f"{pad}{keyword} {statement.name}{_format_options(statement.options)}"]
    if isinstance(statement, ast.TrainStmt):
        return [f"{pad}train{_format_options(statement.options)}"]
    if isinstance(statement, ast.BlockDef):
        params = ", ".join(
            p.name if p.default is None else f"{p.name}={format_value(p.default)}"
            for p in statement.params
        )
        return [f"{pad}block {statement.name}({params}) {{",
                *_lines(statement.body, depth + 1), f"{pad}}}"]
    lines = [f"{pad}if {statement.condition} {{", *_lines(statement.then, depth + 1)]
    if statement.otherwise is not None:
        lines += [f"{pad}}} else {{", *_lines(statement.otherwise, depth + 1)]
    return [*lines, f"{pad}}}"]


def _format_options(options: tuple[ast.Arg, ...]) -> str:
    """` key=value` for each option of an output or train line."""
    return "".join(f" {o.key}={format_value(o.value)}" for o in options)


def _format_layer(statement: ast.LayerStmt, pad: str) -> list[str]:
    head = f"{pad}{statement.name} = " if statement.name is not None else pad
    parts = [_format_element(e) for e in statement.chain]
    one_line = head + " -> ".join(parts)
    if len(one_line) <= LINE_WIDTH or len(parts) == 1:
        return [one_line]
    return [head + parts[0], *(f"{pad}{INDENT}-> {part}" for part in parts[1:])]


def _lines(lines: tuple[ast.Line, ...], depth: int) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line.statement is None:
            if line.comment is None:
                out.append("")
            else:
                out.append(INDENT * depth + _comment(line.comment))
            continue
        text = _format_statement(line.statement, depth)
        if line.comment is not None:
            text[-1] += "  " + _comment(line.comment)
        out.extend(text)
    return out


def _comment(text: str) -> str:
    return f"# {text}" if text else "#"
