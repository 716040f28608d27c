"""The tune spec (`specs/tune.yaml`): the study's settings and its search space, parsed and validated.

Loading checks everything a trial would otherwise fail on: every value the space can yield (alone
and in pairs) must make a valid config of the base ablation, and the sampler and pruner must build.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from msa.config import ConfigError, ModelConfig, RunConfig, TrainConfig, deep_merge
from pipelines.errors import UserError
from pipelines.spec import (
    SEED_LIMIT,
    Spec,
    SpecError,
    check_keys,
    check_mapping,
    check_name,
    check_positive_int,
    check_seeds,
    check_top_level,
    is_int,
    load_spec,
    number_hint,
    optional_mapping,
    read_yaml,
)
from pipelines.tuning.search import make_pruner, make_sampler
from pipelines.tuning.storage import StorageSettings

DEFAULT_TUNE_SPEC = Path(__file__).parent.parent / "specs" / "tune.yaml"

TUNE_KEYS = ("study", "ablations", "base", "experiment", "metric", "seeds", "trials", "sampler", "pruner",
             "confirm", "storage", "compare_with", "start_from", "quick", "space")
# Fields a trial may not sample: the pruner's steps follow epochs, and the objective is the metric
# the spec names, so neither may vary from trial to trial.
FIXED_FIELDS = ("train.epochs", "train.select_metric", "train.patience")


class TuneError(UserError):
    """A study cannot be run as asked (e.g. it exists with other data); the message says what to do."""


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
class Confirm:
    """After the search, the `top` trials by search value are re-trained on `seeds` (validation only);
    the one with the best mean over the search's seeds and these becomes `improved_tuned`."""

    top: int = 0                               # 0: no re-training; the best search value wins
    seeds: tuple[int, ...] = ()                # seeds other than the search's own


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
    confirm: Confirm = Confirm()

    @property
    def choice_seeds(self) -> tuple[int, ...]:
        """The seeds the winner's validation mean is taken over."""
        return self.seeds + self.confirm.seeds if self.confirm.top else self.seeds

    @property
    def direction(self) -> str:
        # One source of truth for "is larger better": the trainer's checkpoint selection rule.
        return "maximize" if TrainConfig(select_metric=self.metric).higher_is_better else "minimize"

    @property
    def metric_key(self) -> str:
        """The key of the metric in fit's per-epoch callback."""
        return TrainConfig(select_metric=self.metric).select_key


def load_tune_spec(path: str | Path | None = None) -> TuneSpec:
    path = Path(path) if path else DEFAULT_TUNE_SPEC
    return parse_tune_spec(read_yaml(path), str(path))


def parse_tune_spec(raw: Any, path: str) -> TuneSpec:
    check_top_level(raw, path, TUNE_KEYS, required=("study", "space"))
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
        message = str(e).replace("'select_metric' parameter of TrainConfig", "metric")
        raise SpecError(f"{path}: 'metric': {message}") from None
    seeds = check_seeds(raw.get("seeds", [ablations.seeds[0]]), path, "seeds")
    quick = optional_mapping(raw.get("quick"), path, "quick", "a mapping with key 'trials'")
    check_keys(quick, ("trials",), path, "'quick'")
    trials = check_positive_int(raw.get("trials", 50), path, "trials")
    quick_trials = check_positive_int(quick.get("trials", 8), path, "quick.trials")
    study = check_name(raw["study"], path, "study")
    experiment = check_name(raw["experiment"], path, "experiment") if raw.get("experiment") is not None else None
    compare_with = raw.get("compare_with", ["baseline", base])
    if not _names_of(compare_with, ablations):
        raise SpecError(f"{path}: 'compare_with' must list ablations of {ablations_path} "
                        f"({ablations.names}); got {compare_with!r}")
    sampler = dict(optional_mapping(raw.get("sampler"), path, "sampler", "a mapping of TPESampler arguments"))
    check_sampler(sampler, path)
    pruner = dict(optional_mapping(raw.get("pruner"), path, "pruner",
                                   "a mapping with 'type' and the pruner's arguments")) or {"type": "median"}
    spec = TuneSpec(
        path=path, study=study, ablations=str(ablations_path), base=base, experiment=experiment, metric=metric,
        seeds=seeds, trials=trials, quick_trials=quick_trials, sampler=sampler, pruner=pruner,
        storage=_parse_storage(optional_mapping(raw.get("storage"), path, "storage", "a mapping"), path),
        compare_with=tuple(compare_with),
        space=_parse_space(raw["space"], path), confirm=_parse_confirm(raw.get("confirm"), seeds, path))
    _validate_space(spec, ablations)
    start_from = [] if raw.get("start_from") is None else raw["start_from"]
    if not _names_of(start_from, ablations):
        raise SpecError(f"{path}: 'start_from' must list ablations of {ablations_path} "
                        f"({ablations.names}); got {start_from!r}")
    spec = dataclasses.replace(spec, start_from=tuple(
        (str(n), start_values(spec, ablations, str(n), path)) for n in dict.fromkeys(start_from)))
    try:  # fail at load, not in the first trial, on a misspelt sampler or pruner argument
        make_sampler(spec.sampler, seed=0)
        make_pruner(spec.pruner, steps=1)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{path}: 'sampler' or 'pruner': {e}") from None
    return spec


def _names_of(value: Any, ablations: Spec) -> bool:
    """`value` is a list of ablation names of `ablations`."""
    return isinstance(value, list) and all(isinstance(n, str) and n in ablations.ablations for n in value)


def check_sampler(sampler: Mapping[str, Any], path: str) -> None:
    """`sampler.seed`, and each TPESampler argument annotated as a bool, an int or a float, of that
    type: the sampler itself checks few of them, and only once a trial asks it for values."""
    if "seed" in sampler and not (is_int(sampler["seed"]) and 0 <= sampler["seed"] < SEED_LIMIT):
        raise SpecError(f"{path}: 'sampler.seed' must be an integer in [0, 2**32), got {sampler['seed']!r}")
    params = inspect.signature(optuna.samplers.TPESampler).parameters
    for key, value in sampler.items():
        annotation = params[key].annotation if key in params else None
        kinds = {t.strip() for t in annotation.split("|")} if isinstance(annotation, str) else set()
        if value is None and "None" in kinds:
            continue
        kinds.discard("None")
        if len(kinds) == 1 and (kind := kinds.pop()) in _SCALARS:   # e.g. "bool | None": a bool
            ok, what = _SCALARS[kind]
            if not ok(value):
                raise SpecError(f"{path}: 'sampler.{key}' must be {what}, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A TPESampler argument's annotation -> how to check a value for it, and what to call it.
_SCALARS = {"bool": (lambda v: isinstance(v, bool), "true or false"), "int": (is_int, "an integer"),
            "float": (_is_number, "a number")}


def _parse_confirm(raw: Any, seeds: tuple[int, ...], path: str) -> Confirm:
    if raw is None:
        return Confirm()
    check_mapping(raw, path, "confirm", "a mapping with keys 'top' and 'seeds'")
    check_keys(raw, ("top", "seeds"), path, "'confirm'")
    top = raw.get("top", 3)
    if not (is_int(top) and top >= 0):
        raise SpecError(f"{path}: 'confirm.top' must be an integer >= 0 (0: no re-training), got {top!r}")
    if top and "seeds" not in raw:
        raise SpecError(f"{path}: 'confirm' needs 'seeds': the seeds to re-train its top {top} trials on")
    extra = check_seeds(raw.get("seeds", [0]), path, "confirm.seeds") if top else ()
    if set(extra) & set(seeds):
        raise SpecError(f"{path}: 'confirm.seeds' must be other seeds than the search's {list(seeds)}, "
                        f"got {list(extra)}")
    return Confirm(top, extra)


def _parse_storage(raw: Mapping[str, Any], path: str) -> StorageSettings:
    allowed = [f.name for f in dataclasses.fields(StorageSettings)]
    check_keys(raw, allowed, path, "'storage'")
    for k, v in raw.items():
        if not (is_int(v) and v >= (0 if k == "max_retry" else 1)):
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
        hint = number_hint(bounds if isinstance(bounds, list) else [])
        ok = is_int if kind == "int" else _is_number
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(ok(b) for b in bounds)
                and bounds[0] <= bounds[1]):
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
    config = ablations.ablations[name]
    values: dict[str, Any] = {}
    for p in spec.space.values():
        if not p.active(values):
            continue
        section, key = p.name.split(".")
        value = getattr(getattr(config, section), key)  # every field, those left out of to_dict at default too
        if p.kind == "choices":
            if value not in p.choices:
                raise SpecError(f"{path}: start_from '{name}': its {p.name} is {value!r}, which is not among the "
                                f"space's choices {list(p.choices)}; add it there or start from another ablation")
        elif value is None:
            raise SpecError(f"{path}: start_from '{name}': its {p.name} is null (off), which the range "
                            f"[{p.low}, {p.high}] cannot express; tune it as choices with null among them, "
                            "or start from another ablation")
        else:
            value = min(max(value, p.low), p.high)
            value = int(value) if p.kind == "int" else float(value)
        values[p.name] = value
    return values


def _validate_space(spec: TuneSpec, ablations: Spec) -> None:
    """Every value the space can yield must make a valid config, checked once here instead of
    failing trials: each value alone against the base ablation, then every pair of values of two
    params (a component's constraint, such as attention's hidden % heads, may join two fields)."""
    base = ablations.ablations[spec.base].to_dict()

    def check(values: Mapping[str, Any]) -> ConfigError | None:
        override: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, key = name.split(".")
            override.setdefault(section, {})[key] = value
        try:
            RunConfig.from_dict(deep_merge(base, override))
        except ConfigError as e:
            return e
        return None

    candidates = {p.name: p.candidates() for p in spec.space.values()}
    for name, values in candidates.items():
        for value in values:
            if (error := check({name: value})) is not None:
                raise SpecError(f"{spec.path}: space: '{name}' can be {value!r}: {error}")
    for (a, a_values), (b, b_values) in itertools.combinations(candidates.items(), 2):
        for x, y in itertools.product(a_values, b_values):
            if (error := check({a: x, b: y})) is not None:
                raise SpecError(f"{spec.path}: space: '{a}' {x!r} with '{b}' {y!r} makes an invalid config: {error}")
