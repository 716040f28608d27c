"""After the search: its top trials re-trained on more seeds, on validation only, so that the trial
handed over is the one with the best validation mean, not the one with the luckiest seed.

Each re-training is an MLflow run under the session's parent and one study attribute
(`confirm:<trial>:<seed>`), written as soon as it ends: a re-run of `tune`, or one after an
interrupt, re-trains only what is missing.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from msa.config import RunConfig, stable_hash
from msa.data import MOSIData
from msa.training import fit
from pipelines import claims, tracking
from pipelines.executor import interrupt_point
from pipelines.tuning.objective import Emit, TrialSetup, TrialTracking, search_view, trial_config, trial_score
from pipelines.tuning.spec import TuneSpec
from pipelines.tuning.storage import StorageSettings, open_storage, storage_label

PREFIX = "confirm"  # study attribute `confirm:<trial>:<seed>` -> {"value": ..., "mlflow_run_id": ...}


@dataclass(frozen=True)
class Choice:
    """The trial handed over, and the validation evidence it was chosen on."""

    trial: FrozenTrial
    seed_values: dict[int, float]              # validation metric per seed: the search's seeds, then confirm's
    candidates: int                            # re-trained trials compared on their mean (0: none; the best
                                               # search value won)

    @property
    def mean(self) -> float:
        # A trial searched on several seeds before per-seed values were kept: its value is their mean.
        return float(np.mean(list(self.seed_values.values()))) if self.seed_values else float(self.trial.value)

    @property
    def std(self) -> float:
        """The sample standard deviation over seeds (0 for one seed)."""
        values = list(self.seed_values.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def record(self, metric: str) -> dict[str, Any]:
        """What the study attribute `improved_tuned` and `<study>.best.yaml` say about the choice."""
        return {"trial": self.trial.number, "value": self.trial.value, "metric": metric,
                "seeds": list(self.seed_values), "n_seeds": len(self.seed_values),
                "mean": self.mean, "std": self.std, "seed_values": {str(k): v for k, v in self.seed_values.items()},
                "candidates": self.candidates, "override": dict(self.trial.user_attrs["override"])}


def top_trials(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """The `n` COMPLETE trials with the best search value, best first (ties: the earlier trial)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (sign * t.value, t.number))[:n]


def seed_values(study: optuna.Study, trial: FrozenTrial, spec: TuneSpec) -> dict[int, float]:
    """What is known of `trial` on the seeds its choice is judged on: the search's own (per seed,
    or its value when it had one seed), then those re-trained so far."""
    values: dict[int, float] = {}
    own = trial.user_attrs.get("seed_values")
    if own is not None:
        values |= {int(s): float(v) for s, v in own.items()}
    elif len(spec.seeds) == 1:
        values[spec.seeds[0]] = float(trial.value)
    for seed in spec.confirm.seeds:
        found = study.user_attrs.get(attr_key(trial.number, seed))
        if found is not None:
            values[seed] = float(found["value"])
    return values


def choose(study: optuna.Study, spec: TuneSpec) -> Choice | None:
    """The trial to hand over: of the top `confirm.top` trials by search value, the one with the best
    validation mean over every choice seed; a trial missing one (its re-training was cut short) is
    not a candidate. Without re-training, or before any is complete, the best search value wins."""
    top = top_trials(study, max(1, spec.confirm.top))
    if not top:
        return None
    higher = study.direction == optuna.study.StudyDirection.MAXIMIZE
    known = {t.number: seed_values(study, t, spec) for t in top}
    full = [t for t in top if set(known[t.number]) >= set(spec.choice_seeds)]
    if spec.confirm.top and full:
        means = {t.number: float(np.mean([known[t.number][s] for s in spec.choice_seeds])) for t in full}
        best = max(full, key=lambda t: (means[t.number] if higher else -means[t.number], -t.number))
        return Choice(best, {s: known[best.number][s] for s in spec.choice_seeds}, len(full))
    return Choice(top[0], {s: v for s, v in known[top[0].number].items() if s in spec.seeds}, 0)


@dataclass(frozen=True)
class ConfirmJob:
    """One re-training of one trial on one seed; picklable, so it runs the same in a spawned worker."""

    trial: int
    seed: int
    override: dict[str, Any]
    setup: TrialSetup
    storage: str | None
    settings: StorageSettings
    study: str
    where: TrialTracking | None


def pending(study: optuna.Study, spec: TuneSpec, setup: TrialSetup, storage: str | None,
            where: TrialTracking | None) -> list[ConfirmJob]:
    """The re-trainings the study's current top trials still lack."""
    if not spec.confirm.top:
        return []
    return [ConfirmJob(t.number, seed, dict(t.user_attrs["override"]), setup, storage, spec.storage,
                       study.study_name, where)
            for t in top_trials(study, spec.confirm.top) for seed in spec.confirm.seeds
            if attr_key(t.number, seed) not in study.user_attrs]


def retrain(job: ConfirmJob, data: MOSIData, threads: int | None, emit: Emit) -> tuple[int, int, float]:
    """Train the trial's config on the job's seed, select on validation, record it in the study (and
    in MLflow when tracked); returns (trial, seed, validation value)."""
    config = trial_config(job.setup, job.override)
    line = f"confirm {job.trial:>4}  seed {job.seed:<10}"
    run_id, client, log_epoch, beat = "", None, None, None
    if job.where is not None:
        client = MlflowClient(job.where.uri)
        claimed = _claim(job, client, config, emit, line)
        if isinstance(claimed, float):  # another session re-trained this pair: its value
            return job.trial, job.seed, claimed
        run_id = claimed
        log_epoch = tracking.EpochLogger(client, run_id)
        beat = claims.Heartbeat(client, run_id, experiment_id=job.where.experiment_id, run_key=_key(job, config))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        interrupt_point()
        if log_epoch is not None:
            log_epoch(epoch, metrics)
            beat.check()  # another session judged this claim dead and took the pair: stop
        return False

    try:
        with beat or nullcontext(), tracking.recorded_run(client, run_id) if client is not None else nullcontext():
            with warnings.catch_warnings():  # an undefined Corr counts as 0, as in the search
                warnings.filterwarnings("ignore", message="Corr is undefined", category=RuntimeWarning)
                result = fit(config, search_view(data), seed=job.seed, callback=on_epoch, threads=threads,
                             evaluate_test=False, device=job.setup.device)
            value = trial_score(job.setup, result.history[result.best_epoch - 1][job.setup.metric_key])
            if client is not None:
                tracking.log_metrics(client, run_id, {"objective": value})
            if not math.isfinite(value):
                raise ValueError(f"validation {job.setup.metric} is {value}")
    except (Exception, claims.ClaimLost) as e:  # unrecorded: no candidate, and the next `tune` tries again
        emit({"event": "trial", "line": f"{line} FAILED {type(e).__name__}: {e}"})
        return job.trial, job.seed, math.nan
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage, job.settings))
    study.set_user_attr(attr_key(job.trial, job.seed), {"value": value, "mlflow_run_id": run_id or None})
    emit({"event": "trial", "line": f"{line} val {job.setup.metric} {value:.4f}"})
    return job.trial, job.seed, value


def attr_key(trial: int, seed: int) -> str:
    """The study attribute holding a (trial, seed) re-training's value."""
    return f"{PREFIX}:{trial}:{seed}"


def pair_key(study: str, trial: int, seed: int, storage: str | None, config: RunConfig, data_digest: str) -> str:
    """The `run_key` of a (trial, seed) re-training: its study, named and where it lives (two storages
    may each hold a study of that name), and what it trains on which data: a study started over under
    its old name (its journal removed, the tracking store kept) numbers its trials from 0 again, with
    other configs, perhaps on other data."""
    where = hashlib.sha256(storage_label(storage).encode()).hexdigest()[:12]
    what = stable_hash([config.config_hash(), data_digest])[:12]
    return f"{PREFIX}:{study}@{where}:{trial}:{seed}:{what}"


def _key(job: ConfirmJob, config: RunConfig) -> str:
    digest = dict(job.where.tags).get("data_digest", "") if job.where is not None else ""
    return pair_key(job.study, job.trial, job.seed, job.storage, config, digest)


def _claim(job: ConfirmJob, client: MlflowClient, config, emit: Emit, line: str) -> str | float:
    """Claim the pair's MLflow run, as ablation runs are claimed, so that two `tune` sessions on one
    study never re-train one pair twice: the new run's id, or the value another session recorded for
    it (waited for while it trains there)."""
    experiment_id, key = job.where.experiment_id, _key(job, config)
    while True:
        taken = claims.find_taken(client, experiment_id, key)
        if taken is None:
            run_id = tracking.start_run(
                client, experiment_id, f"confirm-{job.trial}-seed-{job.seed}", parent_run_id=job.where.parent_run_id,
                tags={"confirm_trial": str(job.trial), "confirm_seed": str(job.seed), "optuna_study": job.study,
                      "run_key": key, **dict(job.where.tags), **claims.claim_tags()},
                params={**config.flat(), "seed": job.seed})
            taken = claims.settle(client, experiment_id, key, run_id)
            if taken is None:
                return run_id
        if not taken.finished:
            emit({"event": "trial", "line": f"{line} {taken.describe()}; waiting for it"})
        done = claims.wait_for(client, experiment_id, [key])[key]
        if done is not None:  # FINISHED there: its value, in the study too (its writer may not be there yet)
            value = float(done.data.metrics.get("objective", math.nan))
            study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage, job.settings))
            if math.isfinite(value) and attr_key(job.trial, job.seed) not in study.user_attrs:
                study.set_user_attr(attr_key(job.trial, job.seed), {"value": value, "mlflow_run_id": done.info.run_id})
            return value
        # its process died or the run failed: try it here


def describe(choice: Choice, metric: str) -> str:
    """One line on how the winner was chosen."""
    seeds = len(choice.seed_values)
    spread = f" ± {choice.std:.4f}" if seeds > 1 else ""
    how = (f"best mean of {choice.candidates} top trial(s) re-trained" if choice.candidates
           else "best search value, not re-trained")
    start = choice.trial.user_attrs.get("start_from")
    own = f"; = the '{start}' ablation's own values: no sampled trial beat it" if start else ""
    return (f"trial {choice.trial.number}: validation {metric} {choice.mean:.4f}{spread} over {seeds} seed(s) "
            f"({how}; search value {choice.trial.value:.4f}{own})")


__all__ = ["Choice", "ConfirmJob", "choose", "pending", "retrain", "attr_key", "pair_key", "top_trials", "seed_values",
           "describe"]
