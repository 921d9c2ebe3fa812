"""The `convdsl` command: wiring only; the work happens in the modules it calls.

Exit status: 0 success, 1 an error in the user's input, 2 a usage error,
3 an internal error (a bug in convdsl; CONVDSL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from convdsl.errors import ConvDslError, Diagnostic
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import format_module
from convdsl.network import Network, load, read_source

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _print_diagnostics(diagnostics: Sequence[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        print(diagnostic.render(), file=sys.stderr)


def _load(path: str) -> Network:
    net = load(path)
    _print_diagnostics(net.warnings)
    return net


def cmd_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            net = _load(path)
        except ConvDslError as exc:
            _print_diagnostics(exc.diagnostics)
            status = EXIT_USER_ERROR
            continue
        if not args.quiet:
            print(f"{path}: ok ({net.name}: {len(net.graph)} layers, {net.params:,} params)")
    return status


def cmd_summary(args: argparse.Namespace) -> int:
    net = _load(args.file)
    if args.json:
        print(json.dumps(net.to_dict(), indent=2))
    else:
        from convdsl.report.summary import summary_table

        print(summary_table(net))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from convdsl.report.dot import to_dot, write_graph

    net = _load(args.file)
    if args.output is None or args.output == "-":
        sys.stdout.write(to_dot(net))
        return EXIT_OK
    print(write_graph(net, Path(args.output)))
    return EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        text = read_source(path)
        formatted = format_module(parse(text, path))
        if formatted == text:
            continue
        if args.check:
            print(f"{path}: would be reformatted", file=sys.stderr)
            status = EXIT_USER_ERROR
        elif args.stdout:
            sys.stdout.write(formatted)
        else:
            _write_atomically(Path(path), formatted)
            print(f"{path}: reformatted")
    return status


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.fmt-tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convdsl", description="Compile, check and inspect .cnn network descriptions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="check files; exit 0 or print the errors")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    check.set_defaults(run=cmd_check)

    summary = commands.add_parser("summary", help="layers, shapes, parameters and MACs")
    summary.add_argument("file", metavar="FILE")
    summary.add_argument("--json", action="store_true", help="one JSON object")
    summary.set_defaults(run=cmd_summary)

    graph = commands.add_parser("graph", help="the graph as DOT (or SVG/PNG with Graphviz)")
    graph.add_argument("file", metavar="FILE")
    graph.add_argument("-o", "--output", metavar="OUT",
                       help="file to write: .dot, or .svg/.png/.pdf rendered by Graphviz; "
                       "stdout when omitted")
    graph.set_defaults(run=cmd_graph)

    fmt = commands.add_parser("fmt", help="rewrite files in the canonical layout")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    mode = fmt.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a file is not formatted")
    mode.add_argument("--stdout", action="store_true", help="print instead of rewriting")
    fmt.set_defaults(run=cmd_fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConvDslError as exc:
        _print_diagnostics(exc.diagnostics)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("convdsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug: say so plainly, keep the traceback for debugging
        if os.environ.get("CONVDSL_DEBUG"):
            traceback.print_exc()
        print(f"convdsl: internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in convdsl; rerun with CONVDSL_DEBUG=1 to see the traceback",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
