"""The ablations pipeline: prepare -> train -> evaluate -> compare, wired by name.

A suite is one parent MLflow run, resumed when the same suite runs again; each (ablation, seed) is a
nested child run. A child whose identity (resolved config, data digest, seed) is already FINISHED in
the store is reported as cached and not trained again, so re-running a finished suite trains nothing
and an interrupted one finishes only what is missing. Its best ablation on validation is registered
as the experiment's champion.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, TextIO

from mlflow.exceptions import MlflowException

from msa.config import ModelConfig
from msa.data import MOSIData
from msa.metrics import eval_mosi_regression
from msa.models import relative_cost
from msa.synthetic import MOSI_SIZES, SyntheticSpec
from pipelines import claims, parent, registry, tracking
from pipelines.executor import Engine, default_workers, run_jobs
from pipelines.progress import SuiteProgress, fmt_duration
from pipelines.registry import Champion
from pipelines.spec import Spec
from pipelines.stages.compare import Comparison, compare_suite
from pipelines.stages.prepare import prepare
from pipelines.stages.train import RunOutcome, RunTask, WorkerSetup, execute
from pipelines.status import RunStatus

SUITE_FILE = "suite.json"  # on the parent run: one row per (ablation, seed), what compare reads


@dataclass
class SuiteRow:
    """One (ablation, seed) of a suite and how it ended; a row of the parent run's suite.json."""

    ablation: str
    seed: int
    run_key: str
    run_id: str | None
    status: RunStatus
    test_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": str(self.status)}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> SuiteRow:
        return cls(**{**row, "seed": int(row["seed"]), "status": RunStatus(row["status"]),
                      "test_metrics": dict(row.get("test_metrics") or {})})


@dataclass
class SuiteResult:
    experiment: str
    experiment_id: str
    parent_run_id: str
    rows: list[SuiteRow]
    synthetic: bool
    seconds: float
    champion: Champion | None = None   # the experiment's registered champion after this suite
    champion_note: str | None = None   # the line saying who it is, or why there is none
    data_args: str = "--data synthetic"  # `predict`'s options for the data the suite ran on

    @property
    def failed(self) -> list[SuiteRow]:
        return [r for r in self.rows if not r.status.usable]


def _precision_here(spec: Spec, engine: Engine, say: Callable[[str], None]) -> tuple[Spec, set[str]]:
    """The spec as it trains where its runs go: an ablation that asks for bf16 where it is not native
    (it would run slower) is an fp32 run, with an fp32 run's identity, so that it can never be taken
    for, nor reused as, a bf16 run on a machine that has bf16. Said once; returns the names changed."""
    asked = {n for n, c in spec.ablations.items() if c.train.precision == "bf16"}
    if not asked or engine.bf16_native() is not False:
        return spec, set()
    where = "cluster's workers have" if engine.scheduler else f"{engine.device.partition(':')[0]} has"
    say(f"warning: bf16 was asked for, but this {where} no native bf16 (it would run slower): "
        f"{'every run trains' if asked == set(spec.ablations) else ', '.join(sorted(asked)) + ' train'} in fp32")
    fp32 = {n: replace(c, train=replace(c.train, precision="fp32")) for n, c in spec.ablations.items() if n in asked}
    return replace(spec, ablations={**spec.ablations, **fp32}), asked


def run_suite(spec: Spec, *, data_source: str | None = None, quick: bool = False, workers: int | None = None,
              stream: TextIO | None = None, extra_ablations: Mapping[str, Mapping[str, Any]] | None = None,
              suite_name: str = "ablations", data: MOSIData | None = None, engine: Engine | None = None
              ) -> SuiteResult:
    """Train and evaluate every (ablation, seed) of `spec` (plus `extra_ablations`, overrides of its
    base, e.g. the tuned model) that the store does not hold yet, under one parent run. `data`, when
    given, is used in this process instead of loading the source again (worker processes load it).
    `engine`: where the runs train (default: `Engine.from_env()`). A run another suite is training
    meanwhile is waited for, not trained twice; one whose claim died is trained here."""
    stream = stream or sys.stderr
    engine = engine or Engine.from_env()
    source = spec.data if data_source is None else data_source  # --data "" is a mistake, not "unset"
    for name, override in (extra_ablations or {}).items():
        spec = spec.with_ablation(name, override)
    data = data if data is not None else prepare(source, quick=quick)
    say = lambda line: print(line, file=stream, flush=True)
    spec, fell_back = _precision_here(spec, engine, say)
    say(data.summary().splitlines()[0])
    for name in extra_ablations or {}:
        say(f"including '{name}'")

    client, experiment_id = tracking.setup(spec.experiment)
    claims.kill_stale(client, experiment_id)  # runs and suites whose process died: KILLED, not RUNNING forever
    planned = [(ablation, seed, tracking.run_key(config.to_dict(), data.digest, seed))
               for ablation, config in spec.ablations.items() for seed in spec.seeds]
    cached = tracking.finished_runs(client, experiment_id, [k for *_, k in planned])
    rows = {(a, s): SuiteRow(a, s, k, cached[k].info.run_id, RunStatus.CACHED, _test_metrics(cached[k]))
            for a, s, k in planned if k in cached}
    here = tracking.code_version()
    other = [r.data.tags["code_version"] for r in cached.values() if r.data.tags.get("code_version", here) != here]
    if other:  # the code is not part of a run's identity: say when a reused result is another code's
        say(f"note: {len(other)} of the {len(cached)} cached run(s) were trained by other code "
            f"({', '.join(sorted(set(other)))}; this is {here}); to train them with this code, run a copy of "
            "the spec with another `experiment`")

    # One parent per suite identity: the same suite run again resumes it, so its children nest under one run.
    epochs = ",".join(sorted({str(c.train.epochs) for c in spec.ablations.values()}))
    key = parent.suite_key(suite_name, spec.ablations, spec.seeds, data.digest, tracking.code_version())
    parent_id, resumed = parent.open_parent(
        client, experiment_id, suite_name, key,
        tags={"suite": suite_name, "spec": spec.path, "synthetic": str(data.synthetic).lower(),
              "data_digest": data.digest, "data_source": data.source, "code_version": tracking.code_version(),
              "quick": str(quick).lower(), **claims.claim_tags()},
        params={"ablations": ",".join(spec.ablations), "seeds": ",".join(map(str, spec.seeds)),
                "epochs": epochs, "n_runs": len(planned)})
    note = partial(parent.describe, client, parent_id, experiment=spec.experiment, experiment_id=experiment_id,
                   spec_path=spec.path, ablations=list(spec.ablations), seeds=spec.seeds, epochs=epochs,
                   data_source=data.source, data_digest=data.digest, synthetic=data.synthetic)
    if resumed:
        say(f"resuming suite run {parent_id} (the same suite ran before)")
    with claims.Heartbeat(client, parent_id), tracking.recorded_run(client, parent_id):
        if not resumed:
            note()
            tracking.log_dataset(client, parent_id, data)
            if data.has_oracle:  # the best score reachable on synthetic data, for the comparison's oracle row
                oracle = eval_mosi_regression(data["test"].oracle, data["test"].labels)
                tracking.log_metrics(client, parent_id, {f"oracle_test_{k}": v for k, v in oracle.items()})
        # With a tracking server, workers on other machines cannot write to a folder here.
        tb_dir = str(tracking.tensorboard_dir(spec.experiment)) if tracking.is_local_store() else ""
        tasks = [RunTask(a, s, spec.ablations[a], k, experiment_id, parent_id, tb_dir, data_digest=data.digest,
                         device=engine.device, extra_tags=(("precision_requested", "bf16"),) if a in fell_back else ())
                 for a, s, k in planned if k not in cached]
        tasks.sort(key=estimated_cost, reverse=True)  # longest first: no long run left alone at the end
        # On this machine a small suite trains in this process: starting workers would cost more.
        workers = workers or default_workers(len(tasks), None if engine.scheduler else _work(tasks, data))
        runs = f"{len(planned)} run{'' if len(planned) == 1 else 's'}"
        say(f"{runs} in experiment '{spec.experiment}': {len(rows)} cached, "
            + (engine.describe(workers, len(tasks)) if tasks else "nothing to train"))

        # (epochs, cost of one epoch) per run: the ETA weighs epochs by what they cost
        plan = {(t.ablation, t.seed): (t.config.train.epochs, estimated_cost(t) / t.config.train.epochs) for t in tasks}
        progress = SuiteProgress(plan, stream)
        run_keys = {(a, s): k for a, s, k in planned}

        def on_done(outcome: RunOutcome) -> None:
            progress.on_done(outcome)
            key = (outcome.ablation, outcome.seed)
            rows[key] = SuiteRow(outcome.ablation, outcome.seed, run_keys[key], outcome.run_id, outcome.status,
                                 outcome.test_metrics or {}, outcome.error)

        setup = WorkerSetup(source, quick, tracking.tracking_uri(), data.digest)
        try:
            pending = tasks
            while pending:
                run_jobs(pending, execute, setup=setup, workers=workers, on_event=progress.on_event, on_done=on_done,
                         local_resources=data, engine=engine, lost=_lost)
                pending = _wait_for_elsewhere(client, experiment_id, pending, rows, progress, say)
        finally:
            progress.close()
            ordered = [rows.get((a, s)) or SuiteRow(a, s, k, None, RunStatus.KILLED) for a, s, k in planned]
            client.log_text(parent_id, json.dumps([r.to_json() for r in ordered], indent=1), SUITE_FILE)
            client.set_tag(parent_id, "failed_runs", str(sum(not r.status.usable for r in ordered)))
            note(rows=ordered, cached_runs=cached)
    result = SuiteResult(spec.experiment, experiment_id, parent_id, ordered, data.synthetic, progress.elapsed,
                         data_args="--data synthetic" + (" --quick" if quick else "") if source == "synthetic"
                         else f"--data {shlex.quote(data.source)}")
    result.champion, result.champion_note = _crown(client, spec, data, result, key)
    if result.champion is not None:
        client.set_tag(parent_id, "champion", f"{result.champion.uri} (version {result.champion.version})")
    note(rows=ordered, cached_runs=cached, champion=result.champion_note)
    return result


def _crown(client, spec: Spec, data: MOSIData, result: SuiteResult, key: str) -> tuple[Champion | None, str]:
    """Register the suite's best ablation on validation as the experiment's champion; a store that
    refuses (a registry-less server, say) costs the summary a line, never the suite."""
    first = next(iter(spec.ablations.values())).train  # the suite's selection metric: its first ablation's
    try:
        return registry.crown(client, spec.experiment, result.experiment_id, result.parent_run_id, result.rows,
                              spec.seeds, select_key=first.select_key, higher=first.higher_is_better,
                              data_digest=data.digest, synthetic=data.synthetic,
                              suite_label=parent.label_of(client.get_run(result.parent_run_id)))
    except MlflowException as e:
        return None, f"no champion registered: {str(e).splitlines()[0]}"


def _lost(task: RunTask, reason: str) -> RunOutcome:
    return RunOutcome(task.ablation, task.seed, RunStatus.FAILED, None, 0.0, error=reason)


def _wait_for_elsewhere(client, experiment_id: str, tasks: list[RunTask], rows: dict, progress: SuiteProgress,
                        say) -> list[RunTask]:
    """Wait for the tasks another suite claimed; those it finished become CACHED rows, those whose
    claim died (or failed) are returned, to be trained here."""
    elsewhere = [t for t in tasks if getattr(rows.get((t.ablation, t.seed)), "status", None) == RunStatus.RUNNING]
    if not elsewhere:
        return []
    say(f"waiting for {len(elsewhere)} run(s) that another suite is training: "
        + ", ".join(tracking.run_name(t.ablation, t.seed) for t in elsewhere))
    done = claims.wait_for(client, experiment_id, [t.run_key for t in elsewhere])
    again = []
    for t in elsewhere:
        run = done[t.run_key]
        if run is None:
            again.append(t)
            progress.again((t.ablation, t.seed))
        else:
            rows[(t.ablation, t.seed)] = SuiteRow(t.ablation, t.seed, t.run_key, run.info.run_id, RunStatus.CACHED,
                                                  _test_metrics(run))
    return again


def estimated_cost(task: RunTask) -> float:
    """Relative training time of a run: its epochs times what its components declare one costs."""
    return task.config.train.epochs * relative_cost(task.config.model)


MOSI_TRAIN_STEPS = MOSI_SIZES[0] * SyntheticSpec.seq_len  # MOSI's train split: samples x aligned steps


def _work(tasks: list[RunTask], data: MOSIData) -> float:
    """The tasks' training in epochs of the lab's baseline on MOSI-sized data (what PARALLEL_WORK counts)."""
    scale = len(data["train"]) * max(data.seq_lens.values()) / MOSI_TRAIN_STEPS
    return sum(map(estimated_cost, tasks)) / relative_cost(ModelConfig()) * scale


def _test_metrics(run) -> dict[str, float]:
    return {k.removeprefix("test_"): v for k, v in run.data.metrics.items() if k.startswith("test_")}


def compare(result: SuiteResult) -> tuple[Comparison | None, str | None]:
    """Stage 4 on this suite: (the comparison, None), or (None, why not), e.g. a suite run with
    `--only` that leaves the baseline out. The runs are recorded either way."""
    return compare_suite(result.experiment, result.experiment_id, result.parent_run_id)


def report(result: SuiteResult, comparison: Comparison | None = None, note: str | None = None,
           stream: TextIO | None = None) -> None:
    """The end of a suite: the comparison table, failures with their errors, and where to look next."""
    from pipelines.stages.compare import format_table

    stream = stream or sys.stdout
    if comparison is not None:
        print(format_table(comparison), file=stream)
        report_dir = comparison.paths["report.html"].parent
        print(f"\nReport: {report_dir / 'report.html'} (also comparison.csv, comparison.md; a copy in "
              f"{report_dir.parent / 'latest'})", file=stream)
    elif note:
        print(note, file=sys.stderr)
    for r in result.failed:
        print(f"{r.status}: {r.ablation}/seed-{r.seed}: {r.error or 'no error recorded'}", file=stream)
    trained = sum(r.status == RunStatus.FINISHED for r in result.rows)
    cached = sum(r.status == RunStatus.CACHED for r in result.rows)
    print(f"\n{trained} trained, {cached} cached, {len(result.failed)} failed in {fmt_duration(result.seconds)}; "
          f"experiment '{result.experiment}', suite run {result.parent_run_id}", file=stream)
    if result.failed:
        print("Re-run the same command to retry only the runs that did not finish.", file=stream)
    if result.champion_note:
        print(result.champion_note[0].upper() + result.champion_note[1:], file=stream)
    if result.champion is not None:
        print(f"Predict: python -m pipelines.run predict --model {result.champion.uri} {result.data_args}  "
              "(or --data FILE: your own)", file=stream)
    print(f"Browse: {tracking.ui_hint(result.experiment_id)}", file=stream)
    if tracking.is_local_store():
        print(f"Curves: tensorboard --logdir {tracking.tensorboard_dir(result.experiment)}", file=stream)
    else:  # the event files are each run's artifacts under tensorboard/, on the server
        run_id = next((r.run_id for r in result.rows if r.status.usable and r.run_id), "<run id>")
        print(f"Curves: mlflow artifacts download -r {run_id} -a tensorboard -d tb && tensorboard --logdir tb  "
              "(any run of the suite; each holds its TensorBoard events under tensorboard/)", file=stream)


__all__ = ["run_suite", "compare", "report", "SuiteResult", "SuiteRow", "SUITE_FILE"]
