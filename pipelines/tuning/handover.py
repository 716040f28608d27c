"""The hand-over from a study to the suite: its chosen trial becomes the ablation `improved_tuned`
(the best validation mean of its top trials re-trained on more seeds, see confirm.py; without
re-training, its best trial).

The study is the source of truth (a study attribute); a YAML copy beside the storage lets a person
read or reuse the override. Reading never creates a storage or a study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from pipelines.spec import TUNED, Spec, SpecError, load_spec
from pipelines.tuning.confirm import Choice, choose, describe
from pipelines.tuning.spec import DEFAULT_TUNE_SPEC, TuneSpec, load_tune_spec
from pipelines.tuning.storage import default_storage_path, open_storage, storage_label


def default_study_name(spec: TuneSpec, quick: bool) -> str:
    return f"{spec.study}-quick" if quick else spec.study


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def save_best(study: optuna.Study, spec: TuneSpec, storage: str | None) -> tuple[Choice | None, Path | None]:
    """Record the chosen trial (which, on how many seeds, its validation mean and spread, its override)
    on the study as `improved_tuned` and its override in `<study>.best.yaml`; returns the choice and the
    YAML's path (None, None when the study has no COMPLETE trial)."""
    choice = choose(study, spec)
    if choice is None:
        return None, None
    record = choice.record(spec.metric)
    if study.user_attrs.get(TUNED) != record:
        study.set_user_attr(TUNED, record)
    # Beside the study's journal file; a database's studies (a URL) get the default folder.
    folder = Path(storage).parent if storage is not None and "://" not in storage else default_storage_path().parent
    path = folder / f"{study.study_name}.best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# The chosen {describe(choice, spec.metric)}\n# of Optuna study '{study.study_name}' "
        f"({storage_label(storage)}), as an ablation override of {spec.ablations}.\n"
        f"# Written by `python -m pipelines.run tune`; the study itself is the source of truth.\n"
        + yaml.safe_dump({TUNED: record["override"]}, sort_keys=False))
    return choice, path


def tune_spec_for(ablations_spec: str | Path | None) -> Path:
    """The tune spec whose study joins a suite of `ablations_spec`: a `tune.yaml` beside it that builds
    on it, else the default one."""
    if ablations_spec is not None:
        beside = Path(ablations_spec).parent / DEFAULT_TUNE_SPEC.name
        try:
            if beside.is_file() and Path(load_tune_spec(beside).ablations).resolve() == Path(ablations_spec).resolve():
                return beside
        except SpecError:
            pass  # not a tune spec for this suite
    return DEFAULT_TUNE_SPEC


def tuned_for(spec: Spec, *, quick: bool, data_digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """`improved_tuned` for a suite of `spec`: (its override, a line naming the study it is the choice
    of); (None, why it is left out) when that study's choice cannot join this spec; (None, None) when
    no study has one on this data."""
    tune_spec = tune_spec_for(spec.path)
    override = tuned_override(quick=quick, data_digest=data_digest, spec=tune_spec)
    if override is None:
        return None, None
    why_not = tuned_elsewhere(tune_spec, spec)
    if why_not is not None:
        return None, why_not
    return override, f"{TUNED} is the choice of study '{default_study_name(load_tune_spec(tune_spec), quick)}' " \
                     f"({tune_spec})"


def tuned_elsewhere(tune_spec: str | Path, spec: Spec) -> str | None:
    """Why the study of `tune_spec` cannot join a suite of `spec`, or None when it can: its override
    (the base ablation's own, plus the tuned values) is resolved on the suite's `base`, so a spec
    whose base differs from the one the study searched on would train a config no trial trained."""
    searched = load_tune_spec(tune_spec)
    on = load_spec(searched.ablations)
    if on.base == spec.base:
        return None
    return (f"{TUNED} left out: study '{searched.study}' searched on the base of {searched.ablations}, which "
            f"differs from the base of {spec.path}, so its config would be another here (run {TUNED} with "
            f"--spec {searched.ablations}, or tune on {spec.path} with a tune.yaml beside it)")


def tuned_override(study: str | None = None, storage: str | None = None, *, quick: bool = False,
                   data_digest: str | None = None, spec: str | Path | None = None) -> dict[str, Any] | None:
    """The best trial's ablation override (`{"model": {...}, "train": {...}}`), or None when the
    study does not exist, has no COMPLETE trial, or (with `data_digest`) was searched on other data."""
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
    if TUNED in found.user_attrs:  # the choice the last session made, re-trained seeds and all
        return dict(found.user_attrs[TUNED]["override"])
    best = best_trial(found)
    return dict(best.user_attrs["override"]) if best is not None else None


__all__ = ["TUNED", "default_study_name", "best_trial", "save_best", "tune_spec_for", "tuned_elsewhere",
           "tuned_for", "tuned_override"]
