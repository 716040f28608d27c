"""Declarative pipeline specs: a base config plus named ablations as small overrides of it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from msa.config import ConfigError, RunConfig, deep_merge

DEFAULT_SPEC = Path(__file__).parent / "specs" / "ablations.yaml"
TUNED = "improved_tuned"  # the Optuna-tuned improved model; joins a suite once a study has a best trial
SPEC_KEYS = ("experiment", "data", "seeds", "base", "ablations", "quick")
QUICK_KEYS = ("epochs", "seeds")


class SpecError(ValueError):
    """A spec file is not valid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Spec:
    path: str
    experiment: str
    data: str
    seeds: tuple[int, ...]
    base: dict[str, Any]
    ablations: dict[str, RunConfig]          # in the spec's order; baseline first by convention
    overrides: dict[str, dict[str, Any]]     # what each ablation changes, as written
    quick: dict[str, Any]
    train_overrides: dict[str, Any] = field(default_factory=dict)  # set on every ablation (--epochs)

    @property
    def names(self) -> list[str]:
        return list(self.ablations)

    def select(self, only: Sequence[str] | None) -> Spec:
        """Only the named ablations, in the spec's order (None: all); an unknown name is an error."""
        if only is None:
            return self
        unknown = [n for n in only if n not in self.ablations]
        if unknown:
            raise SpecError(f"{self.path}: unknown ablation(s) {unknown}; the spec has {self.names}")
        keep = [n for n in self.ablations if n in only]
        return replace(self, ablations={n: self.ablations[n] for n in keep},
                       overrides={n: self.overrides[n] for n in keep})

    def with_train(self, **train: Any) -> Spec:
        """Every ablation with these TrainConfig fields set (e.g. epochs from the command line)."""
        if not train:
            return self
        spec = replace(self, train_overrides={**self.train_overrides, **train})
        return replace(spec, ablations={n: spec._resolve(n, spec.overrides[n]) for n in spec.ablations})

    def with_ablation(self, name: str, override: Mapping[str, Any]) -> Spec:
        """The spec plus one more ablation (the tuned model joins this way), with the same train
        overrides as the others, so `--quick` and `--epochs` apply to it too."""
        config = self._resolve(name, override)
        return replace(self, ablations={**self.ablations, name: config},
                       overrides={**self.overrides, name: dict(override)})

    def _resolve(self, name: str, override: Mapping[str, Any]) -> RunConfig:
        return _resolve(self.path, name, self.base, deep_merge(override, {"train": self.train_overrides}))


def resolve_spec(spec_path: str | None, *, only: Sequence[str] | None, seeds: Sequence[int] | None,
                 epochs: int | None, quick: bool, precision: str | None = None) -> Spec:
    """The spec with the profile and command-line overrides applied (command line wins)."""
    spec = load_spec(spec_path).select(only)
    if quick:
        spec = spec.with_train(epochs=spec.quick.get("epochs", 2))
        spec = _with_seeds(spec, spec.quick.get("seeds", [spec.seeds[0]]))
    if epochs is not None:
        spec = spec.with_train(epochs=epochs)
    if precision is not None:
        spec = spec.with_train(precision=precision)
    if seeds:
        spec = _with_seeds(spec, seeds)
    return spec


def _with_seeds(spec: Spec, seeds: Sequence[int]) -> Spec:
    return replace(spec, seeds=tuple(dict.fromkeys(int(s) for s in seeds)))  # a repeated seed runs once


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one silently, so an ablation pasted twice under one name would replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A spec file's content; a missing file or broken YAML is a SpecError naming the file."""
    if not path.is_file():
        bundled = DEFAULT_SPEC.parent / path.name
        hint = f" (the bundled one is {bundled})" if bundled.is_file() and not path.is_absolute() else ""
        raise SpecError(f"{path}: no such spec file{hint}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a YAML text file (it is not UTF-8); give a spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror})") from None


def load_spec(path: str | Path | None = None) -> Spec:
    path = Path(path) if path else DEFAULT_SPEC
    return parse_spec(read_yaml(path), str(path))


def parse_spec(raw: Any, path: str) -> Spec:
    check_top_level(raw, path, SPEC_KEYS, required=("experiment", "ablations"))
    experiment = check_name(raw["experiment"], path, "experiment")
    data = raw.get("data", "synthetic")
    if not (isinstance(data, str) and data.strip()):
        raise SpecError(f"{path}: 'data' must be a MOSI pickle path or 'synthetic', got {data!r}")
    if data != "synthetic":  # a relative path is read from the spec's folder, as a tune spec's `ablations` is
        data = str(Path(path).parent / Path(data).expanduser())
    seeds = check_seeds(raw.get("seeds", [1111, 1112, 1113]), path, "seeds")
    base = _sections(optional_mapping(raw.get("base"), path, "base", "a mapping with 'model' and/or 'train'"),
                     path, "base")
    ablations = raw["ablations"]
    if not isinstance(ablations, Mapping) or not ablations:
        raise SpecError(f"{path}: 'ablations' must be a non-empty mapping of name -> override, got {ablations!r}")
    quick = optional_mapping(raw.get("quick"), path, "quick", f"a mapping with keys {list(QUICK_KEYS)}")
    check_keys(quick, QUICK_KEYS, path, "'quick'")
    if "seeds" in quick:
        check_seeds(quick["seeds"], path, "quick.seeds")
    if "epochs" in quick:
        check_positive_int(quick["epochs"], path, "quick.epochs")
    overrides = {}
    for name, override in ablations.items():
        name = check_name(name, path, "ablations", what="an ablation name")
        if name == TUNED:
            raise SpecError(f"{path}: 'ablations.{TUNED}': the name is the tuned model's, which `tune` hands "
                            "over to the suite; call this ablation something else")
        override = optional_mapping(override, path, f"ablations.{name}", "a mapping with 'model' and/or 'train'")
        overrides[name] = _sections(override, path, f"ablation '{name}'")
    resolved = {n: _resolve(path, n, base, o) for n, o in overrides.items()}
    return Spec(path=path, experiment=experiment, data=data, seeds=seeds, base=dict(base), ablations=resolved,
                overrides=overrides, quick=dict(quick))


# --- what a user writes: one check each, one message template -----------------------------------------

SEED_LIMIT = 2**32  # seeds are numpy's and torch's: integers in [0, 2**32)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # becomes part of run names and folder paths


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seeds(value: Any, path: str, key: str) -> tuple[int, ...]:
    """A non-empty list of seeds in [0, 2**32); a repeated seed runs once."""
    if not (isinstance(value, list) and value and all(is_int(s) and 0 <= s < SEED_LIMIT for s in value)):
        raise SpecError(f"{path}: '{key}' must be a non-empty list of integers in [0, 2**32), got {value!r}")
    return tuple(dict.fromkeys(value))


def check_positive_int(value: Any, path: str, key: str) -> int:
    if not (is_int(value) and value >= 1):
        raise SpecError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def check_name(value: Any, path: str, key: str, what: str = "a name") -> str:
    """A name that goes into MLflow run names and folder paths: letters, digits, '_', '.', '-'."""
    if not (isinstance(value, str) and _NAME.fullmatch(value)):
        raise SpecError(f"{path}: '{key}' must be {what} of letters, digits, '_', '.' or '-' "
                        f"(not starting with a symbol), got {value!r}")
    return value


def check_mapping(value: Any, path: str, key: str, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}: '{key}' must be {expected}, got {value!r}")
    return value


def optional_mapping(value: Any, path: str, key: str, expected: str) -> Mapping[str, Any]:
    """A key left out or empty (`base:`) means no settings; any other value must be a mapping."""
    return {} if value is None else check_mapping(value, path, key, expected)


def _sections(config: Mapping[str, Any], path: str, where: str) -> dict[str, Any]:
    """`config` with its 'model' and 'train' checked: a mapping each, or left empty (`model:`, its keys
    commented out), which means no settings, not "none of the base's" (merged, None would replace them)."""
    out = dict(config)
    for section in ("model", "train"):
        if section in out and out[section] is None:
            del out[section]
        elif section in out and not isinstance(out[section], Mapping):
            raise SpecError(f"{path}: {where}: '{section}' must be a mapping of field -> value, got {out[section]!r}")
    return out


def _resolve(path: str, name: str, base: Mapping[str, Any], override: Mapping[str, Any]) -> RunConfig:
    merged = deep_merge(base, override)
    try:
        return RunConfig.from_dict(merged)
    except (ConfigError, TypeError) as e:
        values = [v for section in merged.values() if isinstance(section, Mapping) for v in section.values()]
        raise SpecError(f"{path}: ablation '{name}': {e}{number_hint(values)}") from None


def number_hint(values: Sequence[Any]) -> str:
    """A hint when a value meant as a number was read by YAML as text: PyYAML takes an exponent
    without a dot (1e-4) for a string."""
    for value in values:
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                continue
            return f" (YAML reads {value} as text: write 1.0e-4, not 1e-4)"
    return ""


def check_top_level(raw: Any, path: str, allowed: Sequence[str], *, required: Sequence[str]) -> None:
    """A spec file's top level: a mapping, with only `allowed` keys and every `required` one."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected a mapping with keys {list(allowed)}")
    check_keys(raw, allowed, path, "the spec")
    for key in required:
        if key not in raw:
            raise SpecError(f"{path}: missing key '{key}'")


def check_keys(d: Mapping[str, Any], allowed: Sequence[str], path: str, where: str) -> None:
    """Refuse a key not in `allowed`, naming it and the allowed ones."""
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise SpecError(f"{path}: unknown key '{unknown[0]}' in {where}; allowed: {list(allowed)}")
