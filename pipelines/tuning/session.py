"""A study session: open (or continue) the study, run trials on the worker pool until the study holds
`--trials` trials, and record the session under one MLflow parent run with its best, plots and counts.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from msa.data import DataError, MOSIData
from pipelines import claims, cores, tracking
from pipelines.executor import Engine, run_jobs
from pipelines.progress import fmt_duration
from pipelines.spec import Spec, resolve_spec
from pipelines.stages.prepare import prepare
from pipelines.stages.train import WorkerSetup
from pipelines.tuning import confirm
from pipelines.tuning.claim import TrialClaim
from pipelines.tuning.handover import TUNED, default_study_name, save_best
from pipelines.tuning.objective import REQUEUED, SESSION_ATTR, Emit, TrialSetup, TrialTracking, objective
from pipelines.tuning.search import make_pruner, make_sampler, session_seed
from pipelines.tuning.spec import TuneError, TuneSpec
from pipelines.tuning.storage import StorageSettings, open_storage, storage_label

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


class StudyEta:
    """The search's ETA, said after each trial's line: the trials still to run at the rate this
    session's trials have ended so far, all search loops together (pruned trials end early, so the
    estimate follows the pruner's mix as it comes)."""

    def __init__(self, to_run: int, clock=time.monotonic):
        self.to_run, self.clock, self.start, self.ended = to_run, clock, clock(), 0

    _ENDED = re.compile(r"trial +\d+  [A-Z]")  # a trial's own line: number, then its state

    def after_trial(self, line: str) -> str:
        if not self._ENDED.match(line):  # a re-training's line, or a note ("trial 3: could not record ...")
            return ""
        self.ended += 1
        left = self.to_run - self.ended
        if left <= 0:
            return ""
        return f"  search ETA {fmt_duration((self.clock() - self.start) / self.ended * left)} ({left} to go)"


def counted(study: optuna.Study, states: tuple[TrialState, ...] = COUNTED) -> int:
    """The trials that count towards --trials: an interrupted one whose values were queued again does
    not (its retry does)."""
    return sum(not t.user_attrs.get(REQUEUED) for t in study.get_trials(deepcopy=False, states=states))


class _QuietInterrupts(logging.Filter):
    """Drops Optuna's report of a trial stopped by Ctrl-C or SIGTERM (a warning with the interrupt's
    traceback, then "failed with value None"): the trial's own line already says "interrupted", and
    the command ends with one line. Other failures keep Optuna's report, traceback and all."""

    _TRIAL = re.compile(r"Trial (\d+) failed")

    def __init__(self):
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        trial = self._TRIAL.match(message)
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            if trial:
                self.interrupted.add(trial.group(1))
            return False
        if trial and trial.group(1) in self.interrupted and "failed with value" in message:
            self.interrupted.discard(trial.group(1))  # its last line: a later trial of that number is reported
            return False
        return True


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna reports a failed trial
    if not any(isinstance(f, _QuietInterrupts) for f in logger.filters):
        logger.addFilter(_QuietInterrupts())


@dataclass(frozen=True)
class WorkerJob:
    """One worker's share of a session; picklable, so it runs the same in a spawned process."""

    storage: str | None
    settings: StorageSettings
    study: str
    target: int
    timeout: float | None
    sampler_seed: int
    spec: TuneSpec
    setup: TrialSetup
    where: TrialTracking | None
    threads: cores.Share | None                # each trial's share of the cores (None: the worker's own setting)


def optimize(job: WorkerJob, data: MOSIData, threads: int | None, emit: Emit) -> None:
    """A worker's loop: take trials from the shared study until it holds `target` of them, then run
    any trial still queued (a dead worker's trial, re-queued: its failed predecessor counts towards
    the target, so without this the re-queued one would wait forever and the study would stall).
    Counting and starting a trial is one step under the study's claim lock, so that workers finishing
    together never start more than `target` trials between them."""
    _quiet_optuna()
    started = time.monotonic()
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage, job.settings),
                              sampler=make_sampler(job.spec.sampler, job.sampler_seed),
                              pruner=make_pruner(job.spec.pruner, job.setup.steps))
    searched_on = study.user_attrs.get("data_digest")
    if searched_on is not None and searched_on != data.digest:
        raise DataError(f"a tune worker loaded '{data.source}' with digest {data.digest}; study '{job.study}' is "
                        f"searched on data with digest {searched_on}: every machine must see the same data file")
    lock = TrialClaim(job.storage, job.study)

    def trial(t: optuna.Trial) -> float:
        lock.release()  # the trial exists (RUNNING) now, so every other worker counts it
        # The share of the cores is taken per trial: another session may have started or ended.
        return objective(t, job.setup, data, where=job.where, threads=job.threads() if job.threads else threads,
                         emit=emit)

    try:
        while job.timeout is None or time.monotonic() - started < job.timeout:
            with lock:
                queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if not queued and counted(study) >= job.target:
                    return
                study.optimize(trial, n_trials=1, catch=(Exception,))  # Optuna runs a queued trial first
    finally:
        lock.close()


@dataclass
class StudySession:
    """What one `tune` session did, and the study's best so far."""

    study: str
    storage: str                               # where the study lives, for people (no password)
    experiment: str
    experiment_id: str
    parent_run_id: str
    data_source: str
    data_digest: str
    synthetic: bool
    trials: list[FrozenTrial]                  # this session's trials, by number
    n_total: int                               # every trial the study holds
    best: FrozenTrial | None                   # the chosen COMPLETE trial (see confirm.choose)
    override: dict[str, Any] | None            # the chosen trial's ablation override (improved_tuned)
    best_path: Path | None                     # the YAML copy of it
    metric: str
    suite_spec: Spec                           # the resolved ablations spec (quick / epochs applied)
    seconds: float
    choice: confirm.Choice | None = None       # how the chosen trial was chosen: seeds, mean, spread
    target: int = 0                            # the trials the study was to hold (--trials)
    n_finished: int = 0                        # of n_total, those COMPLETE, PRUNED or FAIL
    timeout: float | None = None               # --timeout: trials stop starting after it

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.trials)


def run_study(spec: TuneSpec, *, data_source: str | None = None, quick: bool = False, epochs: int | None = None,
              trials: int | None = None, timeout: float | None = None, storage: str | None = None,
              study_name: str | None = None, workers: int = 1, stream: TextIO | None = None,
              data: MOSIData | None = None, engine: Engine | None = None) -> StudySession:
    """Run (or continue) the study until it holds `trials` trials or `timeout` seconds pass, on
    `workers` search loops sharing the storage (each a job of `engine`: a local process, or a task on a
    Dask cluster); record it all under one MLflow parent run.
    `data`, when given, is used in this process instead of loading `data_source` (workers load it)."""
    stream = stream or sys.stderr
    engine = engine or Engine.from_env()
    _quiet_optuna()
    started = time.monotonic()
    suite_spec = resolve_spec(spec.ablations, only=None, seeds=None, epochs=epochs, quick=quick)
    source = suite_spec.data if data_source is None else data_source  # --data '' is a mistake, not 'unset'
    data = data if data is not None else prepare(source, quick=quick)
    print(data.summary().splitlines()[0], file=stream, flush=True)
    setup = TrialSetup.from_specs(spec, suite_spec, device=engine.device)
    name = study_name or default_study_name(spec, quick)
    target = trials or (spec.quick_trials if quick else spec.trials)
    study = _open_study(spec, storage, name, setup, data)
    n_before = len(study.trials)
    _queue_start_points(study, spec, target, stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # so the count below and the report are honest

    experiment = spec.experiment or suite_spec.experiment
    client, experiment_id = tracking.setup(experiment)
    claims.kill_stale(client, experiment_id)  # sessions and suites whose process died: KILLED, not RUNNING
    tags = {"synthetic": str(data.synthetic).lower(), "data_digest": data.digest, "data_source": data.source,
            "code_version": tracking.code_version()}
    # No `suite` tag: the comparison looks for suite parents by it, and a study session is not one.
    parent_id = tracking.start_run(
        client, experiment_id, f"tune {name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"tune_study": name, "optuna_study": name, "optuna_storage": storage_label(storage),
              "quick": str(quick).lower(), **tags, **claims.claim_tags()},
        params={"study": name, "trials_target": target, "timeout": timeout, "metric": spec.metric,
                "direction": spec.direction, "epochs": setup.epochs, "seeds": ",".join(map(str, setup.seeds)),
                "base": spec.base, "pruner": spec.pruner.get("type", "median"), "confirm_top": spec.confirm.top,
                "confirm_seeds": ",".join(map(str, spec.confirm.seeds)),
                "sampler_seed": spec.sampler.get("seed"), "workers": workers, "tune_spec": spec.path,
                "ablations_spec": spec.ablations})
    with claims.Heartbeat(client, parent_id), tracking.recorded_run(client, parent_id):
        where = TrialTracking(tracking.tracking_uri(), experiment_id, parent_id, name, tuple(tags.items()))
        jobs = [WorkerJob(storage, spec.storage, name, target, timeout,
                          session_seed(int(spec.sampler.get("seed", 0)), n_before, w), spec, setup, where,
                          engine.threads(workers))
                for w in range(workers)]
        done = counted(study)
        print(f"study '{name}' ({storage_label(storage)}): {done} of {target} trials done or running; "
              f"{engine.describe(workers, workers, 'search loops')}, "
              f"{setup.epochs} epochs x {len(setup.seeds)} seed(s) per trial, validation {spec.metric} "
              f"({spec.direction}), pruner {spec.pruner.get('type', 'median')}"
              + (f"; then the top {spec.confirm.top} re-trained on seed(s) {list(spec.confirm.seeds)}"
                 if spec.confirm.top else ""),
              file=stream, flush=True)

        eta = StudyEta(max(0, target - done))

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "trial":
                print(event["line"] + eta.after_trial(event["line"]), file=stream, flush=True)

        def loop_lost(job: WorkerJob, reason: str) -> None:  # a worker that died on every attempt (OOM, say)
            print(f"a search loop was lost: {reason}; any others go on, and tune again makes up its trials",
                  file=stream, flush=True)

        def run_lost(job: confirm.ConfirmJob, reason: str) -> None:
            print(f"trial {job.trial}'s re-training on seed {job.seed} was lost: {reason} (tune again retries it)",
                  file=stream, flush=True)

        try:
            worker_setup = WorkerSetup(source, quick, tracking.tracking_uri(), data.digest)
            run_jobs(jobs, optimize, setup=worker_setup, workers=workers, on_event=on_event, local_resources=data,
                     start_together=True, engine=engine, lost=loop_lost)
            todo = confirm.pending(optuna.load_study(study_name=name, storage=open_storage(storage, spec.storage)),
                                   spec, setup, storage, where)
            if todo:
                top = len({job.trial for job in todo})  # fewer than confirm.top in a study with fewer trials
                print(f"re-training the top {top} trial(s) on seed(s) {list(spec.confirm.seeds)} "
                      f"(validation only): {len(todo)} run(s) to go", file=stream, flush=True)
                run_jobs(todo, confirm.retrain, setup=worker_setup, workers=min(workers, len(todo)),
                         on_event=on_event, local_resources=data, engine=engine, lost=run_lost)
        finally:
            session = _finish_session(spec, storage, study, target, timeout, client, experiment, experiment_id,
                                      parent_id, data, suite_spec, started)
    return session


def _queue_start_points(study: optuna.Study, spec: TuneSpec, target: int, stream: TextIO) -> None:
    """Queue the spec's start points the study has not run yet, once each, as far as `target` leaves
    room: `--trials 1` runs one trial, and a later session with more trials queues the rest."""
    had = {t.user_attrs.get("start_from") for t in study.get_trials(deepcopy=False)}
    pending = [(start, values) for start, values in spec.start_from if start not in had]
    room = max(0, target - counted(study, (*COUNTED, TrialState.WAITING)))
    for start, values in pending[:room]:
        study.enqueue_trial(values, user_attrs={"start_from": start}, skip_if_exists=True)
    if pending[room:]:
        names = ", ".join(repr(start) for start, _ in pending[room:])
        print(f"note: start_from {names} not queued: {target} trial(s) leave no room for it; a session with "
              "more --trials starts from it", file=stream, flush=True)


def _open_study(spec: TuneSpec, storage: str | None, name: str, setup: TrialSetup, data: MOSIData) -> optuna.Study:
    """Create the study, or load it after checking it was searched under the same conditions:
    trials on other data, epochs, seeds or metric are not comparable, so they must not be mixed."""
    identity = {"data_digest": data.digest, "epochs": setup.epochs, "seeds": list(setup.seeds), "metric": spec.metric}
    study = optuna.create_study(study_name=name, storage=open_storage(storage, spec.storage),
                                direction=spec.direction, load_if_exists=True)
    for key, value in identity.items():
        if key in study.user_attrs and study.user_attrs[key] != value:
            raise TuneError(f"study '{name}' in {storage_label(storage)} was searched with {key} "
                            f"{study.user_attrs[key]!r}; this run has {value!r}. Give another --study NAME to "
                            f"start a new study, or the same data and settings to continue this one.")
    if study.direction.name.lower() != spec.direction:
        raise TuneError(f"study '{name}' in {storage_label(storage)} is a {study.direction.name.lower()} study; "
                        f"metric {spec.metric} needs {spec.direction}. Give another --study NAME.")
    for key, value in {**identity, "data_source": data.source, "synthetic": data.synthetic, "base": spec.base}.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study


def _finish_session(spec: TuneSpec, storage: str | None, study: optuna.Study, target: int, timeout: float | None,
                    client: MlflowClient, experiment: str, experiment_id: str, parent_id: str, data: MOSIData,
                    suite_spec: Spec, started: float) -> StudySession:
    """Save the best trial as `improved_tuned` and put the session's summary and plots on the parent run."""
    study = optuna.load_study(study_name=study.study_name, storage=open_storage(storage, spec.storage))
    all_trials = study.get_trials(deepcopy=False)
    session_trials = [t for t in all_trials if t.user_attrs.get(SESSION_ATTR) == parent_id]
    choice, best_path = save_best(study, spec, storage)
    best = choice.trial if choice is not None else None
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    metrics = {f"n_{s.name.lower()}": sum(t.state == s for t in all_trials) for s in states} | {
        f"session_n_{s.name.lower()}": sum(t.state == s for t in session_trials) for s in states}
    if best is not None:
        metrics |= {f"best_val_{spec.metric}": best.value, "best_trial": best.number,
                    f"best_val_{spec.metric}_mean": choice.mean, f"best_val_{spec.metric}_std": choice.std,
                    "best_n_seeds": len(choice.seed_values) or len(spec.seeds)}
    try:
        tracking.log_metrics(client, parent_id, metrics)
        if best is not None:
            tracking.log_params(client, parent_id, {f"best.{k}": v for k, v in best.params.items()})
            client.set_tag(parent_id, "best_trial", str(best.number))
        _log_study_artifacts(client, parent_id, study, best_path)
    except Exception as e:  # the study is safe in its storage; a tracking hiccup must not lose the session
        print(f"could not record the session summary in MLflow: {type(e).__name__}: {e}", file=sys.stderr)
    return StudySession(study.study_name, storage_label(storage), experiment, experiment_id, parent_id, data.source,
                        data.digest, data.synthetic, session_trials, len(all_trials), best,
                        dict(best.user_attrs["override"]) if best is not None else None, best_path, spec.metric,
                        suite_spec, time.monotonic() - started, choice, target=target,
                        n_finished=sum(t.state.is_finished() for t in all_trials), timeout=timeout)


def _log_study_artifacts(client: MlflowClient, run_id: str, study: optuna.Study, best_path: Path | None) -> None:
    import matplotlib.pyplot as plt  # Optuna's plots draw through pyplot; figures are closed once saved
    from optuna.visualization import matplotlib as vis

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # experimental plotting API; few-trial importance caveats (the plot is still worth having)
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        study.trials_dataframe().to_csv(tmp / "trials.csv", index=False)
        n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        plots = {"optimization_history.png": vis.plot_optimization_history} if n_complete else {}
        if n_complete >= 2:
            plots["param_importances.png"] = vis.plot_param_importances  # needs two results to compare
        for filename, plot in plots.items():
            try:
                ax = plot(study)
                ax.figure.set_size_inches(8, 5)
                ax.figure.tight_layout()
                ax.figure.savefig(tmp / filename, dpi=100)
                plt.close(ax.figure)
            except Exception as e:  # e.g. importances of params that never varied; the rest still counts
                client.set_tag(run_id, f"plot_error.{filename}", f"{type(e).__name__}: {e}"[:500])
        if best_path is not None:
            (tmp / best_path.name).write_text(best_path.read_text())
        client.log_artifacts(run_id, str(tmp))


def summary(session: StudySession) -> str:
    """What a person reads at the end of a session."""
    n = len(session.trials)
    lines = [f"study '{session.study}' ({session.storage}): {n} trial(s) this session "
             f"({session.count(TrialState.COMPLETE)} complete, {session.count(TrialState.PRUNED)} pruned, "
             f"{session.count(TrialState.FAIL)} failed), {session.n_total} in all, "
             f"in {session.seconds:.0f} s"]
    if session.timeout is not None and session.n_finished < session.target:
        lines.append(f"--timeout {session.timeout:g} s reached: the study holds {session.n_finished} of "
                     f"{session.target} finished trials; the same command again goes on")
    if session.best is None:
        lines.append("no COMPLETE trial yet")
    else:
        b = session.best
        lines.append(f"chosen: {confirm.describe(session.choice, session.metric)}" if session.choice is not None
                     else f"best: trial {b.number}, validation {session.metric} {b.value:.4f}")
        lines += [f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}" for k, v in b.params.items()]
        lines.append(f"saved as ablation '{TUNED}': {session.best_path}")
    lines.append(f"tune run {session.parent_run_id} in experiment '{session.experiment}'"
                 + ("  (SYNTHETIC data)" if session.synthetic else ""))
    return "\n".join(lines)


__all__ = ["StudySession", "WorkerJob", "run_study", "optimize", "summary", "COUNTED", "counted"]
