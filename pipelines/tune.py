"""The Optuna search around the improved model: objective, pruning, storage, tracking, and the tuned ablation.

A trial trains the ablations spec's `improved` config with sampled values (space in
`specs/tune.yaml`) on train, selects on valid, and never sees test: the objective is handed a view of
the data that holds no test split. Each trial is an MLflow run nested under one parent run per session.
The best trial's override becomes the ablation `improved_tuned`, trained over the suite's seeds and
compared like every other ablation.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np
import optuna
import yaml
from mlflow.entities import Metric
from mlflow.entities import Param as MlflowParam
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from msa.config import ConfigError, ModelConfig, RunConfig, TrainConfig, deep_merge, stable_hash
from msa.data import MOSIData
from msa.training import fit
from pipelines import tracking
from pipelines.executor import DataRef, install_sigterm_handler, stop_workers, threads_per_worker
from pipelines.spec import Spec, SpecError, check_keys, load_spec, read_yaml
from pipelines.stages.prepare import prepare
from pipelines.stages.train import Interrupted
from pipelines.suite import TUNED, SuiteResult, resolve_spec, run_suite

DEFAULT_TUNE_SPEC = Path(__file__).parent / "specs" / "tune.yaml"

TUNE_KEYS = ("study", "ablations", "base", "experiment", "metric", "seeds", "trials", "sampler", "pruner",
             "storage", "compare_with", "start_from", "quick", "space")
PRUNERS = ("median", "hyperband", "threshold", "none")
HEARTBEAT_KEY = "heartbeat"          # trial system attr: time.time() of the last heartbeat (journal storage)
# Fields a trial may not sample: the pruner's steps follow epochs, and the objective is the metric
# the spec names, so neither may vary from trial to trial.
FIXED_FIELDS = ("train.epochs", "train.select_metric", "train.patience")


class TuneError(ValueError):
    """A study cannot be run as asked (e.g. it exists with other data); the message says what to do."""


# --- the spec ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One dimension of the search space, as declared in the spec."""

    name: str                                  # <model|train>.<field>
    kind: str                                  # choices | int | float
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()   # sampled only if every earlier param has one of these values

    def active(self, sampled: Mapping[str, Any]) -> bool:
        return all(k in sampled and sampled[k] in values for k, values in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choices":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def candidates(self) -> list[Any]:
        """Every value for a discrete param, else its bounds: what loading the spec validates."""
        if self.kind == "choices":
            return list(self.choices)
        if self.kind == "int" and (self.high - self.low) / (self.step or 1) <= 4096:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self.low, self.high]


@dataclass(frozen=True)
class StorageSettings:
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 1


@dataclass(frozen=True)
class TuneSpec:
    path: str
    study: str
    ablations: str                             # path of the ablations spec the search builds on
    base: str                                  # the ablation a trial starts from
    experiment: str | None                     # None: the ablations spec's experiment
    metric: str                                # a TrainConfig.select_metric name
    seeds: tuple[int, ...]
    trials: int
    quick_trials: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    storage: StorageSettings
    compare_with: tuple[str, ...]
    space: dict[str, Param]
    start_from: tuple[tuple[str, dict[str, Any]], ...] = ()   # (ablation, its values in the space): first trials

    @property
    def direction(self) -> str:
        # One source of truth for "is larger better": the trainer's checkpoint selection rule.
        return "maximize" if TrainConfig(select_metric=self.metric).select_mode == "max" else "minimize"

    @property
    def metric_key(self) -> str:
        """The key of the metric in fit's per-epoch callback."""
        return "val_loss" if self.metric == "val_loss" else f"val_{self.metric}"


def load_tune_spec(path: str | Path | None = None) -> TuneSpec:
    path = Path(path) if path else DEFAULT_TUNE_SPEC
    return parse_tune_spec(read_yaml(path), str(path))


def parse_tune_spec(raw: Any, path: str) -> TuneSpec:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected a mapping with keys {list(TUNE_KEYS)}")
    check_keys(raw, TUNE_KEYS, path, "the spec")
    for key in ("study", "space"):
        if key not in raw:
            raise SpecError(f"{path}: missing key '{key}'")
    ablations_path = Path(path).parent / str(raw.get("ablations", "ablations.yaml"))
    ablations = load_spec(ablations_path)
    base = str(raw.get("base", "improved"))
    if base not in ablations.ablations:
        raise SpecError(f"{path}: 'base' must be an ablation of {ablations_path}; got {base!r}, "
                        f"the spec has {ablations.names}")
    metric = raw.get("metric", "Corr")
    try:
        TrainConfig(select_metric=metric)
    except ConfigError as e:
        raise SpecError(f"{path}: 'metric': {e}".replace("'select_metric' parameter of TrainConfig", "metric")) from None
    seeds = raw.get("seeds", [ablations.seeds[0]])
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) for s in seeds)):
        raise SpecError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    quick = raw.get("quick") or {}
    check_keys(quick, ("trials",), path, "'quick'")
    trials, quick_trials = raw.get("trials", 50), quick.get("trials", 8)
    for key, value in (("trials", trials), ("quick.trials", quick_trials)):
        if not (_is_int(value) and value >= 1):
            raise SpecError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    compare_with = raw.get("compare_with", ["baseline", base])
    if not isinstance(compare_with, list) or any(n not in ablations.ablations for n in compare_with):
        raise SpecError(f"{path}: 'compare_with' must list ablations of {ablations_path} "
                        f"({ablations.names}); got {compare_with!r}")
    sampler = dict(raw.get("sampler") or {})
    pruner = dict(raw.get("pruner") or {"type": "median"})
    spec = TuneSpec(
        path=path, study=str(raw["study"]), ablations=str(ablations_path), base=base,
        experiment=str(raw["experiment"]) if raw.get("experiment") else None, metric=metric,
        seeds=tuple(seeds), trials=trials, quick_trials=quick_trials, sampler=sampler, pruner=pruner,
        storage=_parse_storage(raw.get("storage") or {}, path), compare_with=tuple(compare_with),
        space=_parse_space(raw["space"], path))
    _validate_space(spec, ablations)
    start_from = raw.get("start_from") or []
    if not isinstance(start_from, list) or any(n not in ablations.ablations for n in start_from):
        raise SpecError(f"{path}: 'start_from' must list ablations of {ablations_path} "
                        f"({ablations.names}); got {start_from!r}")
    spec = dataclasses.replace(spec, start_from=tuple(
        (str(n), start_values(spec, ablations, str(n), path)) for n in dict.fromkeys(start_from)))
    try:  # fail at load, not in the first trial, on a misspelt sampler or pruner argument
        make_sampler(spec, seed=0)
        make_pruner(spec.pruner, steps=1)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{path}: 'sampler' or 'pruner': {e}") from None
    return spec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_storage(raw: Any, path: str) -> StorageSettings:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: 'storage' must be a mapping")
    allowed = [f.name for f in dataclasses.fields(StorageSettings)]
    check_keys(raw, allowed, path, "'storage'")
    for k, v in raw.items():
        if not (_is_int(v) and v >= (0 if k == "max_retry" else 1)):
            raise SpecError(f"{path}: 'storage.{k}' must be a positive integer (seconds or a count), got {v!r}")
    return StorageSettings(**raw)


def _parse_space(raw: Any, path: str) -> dict[str, Param]:
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(f"{path}: 'space' must be a non-empty mapping of <model|train>.<field> -> distribution")
    fields = {"model": [f.name for f in dataclasses.fields(ModelConfig)],
              "train": [f.name for f in dataclasses.fields(TrainConfig)]}
    space: dict[str, Param] = {}
    for name, d in raw.items():
        where = f"{path}: space: '{name}'"
        section, _, key = str(name).partition(".")
        if section not in fields or key not in fields[section]:
            raise SpecError(f"{where}: not a config field; use model.<field> or train.<field> with fields "
                            f"from msa/config.py (model: {fields['model']}; train: {fields['train']})")
        if name in FIXED_FIELDS:
            raise SpecError(f"{where}: cannot be searched (the pruner's steps and the objective depend on it)")
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected a mapping such as {{choices: [...]}} or {{float: [low, high]}}")
        check_keys(d, ("choices", "int", "float", "step", "log", "when"), path, f"space '{name}'")
        kinds = [k for k in ("choices", "int", "float") if k in d]
        if len(kinds) != 1:
            raise SpecError(f"{where}: give exactly one of 'choices', 'int', 'float'")
        kind = kinds[0]
        when = _parse_when(d.get("when"), space, where)
        log = d.get("log", False)
        if not isinstance(log, bool):
            raise SpecError(f"{where}: 'log' must be true or false, got {log!r}")
        if kind == "choices":
            choices = d["choices"]
            if not (isinstance(choices, list) and choices
                    and all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)):
                raise SpecError(f"{where}: 'choices' must be a non-empty list of numbers, strings, booleans "
                                f"or null, got {choices!r}")
            space[name] = Param(name, kind, choices=tuple(choices), when=when)
            continue
        bounds = d[kind]
        hint = " (write 1.0e-4, not 1e-4: YAML reads the latter as text)" if any(
            isinstance(b, str) for b in (bounds if isinstance(bounds, list) else [])) else ""
        ok = _is_int if kind == "int" else _is_number
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(ok(b) for b in bounds) and bounds[0] <= bounds[1]):
            raise SpecError(f"{where}: '{kind}' must be [low, high] with low <= high, {kind}s, got {bounds!r}{hint}")
        step = d.get("step")
        if step is not None and not ((ok(step)) and step > 0):
            raise SpecError(f"{where}: 'step' must be a positive {kind}, got {step!r}")
        if log and (bounds[0] <= 0 or step is not None):
            raise SpecError(f"{where}: a log scale needs low > 0 and no step")
        space[name] = Param(name, kind, low=bounds[0], high=bounds[1], step=step, log=log, when=when)
    return space


def _parse_when(raw: Any, earlier: Mapping[str, Param], where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: 'when' must map an earlier parameter to a value or a list of values")
    for k in raw:
        if k not in earlier:
            raise SpecError(f"{where}: 'when' names {k!r}, which is not a parameter declared above it")
    return tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in raw.items())


def start_values(spec: TuneSpec, ablations: Spec, name: str, path: str) -> dict[str, Any]:
    """Ablation `name`'s own values for the space's params, so that a study can start from it: a
    numeric value outside its range is clipped into it (weight decay 0 becomes the range's floor);
    a value that is not among a param's choices cannot be expressed, which is an error."""
    config = ablations.ablations[name].to_dict()
    values: dict[str, Any] = {}
    for p in spec.space.values():
        if not p.active(values):
            continue
        section, key = p.name.split(".")
        value = config[section][key]
        if p.kind == "choices":
            if value not in p.choices:
                raise SpecError(f"{path}: start_from '{name}': its {p.name} is {value!r}, which is not among the "
                                f"space's choices {list(p.choices)}; add it there or start from another ablation")
        else:
            value = min(max(value, p.low), p.high)
            value = int(value) if p.kind == "int" else float(value)
        values[p.name] = value
    return values


def _validate_space(spec: TuneSpec, ablations: Spec) -> None:
    """Every value the space can yield must make a valid config, checked once here instead of
    failing trials: hidden x heads pairwise (attention's one joint constraint), then each value
    alone against the base ablation."""
    base = ablations.ablations[spec.base].to_dict()
    hidden = spec.space["model.hidden"].candidates() if "model.hidden" in spec.space else [base["model"]["hidden"]]
    heads = spec.space["model.heads"].candidates() if "model.heads" in spec.space else [base["model"]["heads"]]
    bad = [(h, n) for h in hidden for n in heads if h % n]
    if bad:
        raise SpecError(f"{spec.path}: space: model.hidden {bad[0][0]} is not divisible by model.heads {bad[0][1]}; "
                        f"attention needs every hidden choice to be a multiple of every heads choice "
                        f"(here of {math.lcm(*heads)})")
    for p in spec.space.values():
        section, key = p.name.split(".")
        for value in p.candidates():
            try:
                RunConfig.from_dict(deep_merge(base, {section: {key: value}}))
            except ConfigError as e:
                raise SpecError(f"{spec.path}: space: '{p.name}' can be {value!r}: {e}") from None


# --- storage ----------------------------------------------------------------------------------------

class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage with Optuna's heartbeat protocol, which its RDBStorage has and (as of
    Optuna 5) its JournalStorage lacks. While a trial runs, Optuna's heartbeat thread stamps it every
    `heartbeat_interval` s; before each new trial, any process on the study fails the RUNNING trials
    that have neither a stamp nor a start within `grace_period` s, then calls the stale-trial
    callback (which re-queues their parameters). The start time counts so that a re-queued trial,
    which inherits its predecessor's old stamp, is not failed before its own thread has stamped it."""

    def __init__(self, backend: JournalFileBackend, settings: StorageSettings,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = settings.heartbeat_interval
        self.grace_period = settings.grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:  # another process judged it dead; its tell will say so
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if now - max(float(t.system_attrs.get(HEARTBEAT_KEY, 0.0)), started) > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name Optuna < 4.9 asks for


class OnDeadTrial:
    """Called on a trial failed for want of heartbeats: mark its MLflow run FAILED (its worker cannot),
    then re-queue its parameters with Optuna's retry callback, up to `max_retry` times."""

    def __init__(self, max_retry: int, grace_period: int):
        self.max_retry, self.grace_period = max_retry, grace_period

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                client = MlflowClient(tracking.tracking_uri())
                if client.get_run(run_id).info.status == tracking.RUNNING:
                    client.set_tag(run_id, "optuna_state", TrialState.FAIL.name)
                    client.set_tag(run_id, "error", f"worker died: no heartbeat for over {self.grace_period} s")
                    client.set_terminated(run_id, tracking.FAILED)
            except Exception as e:  # another tracking store, or none reachable: the study is still right
                print(f"trial {trial.number}: could not mark its MLflow run failed: {e}", file=sys.stderr)
        if self.max_retry:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
                    or optuna.storages.RetryFailedTrialCallback  # Optuna < 4.9
                retry_cls(max_retry=self.max_retry)(study, trial)


def default_storage_path() -> Path:
    """The default study storage: a journal file beside the tracking store."""
    return tracking.local_root() / "optuna" / "journal.log"


def storage_label(storage: str | None) -> str:
    if storage is None:
        return str(default_storage_path())
    if "://" not in storage:
        return storage
    scheme, rest = storage.split("://", 1)
    return f"{scheme}://{rest.split('@')[-1]}"  # never print a URL's password


def open_storage(storage: str | None, settings: StorageSettings = StorageSettings()) -> BaseStorage:
    """`None`: the default journal file; a URL (postgresql://, mysql://, sqlite:///): an RDB storage;
    anything else: a journal file at that path. Both kinds fail and re-queue trials whose worker died."""
    on_dead = OnDeadTrial(settings.max_retry, settings.grace_period)
    if storage is not None and "://" in storage:
        callback_arg = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                        else "failed_trial_callback")  # Optuna < 4.9
        with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(storage, heartbeat_interval=settings.heartbeat_interval,
                              grace_period=settings.grace_period, **{callback_arg: on_dead})
    path = Path(storage) if storage is not None else default_storage_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return HeartbeatJournalStorage(JournalFileBackend(str(path)), settings, on_dead)


# --- sampler and pruner -----------------------------------------------------------------------------

def make_sampler(spec: TuneSpec, seed: int) -> optuna.samplers.TPESampler:
    kwargs = {k: v for k, v in spec.sampler.items() if k != "seed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)


def session_seed(base_seed: int, n_existing: int, worker: int) -> int:
    """The sampler seed of one worker in one session. A resumed study must not replay the first
    session's random start-up draws, nor may two parallel workers draw the same ones."""
    return int(stable_hash([base_seed, n_existing, worker]), 16) % (2**31)


def make_pruner(pruner: Mapping[str, Any], steps: int) -> optuna.pruners.BasePruner:
    """The spec's pruner; `steps` (epochs x seeds) is Hyperband's default max_resource."""
    kwargs = {k: v for k, v in pruner.items() if k != "type"}
    kind = pruner.get("type", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**{"max_resource": steps, **kwargs})
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**kwargs)
    if kind == "none":
        return optuna.pruners.NopPruner(**kwargs)
    raise ValueError(f"pruner type must be one of {list(PRUNERS)}, got {kind!r}")


# --- the objective ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, picklable for worker processes."""

    base: dict[str, Any]                       # the ablations spec's base
    base_override: dict[str, Any]              # the base ablation's override, as written
    epochs: int
    seeds: tuple[int, ...]
    metric: str
    metric_key: str
    direction: str
    space: dict[str, Param]

    @classmethod
    def from_specs(cls, spec: TuneSpec, suite_spec: Spec) -> "TrialSetup":
        return cls(base=suite_spec.base, base_override=suite_spec.overrides[spec.base],
                   epochs=suite_spec.ablations[spec.base].train.epochs, seeds=spec.seeds, metric=spec.metric,
                   metric_key=spec.metric_key, direction=spec.direction, space=spec.space)

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

    def __init__(self, where: TrialTracking, trial: optuna.Trial):
        self.client = MlflowClient(where.uri)
        run = self.client.create_run(where.experiment_id, run_name=f"trial-{trial.number}", tags={
            MLFLOW_PARENT_RUN_ID: where.parent_run_id, "optuna_trial": str(trial.number),
            "optuna_study": where.study, "optuna_state": TrialState.RUNNING.name, **dict(where.tags),
            **({"start_from": trial.user_attrs["start_from"]} if "start_from" in trial.user_attrs else {})})
        self.run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", self.run_id)

    def log_config(self, config: RunConfig, seeds: tuple[int, ...]) -> None:
        params = tracking.flat_params({**config.flat(), "seeds": list(seeds)})
        self.client.log_batch(self.run_id, params=[MlflowParam(k, v) for k, v in params.items()])

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if math.isfinite(v)])

    def end(self, state: TrialState, status: str, value: float | None = None, error: str | None = None) -> None:
        if value is not None and math.isfinite(value):
            self.client.log_metric(self.run_id, "objective", value)
        if error:
            self.client.set_tag(self.run_id, "error", error[:5000])
        self.client.set_tag(self.run_id, "optuna_state", state.name)
        self.client.set_terminated(self.run_id, status)


def objective(trial: optuna.Trial, setup: TrialSetup, data: MOSIData, *, where: TrialTracking | None = None,
              threads: int | None = None, stream: TextIO | None = None) -> float:
    """Train one sampled config on train, select on valid; return the mean over seeds of the
    selected epoch's validation metric. Every epoch reports to the pruner."""
    start = time.monotonic()
    run = TrialRun(where, trial) if where is not None else None
    last = {"step": 0, "value": math.nan}
    try:
        values = sample(trial, setup.space)
        override = override_of(setup, values)
        trial.set_user_attr("override", override)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        config = RunConfig.from_dict(deep_merge(deep_merge(setup.base, override), {"train": {"epochs": setup.epochs}}))
        if run is not None:
            run.log_config(config, setup.seeds)
        value = _train_trial(trial, config, search_view(data), setup, threads, run, last)
    except optuna.TrialPruned:
        _end(run, stream, trial, TrialState.PRUNED, tracking.FINISHED, last["value"], start, setup,
             f"at step {last['step']}/{setup.steps}")
        raise
    except Exception as e:
        _end(run, stream, trial, TrialState.FAIL, tracking.FAILED, None, start, setup, f"{type(e).__name__}: {e}")
        raise
    except KeyboardInterrupt:
        _end(run, stream, trial, TrialState.FAIL, tracking.KILLED, None, start, setup, "interrupted")
        raise
    # Optuna fails a trial that returns NaN (e.g. a model whose predictions are constant: no Corr).
    state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
    _end(run, stream, trial, state, tracking.FINISHED if math.isfinite(value) else tracking.FAILED, value, start,
         setup, None if math.isfinite(value) else f"the objective is {value}")
    return value


def _train_trial(trial: optuna.Trial, config: RunConfig, data: MOSIData, setup: TrialSetup, threads: int | None,
                 run: TrialRun | None, last: dict[str, Any]) -> float:
    mode = "max" if setup.direction == "maximize" else "min"
    metric_name = "loss" if setup.metric == "val_loss" else setup.metric

    def score(value: float) -> float:
        # Corr is undefined (NaN) for constant predictions, a model that learnt nothing: count it as
        # 0, no correlation. Left NaN, Optuna would fail the trial and TPE would not learn to avoid it.
        return 0.0 if setup.metric == "Corr" and math.isnan(value) else value

    reference = "start_from" in trial.user_attrs  # a start point runs to the end: it is what the search must beat
    results = []
    for i, seed in enumerate(setup.seeds):
        best: float | None = None

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            nonlocal best
            step = i * setup.epochs + epoch  # steps run on across seeds, the same for every trial
            if run is not None:
                run.log_epoch(step, {k: v for k, v in metrics.items() if k != "epoch"})
            value = score(metrics[setup.metric_key])
            # The pruner sees the best so far, i.e. what the trial would return if stopped now; it
            # is steadier than one noisy epoch. NaN never replaces a number (nor is kept over one).
            if best is None or math.isnan(best) or (value > best if mode == "max" else value < best):
                best = value
            last.update(step=step, value=best)
            trial.report(best, step)
            return not reference and trial.should_prune()

        with warnings.catch_warnings():  # the undefined Corr above is expected, and handled
            warnings.filterwarnings("ignore", message="Corr is undefined", category=RuntimeWarning)
            result = fit(config, data, seed=seed, callback=on_epoch, threads=threads, evaluate_test=False)
        if result.stop_reason == "callback":
            raise optuna.TrialPruned(f"pruned at step {last['step']}")
        results.append(score(result.val_metrics[metric_name]))
    return float(np.mean(results))


def _end(run: TrialRun | None, stream: TextIO | None, trial: optuna.Trial, state: TrialState, status: str,
         value: float | None, start: float, setup: TrialSetup, note: str | None) -> None:
    if run is not None:
        try:
            run.end(state, status, value if state == TrialState.COMPLETE else None,
                    note if state == TrialState.FAIL else None)
        except Exception as e:  # tracking trouble must not hide the trial's own outcome
            print(f"trial {trial.number}: could not record the MLflow run: {e}", file=sys.stderr)
    if stream is not None:
        shown = f"val {setup.metric} {value:.4f}" if value is not None and math.isfinite(value) else ""
        if not note and "start_from" in trial.user_attrs:
            note = f"= {trial.user_attrs['start_from']}"
        print(f"trial {trial.number:>4}  {state.name:<8} {shown:<18} {(note or '')[:120]:<22} "
              f"{time.monotonic() - start:6.1f} s", file=stream, flush=True)


# --- a study session --------------------------------------------------------------------------------

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


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
    data: DataRef
    threads: int


def _optimize(job: WorkerJob, data: MOSIData, stream: TextIO | None) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage, job.settings),
                              sampler=make_sampler(job.spec, job.sampler_seed),
                              pruner=make_pruner(job.spec.pruner, job.setup.steps))
    # Counting running trials too keeps parallel workers from overshooting the target; a WAITING
    # (re-queued) trial is not counted, so it is always run.
    if len(study.get_trials(deepcopy=False, states=COUNTED)) >= job.target:
        return
    study.optimize(lambda t: objective(t, job.setup, data, where=job.where, threads=job.threads, stream=stream),
                   timeout=job.timeout, catch=(Exception,),
                   callbacks=[optuna.study.MaxTrialsCallback(job.target, states=COUNTED)])


_START: dict[str, Any] = {}


def _init_worker(barrier) -> None:
    _START["barrier"] = barrier


def _worker_main(job: WorkerJob, uri: str) -> None:
    install_sigterm_handler()  # SIGTERM fails the trial and kills its run, as Ctrl-C does
    os.environ["MLFLOW_TRACKING_URI"] = uri
    data = job.data.load()
    try:
        # Start together: else the first worker up takes trials while the others still import torch,
        # and the sampler's start-up draws bunch up in one process.
        _START["barrier"].wait(timeout=600)
    except threading.BrokenBarrierError:  # a worker died on the way up; the others go on without it
        pass
    _optimize(job, data, sys.stderr)


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
    best: FrozenTrial | None                   # the study's best COMPLETE trial
    override: dict[str, Any] | None            # the best trial's ablation override (improved_tuned)
    best_path: Path | None                     # the YAML copy of it
    metric: str
    suite_spec: Spec                           # the resolved ablations spec (quick / epochs applied)
    seconds: float

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.trials)


def default_study_name(spec: TuneSpec, quick: bool) -> str:
    return f"{spec.study}-quick" if quick else spec.study


def run_study(spec: TuneSpec, *, data_source: str | None = None, quick: bool = False, epochs: int | None = None,
              trials: int | None = None, timeout: float | None = None, storage: str | None = None,
              study_name: str | None = None, workers: int = 1, stream: TextIO | None = None) -> StudySession:
    """Run (or continue) the study until it holds `trials` trials or `timeout` seconds pass, on
    `workers` local processes sharing the storage; record it all under one MLflow parent run."""
    stream = stream or sys.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    suite_spec = resolve_spec(spec.ablations, only=None, seeds=None, epochs=epochs, quick=quick)
    source = data_source or suite_spec.data
    data = prepare(source, quick=quick)
    print(data.summary().splitlines()[0], file=stream, flush=True)
    setup = TrialSetup.from_specs(spec, suite_spec)
    name = study_name or default_study_name(spec, quick)
    target = trials or (spec.quick_trials if quick else spec.trials)
    study = _open_study(spec, storage, name, setup, data)
    n_before = len(study.trials)
    for start, values in spec.start_from:  # once per study: a trial with these values is never queued again
        study.enqueue_trial(values, user_attrs={"start_from": start}, skip_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # so the count below and the report are honest

    experiment = spec.experiment or suite_spec.experiment
    client, experiment_id = tracking.setup(experiment)
    tags = {"synthetic": str(data.synthetic).lower(), "data_digest": data.digest, "data_source": data.source,
            "code_version": tracking.code_version()}
    # No `suite` tag: the comparison looks for suite parents by it, and a study session is not one.
    parent = client.create_run(experiment_id, run_name=f"tune {name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                               tags={"tune_study": name, "optuna_study": name, "optuna_storage": storage_label(storage),
                                     "quick": str(quick).lower(), **tags})
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[MlflowParam(k, str(v)) for k, v in {
        "study": name, "trials_target": target, "timeout": timeout, "metric": spec.metric, "direction": spec.direction,
        "epochs": setup.epochs, "seeds": ",".join(map(str, setup.seeds)), "base": spec.base,
        "pruner": spec.pruner.get("type", "median"), "sampler_seed": spec.sampler.get("seed"),
        "workers": workers, "tune_spec": spec.path, "ablations_spec": spec.ablations}.items()])

    threads = threads_per_worker(workers)
    where = TrialTracking(tracking.tracking_uri(), experiment_id, parent_id, name, tuple(tags.items()))
    jobs = [WorkerJob(storage, spec.storage, name, target, timeout,
                      session_seed(int(spec.sampler.get("seed", 0)), n_before, w), spec, setup, where,
                      DataRef(source, quick), threads) for w in range(workers)]
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    print(f"study '{name}' ({storage_label(storage)}): {done} of {target} trials done or running; "
          f"{workers} worker(s) x {threads} thread(s), {setup.epochs} epochs x {len(setup.seeds)} seed(s) per "
          f"trial, validation {spec.metric} ({spec.direction}), pruner {spec.pruner.get('type', 'median')}",
          file=stream, flush=True)

    install_sigterm_handler()
    status = tracking.FINISHED
    try:
        _run_workers(jobs, data, stream)
    except KeyboardInterrupt:
        status = tracking.KILLED
        raise
    except BaseException:
        status = tracking.FAILED
        raise
    finally:
        try:
            session = _finish_session(spec, storage, name, n_before, client, experiment, experiment_id, parent_id,
                                      data, suite_spec, started)
        finally:
            client.set_terminated(parent_id, status)
    return session


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


def _run_workers(jobs: list[WorkerJob], data: MOSIData, stream: TextIO) -> None:
    if len(jobs) == 1:
        _optimize(jobs[0], data, stream)
        return
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    pool = ProcessPoolExecutor(max_workers=len(jobs), mp_context=ctx, initializer=_init_worker,
                               initargs=(ctx.Barrier(len(jobs)),))
    futures = []
    try:
        futures = [pool.submit(_worker_main, job, tracking.tracking_uri()) for job in jobs]
        for future in futures:
            future.result()
    except Interrupted:
        stop_workers(pool, futures, timeout=60)  # each worker fails its trial and kills its run
        raise
    except BaseException:
        wait(futures, timeout=60)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish_session(spec: TuneSpec, storage: str | None, name: str, n_before: int, client, experiment: str,
                    experiment_id: str, parent_id: str, data: MOSIData, suite_spec: Spec,
                    started: float) -> StudySession:
    """Save the best trial as `improved_tuned` (study attr + YAML) and put the session's summary and
    plots on the parent run."""
    study = optuna.load_study(study_name=name, storage=open_storage(storage, spec.storage))
    all_trials = study.get_trials(deepcopy=False)
    session_trials = [t for t in all_trials if t.number >= n_before]
    best = _best_trial(study)
    override = dict(best.user_attrs["override"]) if best is not None else None
    best_path = None
    if best is not None:
        record = {"trial": best.number, "value": best.value, "metric": spec.metric, "override": override}
        if study.user_attrs.get(TUNED) != record:
            study.set_user_attr(TUNED, record)
        best_path = default_storage_path().parent / f"{name}.best.yaml"
        best_path.parent.mkdir(parents=True, exist_ok=True)
        best_path.write_text(
            f"# The best trial ({best.number}, validation {spec.metric} {best.value:.4f}) of Optuna study '{name}' "
            f"({storage_label(storage)}),\n# as an ablation override of {spec.ablations}. Written by "
            f"`python -m pipelines.run tune`; the study itself is the source of truth.\n"
            + yaml.safe_dump({TUNED: override}, sort_keys=False))
    states = {s: sum(t.state == s for t in all_trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    metrics = {f"n_{s.name.lower()}": n for s, n in states.items()} | {
        f"session_n_{s.name.lower()}": sum(t.state == s for t in session_trials) for s in states}
    if best is not None:
        metrics |= {f"best_val_{spec.metric}": best.value, "best_trial": best.number}
    try:
        for k, v in metrics.items():
            client.log_metric(parent_id, k, v)
        if best is not None:
            client.log_batch(parent_id, params=[MlflowParam(f"best.{k}", str(v)) for k, v in best.params.items()])
            client.set_tag(parent_id, "best_trial", str(best.number))
        _log_study_artifacts(client, parent_id, study, best_path)
    except Exception as e:  # the study is safe in its storage; a tracking hiccup must not lose the session
        print(f"could not record the session summary in MLflow: {type(e).__name__}: {e}", file=sys.stderr)
    return StudySession(name, storage_label(storage), experiment, experiment_id, parent_id, data.source, data.digest,
                        data.synthetic, session_trials, len(all_trials), best, override, best_path, spec.metric,
                        suite_spec, time.monotonic() - started)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def _log_study_artifacts(client, run_id: str, study: optuna.Study, best_path: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: plots go to files
    import matplotlib.pyplot as plt
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


# --- the tuned model joins the comparison -----------------------------------------------------------

@dataclass
class TuneResult:
    session: StudySession
    suite: SuiteResult | None                  # improved_tuned beside compare_with; None without a best trial
    comparison: Any | None = None              # pipelines.stages.compare.Comparison of that suite
    comparison_note: str | None = None         # why there is no comparison, when there is none


def tune(spec: TuneSpec, *, data_source: str | None = None, quick: bool = False, epochs: int | None = None,
         trials: int | None = None, timeout: float | None = None, storage: str | None = None,
         study_name: str | None = None, workers: int | None = None, stream: TextIO | None = None) -> TuneResult:
    """The `tune` pipeline: run the study, then train `improved_tuned` beside `compare_with` over
    the suite's seeds (cached runs are not redone) and refresh the comparison."""
    stream = stream or sys.stderr
    session = run_study(spec, data_source=data_source, quick=quick, epochs=epochs, trials=trials, timeout=timeout,
                        storage=storage, study_name=study_name, workers=workers or 1, stream=stream)
    if session.override is None:
        return TuneResult(session, None, comparison_note=f"study '{session.study}' has no COMPLETE trial yet: "
                                                         "nothing to add to the comparison")
    suite_spec = session.suite_spec
    suite_spec = (suite_spec.select(spec.compare_with) if spec.compare_with
                  else dataclasses.replace(suite_spec, ablations={}, overrides={}))
    result = run_suite(suite_spec, data_source=data_source, quick=quick, workers=workers, stream=stream,
                       extra_ablations={TUNED: session.override}, suite_name="tune")
    comparison, note = refresh_comparison(result)
    return TuneResult(session, result, comparison, note)


def refresh_comparison(result: SuiteResult) -> tuple[Any | None, str | None]:
    """(the comparison of the suite, None), or (None, why not) when this checkout has no comparison
    stage or the suite cannot be compared (e.g. `compare_with` names no baseline)."""
    try:
        from pipelines.stages import compare as stage
    except ModuleNotFoundError as e:
        if e.name != "pipelines.stages.compare":
            raise
        return None, "comparison not refreshed: this checkout has no pipelines/stages/compare.py"
    client, _ = tracking.setup(result.experiment)
    try:
        return stage.compare(client, result.experiment_id, suite_run_id=result.parent_run_id), None
    except stage.CompareError as e:  # the runs are recorded all the same; `compare` can be re-run
        return None, f"comparison not refreshed: {e}"


def tuned_override(study: str | None = None, storage: str | None = None, *, quick: bool = False,
                   data_digest: str | None = None, spec: str | Path | None = None) -> dict[str, Any] | None:
    """The best trial's ablation override (`{"model": {...}, "train": {...}}`), or None when the
    study does not exist, has no COMPLETE trial, or (with `data_digest`) was searched on other data.
    Reads only; never creates a storage or a study."""
    tune_spec = load_tune_spec(spec)
    name = study or default_study_name(tune_spec, quick)
    if (storage is None or "://" not in storage) and not Path(storage or default_storage_path()).is_file():
        return None
    try:
        found = optuna.load_study(study_name=name, storage=open_storage(storage, tune_spec.storage))
    except KeyError:
        return None
    if data_digest is not None and found.user_attrs.get("data_digest") != data_digest:
        return None
    best = _best_trial(found)
    return dict(best.user_attrs["override"]) if best is not None else None


def summary(session: StudySession) -> str:
    """What a person reads at the end of a session."""
    n = len(session.trials)
    lines = [f"study '{session.study}' ({session.storage}): {n} trial(s) this session "
             f"({session.count(TrialState.COMPLETE)} complete, {session.count(TrialState.PRUNED)} pruned, "
             f"{session.count(TrialState.FAIL)} failed), {session.n_total} in all, "
             f"in {session.seconds:.0f} s"]
    if session.best is None:
        lines.append("no COMPLETE trial yet")
    else:
        b = session.best
        lines.append(f"best: trial {b.number}, validation {session.metric} {b.value:.4f}")
        lines += [f"  {k} = {v}" for k, v in b.params.items()]
        lines.append(f"saved as ablation '{TUNED}': {session.best_path}")
    lines.append(f"tune run {session.parent_run_id} in experiment '{session.experiment}'"
                 + ("  (SYNTHETIC data)" if session.synthetic else ""))
    return "\n".join(lines)


__all__ = ["TUNED", "TuneSpec", "TuneError", "TuneResult", "StudySession", "load_tune_spec", "open_storage", "run_study", "tune",
           "tuned_override", "summary", "objective", "make_pruner", "make_sampler", "TrialSetup"]
