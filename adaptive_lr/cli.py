"""`adaptive-lr` (also `python -m adaptive_lr`): the training demo, the step-time benchmark and the
training-quality studies.

    adaptive-lr demo            a short real training run and a quick step-time table (~1 minute)
    adaptive-lr bench --quick   the step-time table (`adaptive-lr bench --help`: all its options)
    adaptive-lr sweep --quick   both studies at a small scale (a few minutes on 2 cores)
    adaptive-lr sweep --study rules --quick
                                the gain-rule study (docs/RESULTS.md §3) at a small scale
    adaptive-lr sweep --study lm --quick
                                the sign-window study on a byte-level LM (§6) at a small scale
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from adaptive_lr import benchmark, demo
from adaptive_lr.study import compact, greedy, lm, lr_sweep, robustness, runner
from adaptive_lr.study.options import positive_float, positive_int

BENCH_QUICK_ARGS = ["--sizes", "1M", "10M", "--dtypes", "float32", "--rounds", "3",
                    "--steps-per-round", "3"]
# What each command imports of the `study` extra (setup.py); bench needs none of it. Imported
# by the command that runs, so that a plain install has `--help` and `bench`.
STUDY_MODULES = {"demo": ("sklearn",),
                 "sweep": ("numpy", "sklearn", "adabelief_pytorch", "tqdm", "matplotlib")}
# the anchors of the rules study (robustness.ANCHORS) and of the lm study, beside the sweep's
ANCHOR_MODULES = {"rules": ("prodigyopt", "schedulefree", "dog", "dadaptation"),
                  "lm": ("prodigyopt", "schedulefree")}


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small grids, fewer seeds and epochs: a few minutes on 2 cores")
    parser.add_argument("--study", choices=["lr", "greedy", "rules", "compact", "lm", "all"],
                        default="all",
                        help="lr: the LR-robustness sweep; greedy: the GreedyLR study; rules: the "
                        "gain-rule study of docs/RESULTS.md §3; compact: compact state's quality "
                        "study of §4; lm: the sign window on a byte-level language model, §6 "
                        "(rules, compact and lm are not part of all); "
                        "all: lr and greedy (default all)")
    parser.add_argument("--out", default="out/sweep",
                        help="directory for the CSV/JSON/Markdown/PNG results "
                        "(default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one thread each (default %(default)s)")
    lr = parser.add_argument_group("LR-robustness sweep, rules and compact studies (override "
                                   "the full or --quick preset)")
    lr.add_argument("--models", nargs="+", choices=["mlp", "cnn"],
                    help="models (rules: the selection tasks)")
    lr.add_argument("--optimizers", nargs="+", choices=list(lr_sweep.PAIRS),
                    help="base optimizers; each runs beside its Active version")
    lr.add_argument("--lrs", nargs="+", type=positive_float,
                    help="the learning-rate grid (lm: AdamW's and ActiveAdamW's)")
    lr.add_argument("--seeds", type=positive_int, help="seeds per (optimizer, lr) (also lm)")
    lr.add_argument("--epochs", type=positive_int, help="the fixed epoch budget")
    rules = parser.add_argument_group("rules study (overrides the full or --quick preset)")
    rules.add_argument("--phases", nargs="+",
                       choices=list(dict.fromkeys(robustness.PHASES + lm.PHASES)),
                       help=f"phases to run; rules: {', '.join(robustness.PHASES)} (held-out and "
                       f"batch run the selection first); lm: {', '.join(lm.PHASES)} (pretrain "
                       "always runs)")
    rules.add_argument("--candidates", nargs="+",
                       choices=[c for c in robustness.CANDIDATES if c != "base"],
                       help="gain rules beside the base optimizer")
    rules.add_argument("--heldout-tasks", nargs="+", choices=list(robustness.HELDOUT_TASKS))
    rules.add_argument("--confirm-tasks", nargs="+", choices=list(robustness.CONFIRM_TASKS))
    language = parser.add_argument_group("lm study (overrides the full or --quick preset)")
    language.add_argument("--variants", nargs="+", type=lm.variant,
                          help="AdamW, Prodigy, SF-AdamW, and ActiveAdamW as W<steps> or Wepoch "
                          "(its sign window), W<steps>-scaled (gain_inc 2 × steps / epoch "
                          "steps), W<steps>-paper (sign_threshold 0)")
    study = parser.add_argument_group("GreedyLR study (overrides the full or --quick preset)")
    study.add_argument("--problems", nargs="+", choices=list(greedy.PROBLEMS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptive-lr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_arguments(commands.add_parser(
        "demo", help="short training run (AdamW vs ActiveAdamW) + quick step-time table",
        description=demo.__doc__))
    # bench passes every other argument on to the benchmark, whose own --help lists them
    bench = commands.add_parser(
        "bench", add_help=False, help="step-time benchmark (--quick: 1M and 10M float32 only)")
    bench.add_argument("--quick", action="store_true")
    _add_sweep_arguments(commands.add_parser(
        "sweep", help="LR-robustness sweep and GreedyLR study", description=lr_sweep.__doc__))
    return parser


def _require_study_extra(command: str, extra: tuple[str, ...] = ()) -> None:
    for module in STUDY_MODULES[command] + extra:
        try:
            importlib.import_module(module)
        except ImportError as error:
            sys.exit(f"adaptive-lr {command} needs the study extra ({error}): "
                     "pip install 'adaptive_lr[study]'")


def _given(**options) -> dict:
    """The options given on the command line (not None), lists as tuples: a preset's overrides."""
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in options.items() if value is not None}


def _sweep(args: argparse.Namespace) -> int:
    """Runs the chosen studies; the exit status: 0, 1 when a run failed, 130 after Ctrl-C (the
    next study is then not started)."""
    runs = {}
    if args.study == "rules":
        overrides = _given(selection_tasks=args.models, pairs=args.optimizers, lrs=args.lrs,
                           seeds=args.seeds, epochs=args.epochs, phases=args.phases,
                           candidates=args.candidates, heldout_tasks=args.heldout_tasks,
                           confirm_tasks=args.confirm_tasks)
        config = dataclasses.replace(robustness.QUICK if args.quick else robustness.RulesConfig(),
                                     **overrides)
        summary = robustness.run(config, args.out, args.workers)
        print(robustness.markdown(summary))
        runs.update(summary["runs"])
    if args.study == "lm":
        config = dataclasses.replace(lm.QUICK if args.quick else lm.LMConfig(), **_given(
            variants=args.variants, lrs=args.lrs, seeds=args.seeds, phases=args.phases))
        summary = lm.run(config, args.out, args.workers)
        print(lm.markdown(summary))
        runs.update(summary["runs"])
    grid = _given(models=args.models, pairs=args.optimizers, lrs=args.lrs, seeds=args.seeds,
                  epochs=args.epochs)
    if args.study == "compact":
        config = dataclasses.replace(compact.QUICK if args.quick else compact.CompactConfig(),
                                     **grid)
        summary = compact.run(config, args.out, args.workers)
        print(compact.markdown(summary))
        runs.update(summary["runs"])
    if args.study in ("lr", "all"):
        config = dataclasses.replace(lr_sweep.QUICK if args.quick else lr_sweep.SweepConfig(),
                                     **grid)
        summary = lr_sweep.run(config, args.out, args.workers)
        print(lr_sweep.markdown(summary))
        runs.update(summary["runs"])
    if args.study in ("greedy", "all") and not any(s["interrupted"] for s in runs.values()):
        config = greedy.QUICK if args.quick else greedy.GreedyConfig()
        if args.problems:
            config = dataclasses.replace(
                config, problems=tuple(args.problems),
                trace_problems=tuple(p for p in config.trace_problems if p in args.problems))
        summary = greedy.run(config, args.out, args.workers)
        print(greedy.markdown(summary))
        runs.update(summary["runs"])
    print(f"results written to {os.path.abspath(args.out)}")
    missing = runner.incomplete(runs)
    for phase, status in missing.items():
        print(f"adaptive-lr sweep: {phase}: {runner.describe(status)}", file=sys.stderr)
    if not missing:
        return 0
    print("adaptive-lr sweep: the results are partial; the same command run again runs the rest",
          file=sys.stderr)
    return 130 if any(s["interrupted"] for s in missing.values()) else 1


def main(argv=None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        benchmark.main((BENCH_QUICK_ARGS if args.quick else []) + rest, prog="adaptive-lr bench")
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    study = getattr(args, "study", None)
    if study in ("rules", "lm") and args.phases:
        phases = robustness.PHASES if study == "rules" else lm.PHASES
        wrong = [phase for phase in args.phases if phase not in phases]
        if wrong:
            parser.error(f"--phases {' '.join(wrong)}: not a phase of the {study} study "
                         f"({', '.join(phases)})")
    _require_study_extra(args.command, ANCHOR_MODULES.get(study, ()))
    if args.command == "demo":
        demo.run(args)
    else:
        status = _sweep(args)
        if status:
            sys.exit(status)


if __name__ == "__main__":
    main()
