"""The command line: `python -m pipelines.run <pipeline> [options]`.

A user's mistake (a bad data file, a typo in a spec or a config value) ends with one line on stderr
and exit status 2, never a traceback. Parsing the command line imports neither torch nor MLflow
(seconds on a small machine): `--help` and a mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipelines.arguments import name_value, path_value, positive_int, positive_seconds, seed_value
from pipelines.engine_options import add_engine_options, engine_from_args
from pipelines.errors import UserError, check_writable_dir

EXIT_USER_ERROR = 2
EXIT_SYSTEM_ERROR = 1  # the machine's fault, not the command's: a full disk, a folder made read-only meanwhile
REPORTS = Path("reports")  # where comparisons are written, below the working folder
EXIT_INTERRUPTED = 130
# What writing a file checked writable beforehand can still meet: the machine's fault (exit 1)
MACHINE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def user_errors() -> tuple[type[Exception], ...]:
    """What a user's mistake raises (EngineError, StoreError, TuneError are UserErrors). Imported when
    a command runs, not when its line is parsed: DataError's module imports torch."""
    from msa.config import ConfigError
    from msa.data import DataError
    from pipelines.spec import SpecError

    return UserError, DataError, ConfigError, SpecError


def _prepare(args: argparse.Namespace) -> int:
    from pipelines.stages.prepare import prepare

    data = prepare(args.data, quick=args.quick)
    print(data.summary())
    return 0


def _ablations(args: argparse.Namespace) -> int:
    from pipelines.spec import TUNED, resolve_spec

    # `improved_tuned` is no ablation of the spec: it comes from the tuning study, looked up below.
    only = [n for n in args.only if n != TUNED] if args.only else None
    # First, before torch and MLflow are imported: a mistake in the spec answers at once.
    spec = resolve_spec(args.spec, only=only, seeds=args.seeds, epochs=args.epochs, quick=args.quick,
                        precision=args.precision)
    from pipelines import suite, tracking
    from pipelines.stages.prepare import prepare

    engine = engine_from_args(args)  # then: a device or cluster that cannot be had writes nothing
    _check_outputs(REPORTS / spec.experiment)
    data = prepare(spec.data if args.data is None else args.data, quick=args.quick)  # --data '' is a mistake
    extra = {}
    asked = bool(args.only) and TUNED in args.only  # by name: it runs, or the command says why not
    no_study = (f"{TUNED}: no tuning study has a best trial on this data yet (run `python -m pipelines.run "
                f"tune` first, or leave it out of --only)")
    # Optuna (and the tuning package) only where a study can be found: its journal exists.
    if (not args.only or asked) and tracking.study_journal().is_file():
        from pipelines.tuning import tuned_for

        override, line = tuned_for(spec, quick=args.quick, data_digest=data.digest)
        if override is None and asked:
            raise UserError(line or no_study)
        if line:
            print(f"note: {line}", file=sys.stderr)
        if override is not None:
            extra[TUNED] = override
    elif asked:
        raise UserError(no_study)
    result = suite.run_suite(spec, data_source=args.data, data=data, quick=args.quick, workers=args.workers,
                             extra_ablations=extra, engine=engine)
    suite.report(result, *suite.compare(result))
    return 1 if result.failed else 0


def _add_ablations(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablations", help="train, evaluate and compare every ablation of a spec over its seeds",
                       description="Run prepare -> train -> evaluate -> compare for every (ablation, seed) of "
                                   "the spec, recording each run in MLflow. Runs already FINISHED in the store "
                                   "are skipped; an interrupted suite finishes what is missing when re-run.")
    p.add_argument("--spec", type=path_value, metavar="FILE",
                   help="pipeline spec (default: pipelines/specs/ablations.yaml)")
    p.add_argument("--data", metavar="PATH|synthetic", help="data source (default: the spec's, synthetic)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these ablations (names from the spec, or improved_tuned once `tune` has run)")
    p.add_argument("--seeds", nargs="+", type=seed_value, metavar="N", help="seeds (default: the spec's three)")
    p.add_argument("--epochs", type=positive_int, metavar="N", help="epochs per run (default: the spec's, 20)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="parallel worker processes (default: one per core, cores split between them, unless "
                        "the suite is too small to repay starting them: then one, with every core; on a GPU, "
                        "--gpu-slots; with --scheduler the cluster's workers)")
    p.add_argument("--quick", action="store_true",
                   help="smoke profile: 2 epochs, one seed, and small synthetic data with the real dims "
                        "(a --data file is used whole)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="train.precision of every run (default: the spec's, fp32): bf16 autocasts the forward "
                        "pass where the hardware has bf16, else warns and trains in fp32")
    add_engine_options(p)
    p.set_defaults(func=_ablations)


def _check_outputs(reports: Path, storage: str | None = None, *, study: bool = False) -> None:
    """Everything a command will write to, checked before it loads data or creates anything: the
    tracking store, the report folder, and the study storage for `tune`."""
    from pipelines.store_check import check_store

    check_store()
    check_writable_dir(reports, "report folder")
    if study:
        from pipelines.tuning import check_storage

        check_storage(storage)


def _compare(args: argparse.Namespace) -> int:
    from pipelines.stages import compare as stage

    _check_outputs(REPORTS)
    if args.suite == stage.LATEST:  # the folder reports/<experiment>/latest: the suite that ran last, as alone
        args.suite = None
    try:
        client, experiment_id = stage.open_experiment(args.experiment, suite_run_id=args.suite, spec_path=args.spec)
        # A named suite's report is rebuilt in its own folder; only the newest suite's becomes `latest`.
        comparison = stage.compare(client, experiment_id, suite_run_id=args.suite, latest=args.suite is None)
    except stage.CompareError as e:
        raise UserError(str(e)) from None
    print(stage.format_table(comparison))
    print(f"\nReport: {comparison.paths['report.html']}  (also comparison.csv, comparison.md; logged on suite run "
          f"{comparison.suite_run_id} under comparison/)")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a suite's ablations with the baseline (no training)",
                       description="Rebuild the comparison of the `ablations` suite that ran last (or --suite) "
                                   "from the tracking store alone: a table on the terminal, and comparison.csv, "
                                   "comparison.md and report.html in reports/<experiment>/<suite label>/ (the "
                                   "latest suite's also in reports/<experiment>/latest/), also logged on the "
                                   "suite's run.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the spec's, msa-ablations)")
    p.add_argument("--suite", metavar="RUN_ID|LABEL",
                   help="the suite's parent run id (or its first digits), or its label (its folder under "
                        "reports/<experiment>/; default: the `ablations` suite that ran last)")
    p.add_argument("--spec", type=path_value, metavar="FILE",
                   help="spec whose experiment is the default (default: ablations.yaml)")
    p.set_defaults(func=_compare)


def _predict(args: argparse.Namespace) -> int:
    from msa.metrics import METRIC_NAMES
    from pipelines.comparison import SYNTHETIC_BANNER
    from pipelines.stages import predict as stage
    from pipelines.stages.prepare import prepare

    if not args.out.strip():
        raise UserError("--out is empty: give the CSV file to write (default: predictions.csv)")
    out = Path(args.out)
    if not out.parent.is_dir() or out.is_dir():
        raise UserError(f"--out {out}: {'is a directory' if out.is_dir() else 'its folder does not exist'}")
    check_writable_dir(out.parent, "--out")  # found now, not after the model has predicted
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: is not writable by this user")
    try:
        found = stage.find_model(args.model)  # before the data: a wrong URI or store is told at once
        data = prepare(args.data, quick=args.quick, partial=True)
        done = stage.predict_data(found, data, args.split)
    except stage.PredictError as e:
        raise UserError(str(e)) from None
    synthetic = f"  [{SYNTHETIC_BANNER}]" if data.synthetic else ""
    print(f"Model: {done.model}")
    print(f"Data:  {data.summary().splitlines()[0]}")
    for note in done.notes:
        print(note)
    for split, metrics in done.metrics.items():
        n = len(data[split])
        print(f"{split} ({n} sample{'' if n == 1 else 's'}): "
              + "  ".join(f"{m} {metrics[m]:.4f}" for m in METRIC_NAMES if m in metrics) + synthetic)
    if not done.metrics:
        print("no labels in the file: predictions only")
    try:
        done.table.to_csv(out, index=False)
    except OSError as e:
        if e.errno not in MACHINE_FAULTS:  # a name too long, say: the command's
            raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None
        print(f"error: --out {out}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return EXIT_SYSTEM_ERROR
    n = len(done.table)
    print(f"Wrote {n} prediction{'' if n == 1 else 's'} ({', '.join(done.table.columns)}) to {out}{synthetic}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from pipelines.stages.predict_options import SPLITS, URI_FORMS

    p = sub.add_parser("predict", help="apply a logged or registered model to a data file",
                       description="Load a model from the tracking store (the champion: "
                                   "models:/<experiment>@champion), "
                                   "check the file's dims against the model's signature, and write one prediction "
                                   "per sample (id, prediction, and label when the file has labels) to a CSV; print "
                                   "the metrics when it has labels. The file is read with the same restricted "
                                   "loader as every pipeline; the model is a pickle, so load only models from a "
                                   "store you trust.")
    p.add_argument("--model", required=True, metavar="URI", help=f"the model: {URI_FORMS}")
    p.add_argument("--data", default="synthetic", metavar="PATH|synthetic",
                   help="a MOSI pickle (any of its splits; labels optional), or 'synthetic' (default)")
    p.add_argument("--split", default="test", choices=SPLITS, help="which split to predict (default: test)")
    p.add_argument("--out", default="predictions.csv", metavar="FILE", help="CSV to write (default: predictions.csv)")
    p.add_argument("--quick", action="store_true", help="the small synthetic data of `ablations --quick`")
    p.set_defaults(func=_predict)


def _tune(args: argparse.Namespace) -> int:
    from pipelines import suite, tuning
    from pipelines.stages.compare import format_table

    engine = engine_from_args(args, optuna_storage=args.storage, uses_optuna=True)  # first: it writes nothing
    spec = tuning.load_tune_spec(args.spec)
    _check_outputs(REPORTS, args.storage, study=True)
    done = tuning.tune(spec, data_source=args.data, quick=args.quick,
                       epochs=args.epochs, trials=args.trials, timeout=args.timeout, storage=args.storage,
                       study_name=args.study, workers=args.workers, engine=engine,
                       on_session=lambda session: print(tuning.summary(session), flush=True))  # before the suite
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
                                   "trains on train and is scored and pruned on valid only. Of the top trials, "
                                   "re-trained on more seeds (the spec's 'confirm'), the best validation mean "
                                   "becomes the ablation 'improved_tuned', trained over the suite's seeds and "
                                   "compared with the baseline and 'improved'. Re-running continues the study.")
    p.add_argument("--spec", type=path_value, metavar="FILE", help="tune spec (default: pipelines/specs/tune.yaml)")
    p.add_argument("--trials", type=positive_int, metavar="N",
                   help="the study's total trials to reach (default: the spec's 50, or 8 with --quick); "
                        "a re-run runs only what is missing, so raise N to search further")
    p.add_argument("--timeout", type=positive_seconds, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--storage", metavar="URL|PATH",
                   help="Optuna storage: a URL (postgresql://... for several machines) or a journal file "
                        "(default: optuna/journal.log beside the SQLite tracking store, else in ./mlruns)")
    p.add_argument("--study", type=name_value, metavar="NAME",
                   help="study name (default: the spec's, with -quick for --quick)")
    p.add_argument("--data", metavar="PATH|synthetic", help="data source (default: the ablations spec's)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help="epochs per trial and per final run (default: the ablations spec's)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="search loops working on the study together, each a local process or, with "
                        "--scheduler, a task on the cluster (default 1: reproducible trial by trial; on a GPU, "
                        "--gpu-slots)")
    p.add_argument("--quick", action="store_true",
                   help="smoke profile: small synthetic data, 2 epochs per trial, few trials")
    add_engine_options(p)
    p.set_defaults(func=_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
_EXTRA_PIPELINES: list[Callable[[argparse._SubParsersAction], None]] = [_add_ablations, _add_compare, _add_tune,
                                                                         _add_predict]


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes end as every other user error does: one line, exit 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.executor import install_sigterm_handler

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a command-line mistake (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    install_sigterm_handler()  # from here on SIGTERM unwinds like Ctrl-C: runs in flight end KILLED
    try:
        return args.func(args)
    # First: an interrupt while torch is being imported must not import it again (user_errors() does),
    # which ended in a second traceback or a segfault.
    except KeyboardInterrupt as e:
        print(_interrupted(args, e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (finished runs are kept; run the same command again once "
              "this is mended)", file=sys.stderr)
        return EXIT_SYSTEM_ERROR


def _interrupted(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """The last line of an interrupted command: what became of its runs, where it has any."""
    from pipelines.executor import LeftRunning

    if args.func not in (_ablations, _tune):
        return "interrupted"
    stopped = ("runs still in flight stay RUNNING until the next command marks them KILLED"
               if isinstance(e, LeftRunning) else "any run in flight was recorded as KILLED")
    return (f"interrupted: {stopped}; finished runs are kept. Run the same command again to finish what is "
            "missing (runs, then the comparison and the champion).")


if __name__ == "__main__":
    from pipelines.fast_exit import exit_now

    exit_now(main())
