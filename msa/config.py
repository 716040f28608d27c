"""Typed, validated configs for a model and its training, with a stable hash.

Constraints are declared once per field (in `_CONSTRAINTS`) and every violation is reported with one
message template, in the style of scikit-learn's parameter validation:
"The 'dropout' parameter of ModelConfig must be a float in the range [0, 1). Got 1.5 instead."
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from msa.metrics import HIGHER_IS_BETTER, METRIC_NAMES

MODALITIES: tuple[str, ...] = ("vision", "text", "audio")  # the lab's order: model(vision, text, audio)


class ConfigError(ValueError):
    """A config value or key a user wrote is not valid; the message says which and what is allowed."""


# --- constraint helpers: (predicate, description) ---------------------------------------------------

def _int_range(lo: int, hi: float = math.inf) -> tuple[Callable[[Any], bool], str]:
    upper = "inf" if hi == math.inf else str(hi)
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
            f"an int in the range [{lo}, {upper}]")


def _float_range(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False  # no field is infinite: 'inf' in a range's text means unbounded
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    lo_txt, hi_txt = f"{'(' if lo_open else '['}{lo:g}", "inf" if hi == math.inf else f"{hi:g}"
    return ok, f"a float in the range {lo_txt}, {hi_txt}{')' if hi_open or hi == math.inf else ']'}"


def _one_of(*options):
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _registered(kind: str):
    """A name in msa.models' registry of `kind` ('encoder' or 'fusion'). The registry is read when a
    config is validated, not when this module loads: msa.models builds on this module, and a
    component registered later (by a plug-in or a test) is a valid choice from then on."""
    def names() -> list[str]:
        from msa import models
        return list(models.registry(kind))
    return (lambda v: v in names()), (lambda: "one of " + ", ".join(repr(n) for n in names()))


def _bool():
    return (lambda v: isinstance(v, bool)), "a bool"


def _optional(check):
    pred, desc = check
    return (lambda v: v is None or pred(v)), f"None or {desc}"


def _validate(obj: Any) -> None:
    name = type(obj).__name__
    for key, (pred, desc) in obj._CONSTRAINTS.items():
        value = getattr(obj, key)
        if not pred(value):
            desc = desc() if callable(desc) else desc
            raise ConfigError(f"The '{key}' parameter of {name} must be {desc}. Got {value!r} instead.")


def _from_dict(cls, values: Mapping[str, Any] | None):
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{cls.__name__} takes a mapping of field -> value, got {values!r}.")
    values = dict(values or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown parameter(s) {unknown} for {cls.__name__}; allowed: {allowed}.")
    return cls(**values)


# --- the configs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Every model variant of the lab. The defaults are the lab's baseline (582,067 parameters)."""

    modalities: tuple[str, ...] = MODALITIES   # any non-empty subset; kept in the lab's order
    input_layernorm: bool = True               # LayerNorm(dim) on each modality's raw features
    encoder: str = "lstm"                      # name in msa.models.ENCODERS
    hidden: int = 128                          # width of every encoder, the fusion and the head input
    encoder_layers: int = 1
    heads: int = 4                             # attention heads (transformer encoder, attention fusions)
    ff_dim: int = 256                          # transformer feed-forward width
    dropout: float = 0.1
    pooling: str = "last"                      # how a sequence becomes one vector: last step, mean, or attention
                                               # (a learned query scores each step; softmax-weighted sum)
    mask_padding: bool = False                 # ignore zero-padded steps (the lab's variants do not)
    fusion: str = "sum_lstm"                   # name in msa.models.FUSIONS
    bidirectional: bool = False                # LSTM encoders: a forward and a backward LSTM, hidden/2 wide
                                               # each, concatenated back to hidden (hidden must be even)
    fusion_dim: int = 16                       # tfn: each modality vector is projected to this width before
                                               # the outer product, which has (fusion_dim + 1)^modalities terms
    rank: int = 4                              # lmf: rank of the modality-specific factors

    # Fields added after runs were first recorded. A config's identity (`RunConfig.to_dict`, hence
    # `config_hash`, the pipelines' run keys and logged params) leaves each of these out while it is
    # at its default, so a config that does not use one is written exactly as before the field
    # existed and its recorded runs are still found. Every field added from now on goes here (with a
    # plain default); none is ever removed, and a default here never changes.
    _ADDED_LATER = ("bidirectional", "fusion_dim", "rank")

    _CONSTRAINTS = {
        "modalities": ((lambda v: isinstance(v, tuple) and len(v) > 0 and len(set(v)) == len(v)
                        and all(m in MODALITIES for m in v)),
                       f"a non-empty list of distinct names from {list(MODALITIES)}"),
        "input_layernorm": _bool(),
        "encoder": _registered("encoder"),
        "hidden": _int_range(1),
        "encoder_layers": _int_range(1),
        "heads": _int_range(1),
        "ff_dim": _int_range(1),
        "dropout": _float_range(0.0, 1.0, hi_open=True),
        "pooling": _one_of("last", "mean", "attention"),
        "mask_padding": _bool(),
        "fusion": _registered("fusion"),
        "bidirectional": _bool(),
        "fusion_dim": _int_range(1),
        "rank": _int_range(1),
    }

    def __post_init__(self):
        mods = (self.modalities,) if isinstance(self.modalities, str) else self.modalities
        if isinstance(mods, (list, tuple)) and set(mods) <= set(MODALITIES) and len(set(mods)) == len(mods):
            # canonical order, so that [text, audio] and [audio, text] are the same run
            mods = tuple(m for m in MODALITIES if m in mods)
        object.__setattr__(self, "modalities", tuple(mods) if isinstance(mods, list) else mods)
        _validate(self)
        from msa.models import constraint_errors  # each component declares its own constraints
        errors = constraint_errors(self)
        if errors:
            raise ConfigError(errors[0])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelConfig:
        return _from_dict(cls, values)


@dataclass(frozen=True)
class TrainConfig:
    """The lab's training protocol by default: Adam 1e-3, batch 16, 20 epochs, per-batch cosine LR."""

    loss: str = "mse"                          # mse (lab), l1 (MAE), huber (SmoothL1)
    huber_delta: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 20
    scheduler: str = "cosine"                  # cosine: CosineAnnealingLR, T_max = epochs x batches, stepped per batch
    grad_clip: float | None = None             # max global grad norm; None = off
    patience: int | None = None                # early stopping on the selection metric; None = off
    select_metric: str = "Corr"                # validation metric that picks the checkpoint
    eval_batch_size: int = 256                 # inference only; does not change results beyond float rounding
    precision: str = "fp32"                    # bf16: the forward pass autocast to bfloat16 where the hardware
                                               # has it (weights, optimiser and loss stay fp32); else fp32

    # Left out of the identity while at their default, so runs recorded before they existed keep theirs.
    _ADDED_LATER = ("precision",)

    _CONSTRAINTS = {
        "loss": _one_of("mse", "l1", "huber"),
        "huber_delta": _float_range(0.0, math.inf, lo_open=True),
        "lr": _float_range(0.0, math.inf, lo_open=True),
        "weight_decay": _float_range(0.0, math.inf),
        "batch_size": _int_range(1),
        "epochs": _int_range(1),
        "scheduler": _one_of("cosine", "none"),
        "grad_clip": _optional(_float_range(0.0, math.inf, lo_open=True)),
        "patience": _optional(_int_range(1)),
        "select_metric": _one_of(*METRIC_NAMES, "val_loss"),
        "eval_batch_size": _int_range(1),
        "precision": _one_of("fp32", "bf16"),
    }

    def __post_init__(self):
        _validate(self)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger selection metric is better (the loss and MAE are minimised)."""
        return HIGHER_IS_BETTER.get(self.select_metric, False)

    @property
    def select_mode(self) -> str:
        """'max' when a larger selection metric is better, else 'min'."""
        return "max" if self.higher_is_better else "min"

    @property
    def select_key(self) -> str:
        """The selection metric's key in the trainer's per-epoch metrics (`val_Corr`, `val_loss`, ...)."""
        return self.select_metric if self.select_metric == "val_loss" else f"val_{self.select_metric}"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TrainConfig:
        return _from_dict(cls, values)


@dataclass(frozen=True)
class RunConfig:
    """What one training run needs besides the data and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> RunConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {"model", "train"})
        if unknown:
            raise ConfigError(f"Unknown section(s) {unknown} in the run config; allowed: ['model', 'train'].")
        return cls(model=ModelConfig.from_dict(values.get("model")),
                   train=TrainConfig.from_dict(values.get("train")))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config's identity, as plain JSON-able values: every field, except a field added later
        (`_ADDED_LATER`) while it is at its default. `from_dict` of it gives this config back."""
        return {"model": _plain(self.model), "train": _plain(self.train)}

    def flat(self) -> dict[str, Any]:
        """`{"model.hidden": 128, ...}`: how params are logged."""
        return {f"{section}.{k}": v for section, d in self.to_dict().items() for k, v in d.items()}

    def config_hash(self) -> str:
        return stable_hash(self.to_dict())


def _plain(cfg) -> dict[str, Any]:
    later = getattr(cfg, "_ADDED_LATER", ())
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if not (k in later and v == default[k])}


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-able object that does not depend on key order or the Python process."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, section by section (how an ablation modifies the baseline)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
