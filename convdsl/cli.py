"""The `convdsl` command: wiring only; the work happens in the modules it calls.

Exit status: 0 success, 1 an error in the user's input, 2 a usage error,
3 an internal error (a bug in convdsl; CONVDSL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from convdsl.codegen.cost import CHOICES as ALGORITHM_CHOICES
from convdsl.errors import ConvDslError, Diagnostic, RunError
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import format_module
from convdsl.ir import training
from convdsl.ir.training import TrainSettings
from convdsl.network import Network, load, read_source
from convdsl.runtime.checkpoint import write_text
from convdsl.runtime.devices import DEVICES

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
    from convdsl.report.summary import summary_dict, summary_table

    net = _load(args.file)
    if args.json:
        print(json.dumps(summary_dict(net, args.batch, args.dtype), indent=2))
    else:
        print(summary_table(net, args.batch, args.dtype))
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
            write_text(path, formatted)
            print(f"{path}: reformatted")
    return status


def cmd_compile(args: argparse.Namespace) -> int:
    import time

    from convdsl.codegen import cache, parallel
    from convdsl.report.kernels import DUMPS, concat_lines, emit, kernel_sources, plan_lines
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
    compiled = CompiledNetwork(net, args.batch, args.dtype, args.algo, fuse=not args.no_fuse,
                               device=args.device)
    generated = time.perf_counter() - start
    # Kernels without machine code compile in worker processes where there are cores
    # for them; the warm-up then loads them (and compiles anything left), timing each
    # layer's first run.
    workers = parallel.compile_cold_stages(compiled)
    in_workers = time.perf_counter() - start - generated
    first_run = compiled.warm_up()
    parallel.remember(compiled)
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
    fused = [stage.description for stage in compiled.stages if stage.description]
    if fused:
        print(f"fused groups ({len(fused)}): " + "; ".join(fused))
    joined = concat_lines(compiled)
    if joined:
        print(f"written into concatenations in inference ({len(joined)}): " + "; ".join(joined))
    if any(stage.kernel.reason.startswith("estimated") for stage in compiled.stages):
        from convdsl.report.calibration import rates_in_use

        print(f"algorithms chosen by the cost model, rates {rates_in_use()} "
              "(`convdsl calibrate --show`)")
    print(f"{net.name}: {len(compiled.network.layers) - len(net.input_shapes)} layers in "
          f"{len(compiled.stages)} stages, {len(kernels)} distinct kernels, "
          f"batch {args.batch}, {args.dtype}, {args.device}")
    steps = (f"compile in {workers} worker processes {in_workers:.2f} s, then load and run "
             "once" if workers else "then compile or load from the cache and run once")
    print(f"cold: {cold:.2f} s (generate {generated:.2f} s, {steps}); warm: {warm:.3f} s "
          "(a training step and an inference)")
    if "source" in dumps:
        for path in kernels.values():
            print(f"# ---- {path.name}")
            print(path.read_text(encoding="utf-8"), end="")
    if args.emit:
        written = emit(compiled, Path(args.emit))
        print(f"wrote {len(written)} files to {args.emit}")
    return EXIT_OK


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from convdsl.codegen import parallel
    from convdsl.runtime.executor import CompiledNetwork
    from convdsl.runtime.gradcheck import TOLERANCE, gradcheck

    net = _load(args.file)
    compiled = CompiledNetwork(net, args.batch, "float64", args.algo, fuse=not args.no_fuse)
    parallel.compile_cold_stages(compiled)  # the rest compiles at first use
    results = gradcheck(compiled, samples=args.samples, seed=args.seed)
    width = max(len(r.name) for r in results)
    for result in results:
        status = "ok" if result.ok else "FAIL"
        print(f"{result.name.ljust(width)}  {result.entries:4d} entries  worst relative "
              f"error {result.worst:.2e}  {status}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} arrays within {TOLERANCE:g}")
    return EXIT_USER_ERROR if failed else EXIT_OK


def cmd_time(args: argparse.Namespace) -> int:
    from convdsl.report.timing import time_network, timing_table
    from convdsl.runtime.executor import compile as compile_network

    if args.kernels and args.device != "cuda":
        raise RunError("--kernels times the launches of the CUDA target one by one",
                       "add --device cuda; on the CPU the stage table is the finest there is")
    net = _load(args.file)
    # By default, the batch the file trains with, since that is the step worth timing.
    batch = args.batch or net.training.get("batch", TrainSettings().batch)
    compiled = compile_network(net, batch=batch, dtype=args.dtype, algo=args.algo,
                               fuse=not args.no_fuse, device=args.device)
    timing = time_network(compiled, iterations=args.iterations, kernels=args.kernels)
    if args.json:
        print(json.dumps(timing.to_dict(), indent=2))
    else:
        print(timing_table(timing))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from convdsl.codegen import cost
    from convdsl.report.calibration import built_in_forced, calibration_lines, rates_in_use

    built_in = built_in_forced()
    if args.show:
        stored = None if built_in else cost.stored_rates()
        print(f"cost model rates: {rates_in_use()}")
        print("\n".join(calibration_lines(stored or cost.DEFAULT_RATES)))
        return EXIT_OK
    if built_in:
        raise RunError(f"{cost.NO_CALIBRATE} is set, so compiles use the built-in rates and "
                       "would ignore a measurement", f"unset {cost.NO_CALIBRATE} to measure")
    rates = cost.measure()
    if rates is None:
        raise RunError("the measurements looked disturbed by other work; nothing was kept",
                       "measure again when the machine is idle")
    print(f"cost model rates: {rates_in_use()}")
    print("\n".join(calibration_lines(rates)))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from convdsl.runtime import runs

    net = _load(args.file)
    out = Path(args.out) if args.out else Path("runs") / net.name
    overrides = {name: getattr(args, name) for name in SETTING_NAMES
                 if getattr(args, name) is not None}
    trainer = runs.prepare(net, args.file, args.data, overrides, out, args.resume, args.algo,
                           progress=False if args.no_progress else None,
                           fuse=not args.no_fuse, device=args.device)
    runs.compile_for_run(trainer)
    from convdsl.runtime.training import Interrupted

    try:
        history = trainer.train()
    except Interrupted:
        print(f"interrupted: saved the run at epoch {trainer.position.epoch + 1}, batch "
              f"{trainer.position.batch} in '{out}'; continue with --resume", file=sys.stderr)
        return 130
    last = history[-1] if history else None
    if last is not None:
        print(f"done: {len(history)} epochs in '{out}'"
              + (f", validation accuracy {last['val_accuracy']:.2%}"
                 if last.get("val_accuracy") is not None else ""))
    if trainer.x_test is not None and trainer.y_test is not None:
        from convdsl.runtime.evaluation import score

        tested = score(trainer.net, trainer.x_test, trainer.y_test)
        source = trainer.config["data"]
        print(f"test split: {len(tested.labels):,} examples, accuracy {tested.accuracy:.2%} "
              f"(details: convdsl test {args.file} --weights {out} --data {source})")
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    from convdsl.runtime import data as datasets
    from convdsl.runtime import runs
    from convdsl.runtime.evaluation import classes_of, score

    net = _load(args.file)
    weights = Path(args.weights)
    settings = runs.weights_settings(weights, net)
    compiled = runs.load_weights(net, weights, args.batch or settings.batch, settings.dtype,
                                 args.device)
    data = datasets.fit_to_network(datasets.load_data(args.data), net.input_shape,
                                   classes_of(net), settings.dtype)
    if data.x_test is not None and data.y_test is not None and not args.all:
        x, y, part = data.x_test, data.y_test, "test split"
    else:
        x, y, part = data.x, data.y, "all examples"
    scores = score(compiled, x, y)
    if args.json:
        print(runs.scores_json(scores))
    else:
        print(runs.test_report(scores, f"{net.name} on {args.data} ({part})"))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from convdsl.runtime import runs
    from convdsl.runtime.evaluation import main_scores, probabilities

    net = _load(args.file)
    weights = Path(args.weights)
    settings = runs.weights_settings(weights, net)
    x = runs.read_inputs(Path(args.input), net.input_shape, settings.dtype)
    compiled = runs.load_weights(net, weights, args.batch or min(settings.batch, len(x)),
                                 settings.dtype, args.device)
    probs = probabilities(net, main_scores(compiled, x))
    if args.output:
        np.save(args.output, probs)
        print(f"wrote {probs.shape[0]} x {probs.shape[1]} probabilities to {args.output}")
        return EXIT_OK
    for index, row in enumerate(probs):
        best = np.argsort(row)[::-1][:args.top]
        ranked = ", ".join(f"{c}: {row[c]:.4f}" for c in best)
        print(f"{index}: class {best[0]}  ({ranked})")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from convdsl.report import curves
    from convdsl.runtime.training import RunFolder, read_metrics

    folder = Path(args.folder)
    rows = read_metrics(folder)
    if not rows:
        raise RunError(f"'{folder}' holds no finished epoch yet")
    path = Path(args.output) if args.output else RunFolder(folder).curves
    curves.draw(rows, path, title=str(folder.name))
    print(path)
    return EXIT_OK


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
    summary.add_argument("--batch", type=_positive, default=1, metavar="N",
                         help="batch size of the memory plan (default 1)")
    summary.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                         help="value type of the memory plan (default float32)")
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
    _add_device_option(compile_)
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

    time_ = commands.add_parser(
        "time", help="forward and backward time per kernel, and whole steps (like caffe time)")
    time_.add_argument("file", metavar="FILE")
    time_.add_argument("--batch", type=_positive, metavar="N",
                       help="batch size (default: the file's train batch, else 32)")
    time_.add_argument("--iterations", type=_positive, default=10, metavar="K",
                       help="timed runs; medians are shown (default 10)")
    time_.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    time_.add_argument("--algo", choices=ALGORITHM_CHOICES,
                       help="convolution algorithm for every layer, overriding the file")
    time_.add_argument("--no-fuse", action="store_true",
                       help="one stage per layer, to see what fusion saves")
    _add_device_option(time_)
    time_.add_argument("--kernels", action="store_true",
                       help="with --device cuda, also every kernel of every stage, each "
                            "launch between two synchronisations")
    time_.add_argument("--json", action="store_true", help="one JSON object, times in ms")
    time_.set_defaults(run=cmd_time)

    train = commands.add_parser(
        "train", help="train on a data set; checkpoints, metrics and curves in --out",
        description="Train a network. Settings come from the file's train lines, then "
        "these options.")
    train.add_argument("file", metavar="FILE")
    train.add_argument("--data", metavar="SOURCE",
                       help="digits, mnist1d, a .npz file (x, y, optional x_test, y_test), "
                       "or MNIST-style IDX files (a folder, or the images file)")
    train.add_argument("--out", metavar="DIR", help="the run's folder (default runs/NAME)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")
    train.add_argument("--algo", choices=ALGORITHM_CHOICES,
                       help="convolution algorithm for every layer, overriding the file")
    train.add_argument("--no-fuse", action="store_true",
                       help="one stage per layer (the same results, without fusion)")
    train.add_argument("--no-progress", action="store_true",
                       help="plain log lines even on a terminal")
    _add_device_option(train)
    _add_setting_options(train)
    train.set_defaults(run=cmd_train)

    test = commands.add_parser("test", help="accuracy, accuracy per class and confusion matrix")
    test.add_argument("file", metavar="FILE")
    test.add_argument("--weights", required=True, metavar="RUN",
                      help="a run folder, or a .npz checkpoint or weights file")
    test.add_argument("--data", required=True, metavar="SOURCE")
    test.add_argument("--all", action="store_true",
                      help="score every example, not only the source's test split")
    test.add_argument("--batch", type=_positive, metavar="N",
                      help="batch size (default: the run's)")
    test.add_argument("--json", action="store_true", help="one JSON object")
    _add_device_option(test)
    test.set_defaults(run=cmd_test)

    predict = commands.add_parser("predict", help="class probabilities for inputs in a .npy")
    predict.add_argument("file", metavar="FILE")
    predict.add_argument("input", metavar="INPUT.npy",
                         help="one example, or a batch of them, as the network's input")
    predict.add_argument("--weights", required=True, metavar="RUN")
    predict.add_argument("--top", type=_positive, default=3, metavar="K",
                         help="classes shown per example (default 3)")
    predict.add_argument("--output", metavar="OUT.npy", help="save every probability")
    predict.add_argument("--batch", type=_positive, metavar="N")
    _add_device_option(predict)
    predict.set_defaults(run=cmd_predict)

    calibrate = commands.add_parser(
        "calibrate", help="measure this machine for the cost model's algorithm choices")
    calibrate.add_argument("--show", action="store_true",
                           help="print the rates compiles use now; measure nothing")
    calibrate.set_defaults(run=cmd_calibrate)

    plot = commands.add_parser("plot", help="redraw a run's loss and accuracy curves")
    plot.add_argument("folder", metavar="RUN")
    plot.add_argument("-o", "--output", metavar="OUT.png",
                      help="where to draw (default RUN/curves.png)")
    plot.set_defaults(run=cmd_plot)
    return parser


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TrainSettings))


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    """One option per training setting, checked as a train line in a file is."""
    group = parser.add_argument_group("training settings (override the file's train lines)")
    defaults = TrainSettings()
    for name in SETTING_NAMES:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=f"(default {'yes' if default else 'no'})")
        else:
            group.add_argument(flag, dest=name, type=_setting(name), default=None,
                               metavar=type(default).__name__.upper(),
                               help=f"(default {default})")


def _setting(name: str) -> Callable[[str], object]:
    def convert(text: str) -> object:
        value: int | float | str
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        try:
            return training.convert(name, value)
        except ConvDslError as exc:
            diagnostic = exc.diagnostics[0]
            hint = f" ({diagnostic.hint})" if diagnostic.hint else ""
            raise argparse.ArgumentTypeError(diagnostic.message + hint) from None

    return convert


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
    parser.add_argument("--algo", choices=ALGORITHM_CHOICES,
                        help="convolution algorithm for every layer, overriding the file")
    parser.add_argument("--no-fuse", action="store_true",
                        help="one stage per layer (the same results, without fusion)")


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the kernels run: cpu (default), or cuda for an NVIDIA "
                        'GPU (pip install "convdsl[cuda]"); never falls back silently')


class _Notes(logging.Handler):
    """convdsl's log records (such as a first measurement of the machine) as lines on
    the stderr of the moment, which tests and callers may have replaced."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"convdsl: {record.getMessage()}", file=sys.stderr)


def _show_notes() -> None:
    logger = logging.getLogger("convdsl")
    if not any(isinstance(handler, _Notes) for handler in logger.handlers):
        logger.addHandler(_Notes(logging.INFO))
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_notes()
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
