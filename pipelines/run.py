"""The command line: `python -m pipelines.run <pipeline> [options]`.

A user's mistake (a bad data file, a typo in a spec or a config value) ends with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from msa.config import ConfigError
from msa.data import DataError
from pipelines.engine_options import add_engine_options, engine_from_args
from pipelines.executor import EngineError
from pipelines.spec import SpecError

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Anything a user can fix from the message alone."""


USER_ERRORS = (UserError, DataError, ConfigError, SpecError, EngineError)
EXIT_INTERRUPTED = 130


def _prepare(args: argparse.Namespace) -> int:
    from pipelines.stages.prepare import prepare

    data = prepare(args.data, quick=args.quick)
    print(data.summary())
    return 0


def _ablations(args: argparse.Namespace) -> int:
    from pipelines import suite
    from pipelines.stages.prepare import prepare
    from pipelines.tuning import TUNED, tune_spec_for, tuned_override

    engine = engine_from_args(args)  # first: a device or cluster that cannot be had writes nothing
    # `improved_tuned` is no ablation of the spec: it comes from the tuning study, looked up here.
    only = [n for n in args.only if n != TUNED] if args.only else None
    spec = suite.resolve_spec(args.spec, only=only, seeds=args.seeds, epochs=args.epochs, quick=args.quick)
    data = prepare(args.data or spec.data, quick=args.quick)
    extra = {}
    if not args.only or TUNED in args.only:
        override = tuned_override(quick=args.quick, data_digest=data.digest, spec=tune_spec_for(spec.path))
        if override is not None:
            extra[TUNED] = override
    if not spec.ablations and not extra:
        raise UserError("nothing to run: no tuning study has a best trial on this data yet "
                        "(run `python -m pipelines.run tune` first, or name other ablations)")
    result = suite.run_suite(spec, data_source=args.data, data=data, quick=args.quick, workers=args.workers,
                             extra_ablations=extra, engine=engine)
    suite.report(result, *suite.compare(result))
    return 1 if result.failed else 0


def _add_ablations(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablations", help="train, evaluate and compare every ablation of a spec over its seeds",
                       description="Run prepare -> train -> evaluate -> compare for every (ablation, seed) of "
                                   "the spec, recording each run in MLflow. Runs already FINISHED in the store "
                                   "are skipped; an interrupted suite finishes what is missing when re-run.")
    p.add_argument("--spec", metavar="FILE", help="pipeline spec (default: pipelines/specs/ablations.yaml)")
    p.add_argument("--data", metavar="PATH|synthetic", help="data source (default: the spec's, synthetic)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these ablations (names from the spec, or improved_tuned once `tune` has run)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="N", help="seeds (default: the spec's three)")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs per run (default: the spec's, 20)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="parallel worker processes (default: one per core, cores split between them; "
                        "with --scheduler the cluster's workers)")
    p.add_argument("--quick", action="store_true",
                   help="smoke profile: 2 epochs, one seed, and small synthetic data with the real dims "
                        "(a --data file is used whole)")
    add_engine_options(p)
    p.set_defaults(func=_ablations)


def _compare(args: argparse.Namespace) -> int:
    from pipelines.stages import compare as stage

    try:
        client, experiment_id = stage.open_experiment(args.experiment, suite_run_id=args.suite, spec_path=args.spec)
        comparison = stage.compare(client, experiment_id, suite_run_id=args.suite)
    except stage.CompareError as e:
        raise UserError(str(e)) from None
    print(stage.format_table(comparison))
    print(f"\nReport: {comparison.paths['report.html']}  (also comparison.csv, comparison.md; logged on suite run "
          f"{comparison.suite_run_id} under comparison/)")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a suite's ablations with the baseline (no training)",
                       description="Rebuild the comparison of the latest suite (or --suite) from the tracking "
                                   "store alone: a table on the terminal, and comparison.csv, comparison.md and "
                                   "report.html in reports/<experiment>/ (a tune suite's: reports/<experiment>/tune/), "
                                   "also logged on the suite's run.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the spec's, msa-ablations)")
    p.add_argument("--suite", metavar="RUN_ID", help="the suite's parent run id (default: the latest suite)")
    p.add_argument("--spec", metavar="FILE", help="spec whose experiment is the default (default: ablations.yaml)")
    p.set_defaults(func=_compare)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tune(args: argparse.Namespace) -> int:
    from pipelines import suite, tuning
    from pipelines.stages.compare import format_table

    engine = engine_from_args(args, optuna_storage=args.storage, uses_optuna=True)
    try:
        done = tuning.tune(tuning.load_tune_spec(args.spec), data_source=args.data, quick=args.quick,
                           epochs=args.epochs, trials=args.trials, timeout=args.timeout, storage=args.storage,
                           study_name=args.study, workers=args.workers, engine=engine)
    except tuning.TuneError as e:
        raise UserError(str(e)) from None
    print(tuning.summary(done.session))
    if done.comparison is not None:
        print("\n" + format_table(done.comparison))
        print(f"Report: {done.comparison.paths['report.html']}")
    if done.comparison_note:
        print(done.comparison_note)
    if done.suite is None:
        return 1
    print()
    suite.report(done.suite)
    return 1 if done.suite.failed else 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search the improved model's hyperparameters with Optuna, then compare it",
                       description="Run (or continue) an Optuna study around the improved model: each trial "
                                   "trains on train and is scored and pruned on valid only. The best trial "
                                   "becomes the ablation 'improved_tuned', trained over the suite's seeds and "
                                   "compared with the baseline and 'improved'. Re-running continues the study.")
    p.add_argument("--spec", metavar="FILE", help="tune spec (default: pipelines/specs/tune.yaml)")
    p.add_argument("--trials", type=_positive_int, metavar="N",
                   help="the study's total trials to reach (default: the spec's 50, or 8 with --quick); "
                        "a re-run runs only what is missing, so raise N to search further")
    p.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--storage", metavar="URL|PATH",
                   help="Optuna storage: a URL (postgresql://... for several machines) or a journal file "
                        "(default: mlruns/optuna/journal.log)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the spec's, with -quick for --quick)")
    p.add_argument("--data", metavar="PATH|synthetic", help="data source (default: the ablations spec's)")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help="epochs per trial and per final run (default: the ablations spec's)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="search loops working on the study together, each a local process or, with "
                        "--scheduler, a task on the cluster (default 1: reproducible trial by trial)")
    p.add_argument("--quick", action="store_true",
                   help="smoke profile: small synthetic data, 2 epochs per trial, few trials")
    add_engine_options(p)
    p.set_defaults(func=_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run",
        description="Ablation-tracking pipelines for multimodal sentiment analysis (CMU-MOSI).")
    sub = parser.add_subparsers(dest="pipeline", required=True, metavar="PIPELINE")

    p = sub.add_parser("prepare", help="load, validate and clean a data file and print a summary",
                       description="Load, validate and clean a MOSI pickle (MultiBench mosi_raw.pkl, MulT "
                                   "mosi_data.pkl, MMSA aligned_50.pkl/unaligned_50.pkl) or the synthetic "
                                   "default, and print split sizes, dims, label range and cleaning counts.")
    p.add_argument("--data", default="synthetic", metavar="PATH|synthetic",
                   help="a MOSI pickle, or 'synthetic' for the embedded synthetic MOSI-like data (default)")
    p.add_argument("--quick", action="store_true",
                   help="small synthetic data (real dims) for smoke runs; no effect on a data file")
    p.set_defaults(func=_prepare)

    for register in _EXTRA_PIPELINES:
        register(sub)
    return parser


# The pipelines after prepare, each registering its sub-command.
_EXTRA_PIPELINES: list[Callable[[argparse._SubParsersAction], None]] = [_add_ablations, _add_compare, _add_tune]


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.executor import install_sigterm_handler

    args = build_parser().parse_args(argv)
    install_sigterm_handler()  # from here on SIGTERM unwinds like Ctrl-C: runs in flight end KILLED
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: runs in flight were recorded as KILLED; finished runs are kept. "
              "Run the same command again to finish only what is missing.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
