"""One trial: sample a config from the space, train it on train, score it on valid, report every epoch.

The objective never sees test: it is handed a view of the data that holds no test split. Each trial
is an MLflow run nested under the session's parent, logged through the same epoch logger and run
lifecycle as an ablation run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from msa.config import RunConfig, deep_merge
from msa.data import MOSIData
from msa.metrics import is_better
from msa.training import fit
from pipelines import claims, tracking
from pipelines.executor import interrupt_point
from pipelines.spec import Spec
from pipelines.status import RunStatus
from pipelines.tuning.spec import Param, TuneSpec

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, picklable for worker processes."""

    base: dict[str, Any]                       # the ablations spec's base
    base_override: dict[str, Any]              # the base ablation's override, as written
    epochs: int
    seeds: tuple[int, ...]
    metric: str
    metric_key: str                            # the metric's key in fit's per-epoch metrics
    direction: str                             # maximize | minimize
    space: dict[str, Param]
    device: str = "cpu"                        # cpu, cuda or cuda:N

    @classmethod
    def from_specs(cls, spec: TuneSpec, suite_spec: Spec, device: str = "cpu") -> TrialSetup:
        return cls(base=suite_spec.base, base_override=suite_spec.overrides[spec.base],
                   epochs=suite_spec.ablations[spec.base].train.epochs, seeds=spec.seeds, metric=spec.metric,
                   metric_key=spec.metric_key, direction=spec.direction, space=spec.space, device=device)

    @property
    def steps(self) -> int:
        return self.epochs * len(self.seeds)


def sample(trial: optuna.Trial, space: Mapping[str, Param]) -> dict[str, Any]:
    """The trial's values, in the spec's order, skipping params whose `when` does not hold."""
    values: dict[str, Any] = {}
    for p in space.values():
        if p.active(values):
            values[p.name] = p.suggest(trial)
    return values


def override_of(setup: TrialSetup, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ablation override a trial stands for: the base ablation's override plus the sampled values."""
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split(".")
        nested.setdefault(section, {})[key] = value
    return deep_merge(setup.base_override, nested)


def search_view(data: MOSIData) -> MOSIData:
    """The data without its test split: what the search may see. Touching test raises KeyError."""
    return dataclasses.replace(data, splits={k: v for k, v in data.splits.items() if k != "test"})


SESSION_ATTR = "session"  # trial user attr: the MLflow run id of the `tune` session that ran it


@dataclass(frozen=True)
class TrialTracking:
    """Where a trial's nested MLflow run goes; picklable."""

    uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    tags: tuple[tuple[str, str], ...] = ()


class TrialRun:
    """One trial as an MLflow run under the session's parent (Optuna's own MLflowCallback is
    deprecated and cannot nest runs). Deliberately no `ablation` tag: trials are not suite runs."""

    def __init__(self, where: TrialTracking, trial: optuna.Trial, device: str, threads: int | None):
        self.client = MlflowClient(where.uri)
        start_from = trial.user_attrs.get("start_from")
        self.run_id = tracking.start_run(
            self.client, where.experiment_id, f"trial-{trial.number}", parent_run_id=where.parent_run_id,
            tags={"optuna_trial": str(trial.number), "optuna_study": where.study,
                  "optuna_state": TrialState.RUNNING.name, **dict(where.tags),
                  **tracking.hardware_tags(device, threads),
                  **({"start_from": start_from} if start_from else {})})
        trial.set_user_attr("mlflow_run_id", self.run_id)
        self.log_epoch = tracking.EpochLogger(self.client, self.run_id)

    def lifecycle(self):
        """The run's lifecycle; a pruned trial's run is FINISHED (its `optuna_state` tag says PRUNED)."""
        return tracking.recorded_run(self.client, self.run_id, finished_on=(optuna.TrialPruned,))

    def log_config(self, config: RunConfig, seeds: tuple[int, ...]) -> None:
        tracking.log_params(self.client, self.run_id, {**config.flat(), "seeds": list(seeds)})

    def record(self, state: TrialState, value: float | None, error: str | None) -> None:
        if value is not None and math.isfinite(value):
            tracking.log_metrics(self.client, self.run_id, {"objective": value})
        if error:
            self.client.set_tag(self.run_id, "error", error[:5000])
        self.client.set_tag(self.run_id, "optuna_state", state.name)


def objective(trial: optuna.Trial, setup: TrialSetup, data: MOSIData, *, where: TrialTracking | None = None,
              threads: int | None = None, emit: Emit | None = None) -> float:
    """Train one sampled config on train, select on valid; return the mean over seeds of the
    selected epoch's validation metric. Every epoch reports to the pruner."""
    start = time.monotonic()
    run = TrialRun(where, trial, setup.device, threads) if where is not None else None
    last = {"step": 0, "value": math.nan, "epoch_seconds": 0.0}

    def end(state: TrialState, value: float | None, note: str | None) -> None:
        # Time in epochs, beside the trial's wall time: what is left is the fixed cost of a trial.
        trial.set_user_attr("epoch_seconds", round(last["epoch_seconds"], 3))
        if run is not None:
            try:
                run.record(state, value if state == TrialState.COMPLETE else None,
                           note if state == TrialState.FAIL else None)
            except Exception as e:  # tracking trouble must not hide the trial's own outcome
                _say(emit, f"trial {trial.number}: could not record the MLflow run: {e}")
        _say(emit, _trial_line(trial, state, value, note, setup, time.monotonic() - start))

    with run.lifecycle() if run is not None else nullcontext(tracking.RunHandle("")) as handle:
        try:
            values = sample(trial, setup.space)
            override = override_of(setup, values)
            trial.set_user_attr("override", override)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            if where is not None:  # which session ran it: sessions sharing a study count their own
                trial.set_user_attr(SESSION_ATTR, where.parent_run_id)
            trial.set_user_attr(claims.CLAIM_PROCESS, claims.process_identity())  # ended here: stale at once
            config = trial_config(setup, override)
            if run is not None:
                run.log_config(config, setup.seeds)
            value = _train_trial(trial, config, search_view(data), setup, threads, run, last)
        except optuna.TrialPruned:
            end(TrialState.PRUNED, last["value"], f"at step {last['step']}/{setup.steps}")
            raise
        except KeyboardInterrupt:
            end(TrialState.FAIL, None, "interrupted")
            _queue_again(trial)
            raise
        except Exception as e:
            end(TrialState.FAIL, None, f"{type(e).__name__}: {e}")
            raise
        # Optuna fails a trial that returns NaN (e.g. a model whose predictions are constant: no Corr).
        finite = math.isfinite(value)
        handle.status = RunStatus.FINISHED if finite else RunStatus.FAILED
        end(TrialState.COMPLETE if finite else TrialState.FAIL, value, None if finite else f"the objective is {value}")
    return value


REQUEUED = "requeued"  # user attr of an interrupted trial whose values were queued again


def _queue_again(trial: optuna.Trial) -> None:
    """An interrupted trial counts towards --trials as FAIL; its values (a start point's too) are queued
    once more, and a queued trial always runs first, so the same command again trains it: "finish only
    what is missing" holds for a study as for a suite. Best effort: the process is on its way out."""
    try:
        attrs = {k: v for k, v in trial.user_attrs.items() if k == "start_from"}
        trial.study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number})
        trial.set_user_attr(REQUEUED, True)  # its retry counts towards --trials, not it
    except Exception:  # the storage is out of reach: the trial stays FAIL, a later session samples anew
        pass


def trial_score(setup: TrialSetup, value: float) -> float:
    # Corr is undefined (NaN) for constant predictions, a model that learnt nothing: count it as
    # 0, no correlation. Left NaN, Optuna would fail the trial and TPE would not learn to avoid it.
    return 0.0 if setup.metric == "Corr" and math.isnan(value) else value


def trial_config(setup: TrialSetup, override: Mapping[str, Any]) -> RunConfig:
    """The config a trial with this ablation override trains."""
    return RunConfig.from_dict(deep_merge(deep_merge(setup.base, dict(override)), {"train": {"epochs": setup.epochs}}))


def _train_trial(trial: optuna.Trial, config: RunConfig, data: MOSIData, setup: TrialSetup, threads: int | None,
                 run: TrialRun | None, last: dict[str, Any]) -> float:
    higher = setup.direction == "maximize"

    def score(value: float) -> float:
        return trial_score(setup, value)

    reference = "start_from" in trial.user_attrs  # a start point runs to the end: it is what the search must beat
    results = []
    for i, seed in enumerate(setup.seeds):
        best: float | None = None

        def on_epoch(epoch: int, metrics: dict[str, float], first_step: int = i * setup.epochs) -> bool:
            nonlocal best
            interrupt_point()
            step = first_step + epoch  # steps run on across seeds, the same for every trial
            if run is not None:
                run.log_epoch(step, metrics)
            value = score(metrics[setup.metric_key])
            # The pruner sees the best so far, i.e. what the trial would return if stopped now; it
            # is steadier than one noisy epoch.
            if is_better(value, best, higher=higher):
                best = value
            last.update(step=step, value=best, epoch_seconds=last["epoch_seconds"] + metrics["epoch_seconds"])
            trial.report(best, step)
            return not reference and trial.should_prune()

        with warnings.catch_warnings():  # the undefined Corr above is expected, and handled
            warnings.filterwarnings("ignore", message="Corr is undefined", category=RuntimeWarning)
            result = fit(config, data, seed=seed, callback=on_epoch, threads=threads, evaluate_test=False,
                         device=setup.device)
        if result.stop_reason == "callback":
            raise optuna.TrialPruned(f"pruned at step {last['step']}")
        results.append(score(result.history[result.best_epoch - 1][setup.metric_key]))
    # Per seed, so that a confirmation on more seeds can pool these with its own (see confirm.py).
    trial.set_user_attr("seed_values", {str(s): v for s, v in zip(setup.seeds, results)})
    return float(np.mean(results))


def _trial_line(trial: optuna.Trial, state: TrialState, value: float | None, note: str | None,
                setup: TrialSetup, seconds: float) -> str:
    shown = f"val {setup.metric} {value:.4f}" if value is not None and math.isfinite(value) else ""
    if not note and "start_from" in trial.user_attrs:
        note = f"= {trial.user_attrs['start_from']}"
    return f"trial {trial.number:>4}  {state.name:<8} {shown:<18} {(note or '')[:120]:<22} {seconds:6.1f} s"


def _say(emit: Emit | None, line: str) -> None:
    if emit is not None:
        emit({"event": "trial", "line": line})


__all__ = ["TrialSetup", "TrialTracking", "TrialRun", "objective", "sample", "override_of", "search_view",
           "trial_score", "trial_config"]
