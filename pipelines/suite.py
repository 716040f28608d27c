"""The ablations pipeline: prepare -> train -> evaluate -> compare, wired by name.

A suite is one parent MLflow run; each (ablation, seed) is a nested child run. A child whose
identity (resolved config, data digest, seed) is already FINISHED in the store is reported as
cached and not trained again, so re-running a finished suite trains nothing and an interrupted
one finishes only what is missing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO


from msa.metrics import eval_mosi_regression
from pipelines import tracking
from pipelines.executor import DataRef, default_workers, describe, install_sigterm_handler, run_tasks
from pipelines.progress import SuiteProgress, _fmt_duration
from pipelines.spec import Spec, SpecError, load_spec
from pipelines.stages.prepare import SYNTHETIC, prepare
from pipelines.stages.train import RunOutcome, RunTask


@dataclass
class SuiteRow:
    ablation: str
    seed: int
    run_key: str
    run_id: str | None
    status: str                      # FINISHED | FAILED | KILLED | CACHED (FINISHED earlier)
    test_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SuiteResult:
    experiment: str
    experiment_id: str
    parent_run_id: str
    rows: list[SuiteRow]
    synthetic: bool
    seconds: float

    @property
    def failed(self) -> list[SuiteRow]:
        return [r for r in self.rows if r.status not in ("FINISHED", "CACHED")]


TUNED = "improved_tuned"  # the Optuna-tuned improved model; joins a suite once a study has a best trial


def resolve_spec(spec_path: str | None, *, only: Sequence[str] | None, seeds: Sequence[int] | None,
                 epochs: int | None, quick: bool) -> Spec:
    """The spec with the profile and command-line overrides applied (command line wins).
    `improved_tuned` may be named in `only`: it is not in the spec but added by `run_suite`."""
    spec = load_spec(spec_path).select([n for n in only if n != TUNED] if only else None)
    if quick:
        spec = spec.with_train(epochs=spec.quick.get("epochs", 2))
        spec = _with_seeds(spec, spec.quick.get("seeds", [spec.seeds[0]]))
    if epochs is not None:
        spec = spec.with_train(epochs=epochs)
    if seeds:
        spec = _with_seeds(spec, seeds)
    return spec


def _with_seeds(spec: Spec, seeds: Sequence[int]) -> Spec:
    from dataclasses import replace
    return replace(spec, seeds=tuple(dict.fromkeys(int(s) for s in seeds)))  # a repeated seed runs once


def run_suite(spec: Spec, *, data_source: str | None = None, quick: bool = False, workers: int | None = None,
              stream: TextIO | None = None, extra_ablations: dict[str, dict[str, Any]] | None = None,
              include_tuned: bool = False, suite_name: str = "ablations") -> SuiteResult:
    """Train and evaluate every (ablation, seed) of `spec` that the store does not hold yet.
    With `include_tuned`, the best trial of the tuning study on this data joins as `improved_tuned`."""
    stream = stream or sys.stderr
    source = data_source or spec.data
    for name, override in (extra_ablations or {}).items():
        spec = spec.with_ablation(name, override)
    data = prepare(source, quick=quick)
    say = lambda line: print(line, file=stream, flush=True)  # noqa: E731
    say(data.summary().splitlines()[0])
    if include_tuned and TUNED not in spec.ablations:
        from pipelines.tune import tuned_override  # tune builds on this module, not the other way

        override = tuned_override(quick=quick, data_digest=data.digest)
        if override is not None:
            spec = spec.with_ablation(TUNED, override)
            say(f"including '{TUNED}': the best trial of the tuning study on this data")
    if not spec.ablations:
        raise SpecError("nothing to run: no tuning study has a best trial on this data yet "
                        "(run `python -m pipelines.run tune` first, or name other ablations)")

    client, experiment_id = tracking.setup(spec.experiment)
    tasks_all: list[tuple[str, int, str]] = []
    for ablation, config in spec.ablations.items():
        for seed in spec.seeds:
            tasks_all.append((ablation, seed, tracking.run_key(config.to_dict(), data.digest, seed)))
    cached = tracking.finished_runs(client, experiment_id, [k for *_, k in tasks_all])

    parent = client.create_run(experiment_id, run_name=f"{suite_name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags={
        "suite": suite_name, "spec": spec.path, "synthetic": str(data.synthetic).lower(),
        "data_digest": data.digest, "data_source": data.source, "code_version": tracking.code_version(),
        "quick": str(quick).lower()})
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[_param(k, v) for k, v in {
        "ablations": ",".join(spec.ablations), "seeds": ",".join(map(str, spec.seeds)),
        "epochs": ",".join(sorted({str(c.train.epochs) for c in spec.ablations.values()})),
        "n_runs": len(tasks_all)}.items()])
    tracking.log_dataset(client, parent_id, data)
    if data.has_oracle:  # the best score reachable on synthetic data, for the comparison's oracle row
        oracle = eval_mosi_regression(data["test"].oracle, data["test"].labels)
        for k, v in oracle.items():
            if math.isfinite(v):
                client.log_metric(parent_id, f"oracle_test_{k}", v)

    tb_dir = str(tracking.tensorboard_dir(spec.experiment))
    tasks = [RunTask(a, s, spec.ablations[a], k, experiment_id, parent_id, tb_dir)
             for a, s, k in tasks_all if k not in cached]
    tasks.sort(key=estimated_cost, reverse=True)  # longest first: no long run left alone at the end
    workers = workers or default_workers(len(tasks))
    rows = {(a, s): SuiteRow(a, s, k, cached[k].info.run_id, "CACHED", _test_metrics(cached[k]))
            for a, s, k in tasks_all if k in cached}
    say(f"{len(tasks_all)} runs in experiment '{spec.experiment}': {len(rows)} cached, "
        + (describe(workers, tasks) if tasks else "nothing to train"))

    # (epochs, cost of one epoch) per run: the ETA weighs epochs by what they cost
    plan = {(t.ablation, t.seed): (t.config.train.epochs, estimated_cost(t) / t.config.train.epochs) for t in tasks}
    progress = SuiteProgress(plan, stream)
    run_keys = {(a, s): k for a, s, k in tasks_all}

    def on_done(outcome: RunOutcome) -> None:
        progress.on_done(outcome)
        key = (outcome.ablation, outcome.seed)
        rows[key] = SuiteRow(outcome.ablation, outcome.seed, run_keys[key], outcome.run_id, outcome.status,
                             outcome.test_metrics or {}, outcome.error)

    install_sigterm_handler()
    status = tracking.FINISHED
    try:
        run_tasks(tasks, DataRef(source, quick), data, workers=workers, uri=tracking.tracking_uri(),
                  on_event=progress.on_event, on_done=on_done)
    except KeyboardInterrupt:
        status = tracking.KILLED
        raise
    except BaseException:
        status = tracking.FAILED
        raise
    finally:
        progress.close()
        ordered = [rows.get((a, s)) or SuiteRow(a, s, k, None, tracking.KILLED) for a, s, k in tasks_all]
        client.log_text(parent_id, json.dumps([r.__dict__ for r in ordered], indent=1), "suite.json")
        failed = sum(r.status not in ("FINISHED", "CACHED") for r in ordered)
        client.set_tag(parent_id, "failed_runs", str(failed))
        client.set_terminated(parent_id, status)
    return SuiteResult(spec.experiment, experiment_id, parent_id, ordered, data.synthetic, progress.elapsed)


def estimated_cost(task: RunTask) -> float:
    """Relative training time, from the full suite on 2 cores: a Transformer layer costs about twice
    an LSTM per modality (the improved model's ~3 min against the baseline's ~1 min)."""
    m = task.config.model
    per_modality = m.encoder_layers * (2.0 if m.encoder == "transformer" else 1.0)
    return task.config.train.epochs * len(m.modalities) * per_modality


def _test_metrics(run) -> dict[str, float]:
    return {k.removeprefix("test_"): v for k, v in run.data.metrics.items() if k.startswith("test_")}


def _param(key: str, value: Any):
    from mlflow.entities import Param
    return Param(key, str(value))


def compare_suite(result: SuiteResult):
    """Stage 4: the comparison of this suite against its baseline, or None (with the reason printed)
    when it cannot be made, e.g. a suite run with `--only` that leaves the baseline out."""
    from pipelines.stages.compare import CompareError, compare

    client, _ = tracking.setup(result.experiment)
    try:
        return compare(client, result.experiment_id, suite_run_id=result.parent_run_id)
    except CompareError as e:
        print(f"no comparison: {e}", file=sys.stderr)
        return None


def report(result: SuiteResult, comparison=None, stream: TextIO | None = None) -> None:
    """The end of a suite: the comparison table, failures with their errors, and where to look next."""
    from pipelines.stages.compare import format_table

    stream = stream or sys.stdout
    if comparison is not None:
        print(format_table(comparison), file=stream)
        print(f"\nReport: {comparison.paths['report.html']} (also comparison.csv, comparison.md)", file=stream)
    for r in result.failed:
        print(f"{r.status}: {r.ablation}/seed-{r.seed}: {r.error or 'no error recorded'}", file=stream)
    trained = sum(r.status == "FINISHED" for r in result.rows)
    cached = sum(r.status == "CACHED" for r in result.rows)
    print(f"\n{trained} trained, {cached} cached, {len(result.failed)} failed in {_fmt_duration(result.seconds)}; "
          f"experiment '{result.experiment}', suite run {result.parent_run_id}", file=stream)
    if result.failed:
        print("Re-run the same command to retry only the runs that did not finish.", file=stream)
    print(f"Browse: {tracking.ui_hint()}", file=stream)
    print(f"Curves: tensorboard --logdir {tracking.tensorboard_dir(result.experiment)}", file=stream)


__all__ = ["SYNTHETIC", "resolve_spec", "run_suite", "compare_suite", "report", "SuiteResult"]
