"""The model: per-modality encoders, a fusion and the lab's head, built from one ModelConfig."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from msa.config import ModelConfig
from msa.models.layers import real_steps, shared_padding
from msa.models.registry import registry

# --- the model --------------------------------------------------------------------------------------

class MSAModel(nn.Module):
    """Per modality: [LayerNorm] -> Linear -> ReLU -> encoder; then fusion -> Linear -> sigmoid * 6 - 3.

    A fusion that `takes_sequences` gets each encoder's per-step outputs instead of its pooled vector.
    `forward(*features)` takes one (B, T_m, D_m) tensor per modality, in `config.modalities` order
    (the lab's `model(vision, text, audio)`), and returns (B,) scores in (-3, 3).
    """

    def __init__(self, config: ModelConfig, dims: Mapping[str, int]):
        super().__init__()
        missing = [m for m in config.modalities if m not in dims]
        assert not missing, f"no input dim for modalities {missing}; dims given: {dict(dims)}"
        self.config = config
        self.modalities: tuple[str, ...] = tuple(config.modalities)
        self.dims = {m: int(dims[m]) for m in self.modalities}
        # Built stage by stage across modalities, in the lab's order (norms, projections, encoders,
        # fusion, head), so a seeded baseline starts from exactly the lab's weights.
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d) if config.input_layernorm else nn.Identity()
                                   for m, d in self.dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, config.hidden) for m, d in self.dims.items()})
        self.encoders = nn.ModuleDict({m: registry("encoder")[config.encoder](config) for m in self.modalities})
        self.fusion = registry("fusion")[config.fusion](config)
        self.head = nn.Linear(config.hidden, 1)

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) raw features -> (B, T, H): [LayerNorm] -> Linear -> ReLU."""
        return F.relu(self.proj[modality](self.norm[modality](x)))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        assert len(features) == len(self.modalities), \
            f"expected {len(self.modalities)} inputs {self.modalities}, got {len(features)}"
        if getattr(self.fusion, "takes_sequences", False):
            fused = self.fusion([self.encoders[m].steps(self.embed(m, x), self.real(m, x))
                                 for m, x in zip(self.modalities, features)])  # (B, H)
        else:
            fused = self.fusion([self.encode(m, x) for m, x in zip(self.modalities, features)])  # (B, H)
        return torch.sigmoid(self.head(fused)).squeeze(-1) * 6 - 3  # (B,)

    def real(self, modality: str, x: torch.Tensor) -> torch.Tensor | None:
        """(B, T, D) raw features -> (B, T) real steps, or None when the encoder reads padding too."""
        if self.config.mask_padding or getattr(self.encoders[modality], "needs_real_steps", False):
            return real_steps(x)  # from the raw features: LayerNorm turns an all-zero step into a non-zero one
        return None

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) raw features -> (B, H): one modality's vector."""
        encoder, real = self.encoders[modality], self.real(modality, x)
        if real is not None:
            return encoder(self.embed(modality, x), real)
        # The lab's function, padding included. Steps that are padding in every row give every
        # row the same inputs and states, so an encoder that can is handed them once, as a
        # (1, S, H) prefix: the same function, and with MOSI-like front padding often 40% of the
        # baseline's recurrent work saved. (Tracing records one fixed S, so it keeps the plain way.)
        takes_prefix = getattr(encoder, "takes_shared_prefix", False) and not torch.jit.is_tracing()
        shared = shared_padding(x) if takes_prefix else 0
        if shared:
            prefix = self.embed(modality, x[:1, :shared])  # (1, S, H)
            return encoder(self.embed(modality, x[:, shared:]), None, prefix)
        return encoder(self.embed(modality, x), None)


def build_model(config: ModelConfig, dims: Mapping[str, int]) -> MSAModel:
    """The one factory: a model for `config` whose input dims come from the data (`data.dims`)."""
    return MSAModel(config, dims)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the lab's baseline: 582,067)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
