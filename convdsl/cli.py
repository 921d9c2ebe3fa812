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

from convdsl.errors import ConvDslError, Diagnostic, RunError
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


def cmd_compile(args: argparse.Namespace) -> int:
    import time

    from convdsl.codegen import cache
    from convdsl.report.kernels import DUMPS, emit, kernel_sources, plan_lines
    from convdsl.runtime.executor import CompiledNetwork

    dumps = [d for d in args.dump.split(",") if d] if args.dump else []
    unknown = [d for d in dumps if d not in DUMPS]
    if unknown:
        print(f"convdsl compile: error: unknown dump {unknown[0]!r}; choose from "
              f"{', '.join(DUMPS)}", file=sys.stderr)
        return EXIT_USAGE
    net = _load(args.file)
    if "ast" in dumps:
        print(format_module(net.module), end="")
    if "graph" in dumps:
        from convdsl.report.summary import summary_table

        print(summary_table(net))
    start = time.perf_counter()
    compiled = CompiledNetwork(net, args.batch, args.dtype, args.algo)
    generated = time.perf_counter() - start
    first_run = compiled.warm_up()  # Numba compiles, or loads from its cache, here
    cold = time.perf_counter() - start
    start = time.perf_counter()
    compiled.warm_up()
    warm = time.perf_counter() - start
    compiled.compile_seconds = first_run
    print("\n".join(plan_lines(compiled)))
    if "plan" in dumps:
        for name, kernel in compiled.kernels.items():
            for spec in kernel.specs:
                print(f"{name}: {cache.source_path(spec).name} {spec.canonical()}")
    kernels = kernel_sources(compiled)
    print(f"{net.name}: {len(compiled.kernels)} layers, {len(kernels)} distinct kernels, "
          f"batch {args.batch}, {args.dtype}")
    print(f"cold: {cold:.2f} s (generate {generated:.2f} s, then compile or load from the "
          f"cache and run once); warm: {warm:.3f} s (a training step and an inference)")
    if "source" in dumps:
        for path in kernels.values():
            print(f"# ---- {path.name}")
            print(path.read_text(encoding="utf-8"), end="")
    if args.emit:
        written = emit(compiled, Path(args.emit))
        print(f"wrote {len(written)} files to {args.emit}")
    return EXIT_OK


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from convdsl.runtime.executor import CompiledNetwork
    from convdsl.runtime.gradcheck import TOLERANCE, gradcheck

    net = _load(args.file)
    compiled = CompiledNetwork(net, args.batch, "float64", args.algo)
    results = gradcheck(compiled, samples=args.samples, seed=args.seed)
    width = max(len(r.name) for r in results)
    for result in results:
        status = "ok" if result.ok else "FAIL"
        print(f"{result.name.ljust(width)}  {result.entries:4d} entries  worst relative "
              f"error {result.worst:.2e}  {status}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} arrays within {TOLERANCE:g}")
    return EXIT_USER_ERROR if failed else EXIT_OK


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

    compile_ = commands.add_parser(
        "compile", help="generate and compile the kernels; print one line per layer")
    compile_.add_argument("file", metavar="FILE")
    _add_compile_options(compile_)
    compile_.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    compile_.add_argument("--emit", metavar="DIR", help="write the generated source to DIR")
    compile_.add_argument("--dump", metavar="WHAT",
                          help="print ast, graph, plan and/or source (comma-separated)")
    compile_.set_defaults(run=cmd_compile)

    check_grads = commands.add_parser(
        "gradcheck", help="finite-difference check of every gradient, in float64")
    check_grads.add_argument("file", metavar="FILE")
    _add_compile_options(check_grads, batch=2)
    check_grads.add_argument("--samples", type=_positive, default=12, metavar="K",
                             help="entries checked per array (default 12)")
    check_grads.add_argument("--seed", type=int, default=0)
    check_grads.set_defaults(run=cmd_gradcheck)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _add_compile_options(parser: argparse.ArgumentParser, batch: int = 1) -> None:
    parser.add_argument("--batch", type=_positive, default=batch, metavar="N",
                        help=f"batch size the kernels are specialised for (default {batch})")
    parser.add_argument("--algo", choices=("auto", "direct", "gemm", "fft"),
                        help="convolution algorithm for every layer, overriding the file")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConvDslError as exc:
        _print_diagnostics(exc.diagnostics)
        return EXIT_USER_ERROR
    except RunError as exc:
        print(f"convdsl: error: {exc}", file=sys.stderr)
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
