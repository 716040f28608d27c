"""The model family's registries: encoders and fusions by name, and what the config and the
pipelines ask of a component (its constraints, its relative cost).

A component is an `nn.Module` class built as `cls(config)`. It declares, as class attributes, `cost`
(encoders: relative training time of one layer on one modality, LSTM = 1; fusions: the same unit,
default 0) and `uses_heads` (attention: hidden must be a multiple of heads), and optionally a
classmethod `config_errors(config)` listing what else it requires of the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from msa.config import ModelConfig

ENCODERS: dict[str, type[nn.Module]] = {}  # (B, T, H) projected features, (B, T) real steps or None -> (B, H)
FUSIONS: dict[str, type[nn.Module]] = {}   # [(B, H)] per modality -> (B, H)
_REGISTRIES: dict[str, dict[str, type[nn.Module]]] = {"encoder": ENCODERS, "fusion": FUSIONS}


def registry(kind: str) -> dict[str, type[nn.Module]]:
    """The registry of `kind`: 'encoder' ((B, T, H), real -> (B, H)) or 'fusion' ([(B, H)] -> (B, H),
    or per-modality sequences when it `takes_sequences`)."""
    assert kind in _REGISTRIES, f"kind must be one of {list(_REGISTRIES)}, got {kind!r}"
    return _REGISTRIES[kind]


def register(kind: str, name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the component `name` of `kind`. `cls(config)` builds it; class attributes `cost`
    (encoders: relative time of one layer, LSTM = 1; fusions: the same unit, default 0), `uses_heads`
    and an optional classmethod `config_errors(config)` declare what the rest needs."""
    registry(kind)[name] = cls
    return cls


def constraint_errors(config: ModelConfig) -> list[str]:
    """What the chosen components require of the config and it does not meet (empty: valid)."""
    chosen = [registry("encoder").get(config.encoder), registry("fusion").get(config.fusion)]
    errors = []
    if config.hidden % config.heads and any(getattr(c, "uses_heads", False) for c in chosen):
        errors.append(f"The 'hidden' parameter of ModelConfig must be divisible by 'heads' ({config.heads}) "
                      f"for attention. Got {config.hidden} instead.")
    for component in chosen:
        if hasattr(component, "config_errors"):
            errors += component.config_errors(config)
    return errors


def relative_cost(config: ModelConfig) -> float:
    """Relative training time of one epoch: encoder layers x modalities, weighted by the encoder's
    cost, plus the fusion's cost (the lab's fusions: 0, next to the encoders)."""
    encoder, fusion = registry("encoder")[config.encoder], registry("fusion")[config.fusion]
    per_encoder = config.encoder_layers * getattr(encoder, "cost", 1.0)
    return len(config.modalities) * per_encoder + getattr(fusion, "cost", 0.0)


def fusion_takes_sequences(cfg: ModelConfig) -> bool:
    """Whether the chosen fusion reads the encoders' per-step outputs (and pools them itself)
    instead of one pooled vector per modality."""
    return getattr(registry("fusion")[cfg.fusion], "takes_sequences", False)
