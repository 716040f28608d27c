"""The fusions: M modality vectors (B, H) -> (B, H), registered by name."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn

from msa.config import ModelConfig
from msa.models.layers import AttentionPooling, pool, transformer_stack
from msa.models.registry import register

# --- fusions: M modality vectors (B, H) each -> (B, H) ---------------------------------------------
# A fusion whose `takes_sequences` is true gets instead, per modality, the encoder's per-step outputs
# and real steps, [((B, T_m, H), (B, T_m) or None)], and pools them itself (by `pooling`).

def add_all(vectors: list[torch.Tensor]) -> torch.Tensor:
    # Added one after another in modality order, as the lab writes `vision_h + text_h + audio_h`,
    # not `stack().sum()`, whose different rounding would make "the lab's function" only close.
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total  # (B, H)


class SumLSTMFusion(nn.Module):
    """The lab's baseline fusion: the sum of modality vectors as a length-1 sequence through an LSTM."""

    uses_heads: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, batch_first=True)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        x = add_all(vectors).unsqueeze(1)  # (B, 1, H)
        _, (h, _) = self.lstm(x)  # (1, B, H)
        return h[-1]


class SumTransformerFusion(nn.Module):
    """The lab's 2.1 fusion: the sum as a length-1 sequence through a Transformer encoder (no positions)."""

    uses_heads: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = transformer_stack(cfg)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        x = add_all(vectors).unsqueeze(1)  # (B, 1, H)
        return self.transformer(x).squeeze(1)  # (B, H)


class SelfAttentionFusion(nn.Module):
    """The lab's 2.5 fusion: multi-head self-attention over the stacked modality vectors, then mean."""

    uses_heads: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # No attention dropout, as in the lab's `nn.MultiheadAttention(d_model, num_heads)`.
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, batch_first=True)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(vectors, dim=1)  # (B, M, H)
        out, _ = self.attn(x, x, x, need_weights=False)  # (B, M, H)
        return out.mean(dim=1)


class QueryAttentionFusion(nn.Module):
    """The lab's improved-model fusion: a learnable query attends over the stacked modality vectors."""

    uses_heads: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, cfg.hidden))  # (1, 1, H), the lab's init
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, batch_first=True)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(vectors, dim=1)  # (B, M, H)
        q = self.query.expand(x.shape[0], -1, -1)  # (B, 1, H)
        out, _ = self.attn(q, x, x, need_weights=False)  # (B, 1, H)
        return out.squeeze(1)


def with_one(z: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, D + 1): z with a 1 appended, so that a product of such vectors keeps every
    lower-order term (each modality alone, each pair) beside the full interaction."""
    return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=-1)


class TensorFusion(nn.Module):
    """Tensor Fusion (TFN, Zadeh et al. 2017): the outer product of the modality vectors, each with
    a 1 appended, flattened, then a linear map back to hidden.

    Each vector is first projected (linearly) to `fusion_dim`: the product has (fusion_dim + 1)^M
    terms, 17^3 = 4,913 at the default 16 (a 629k-parameter map, about the baseline's size), where
    the raw 128-wide vectors would give 129^3 = 2.1M terms and a 275M-parameter map.
    """

    uses_heads: ClassVar[bool] = False
    # Relative training time next to one LSTM layer on one modality (the unit of encoder costs):
    # measured 1 thread, batch 16, T = 50, 3 modalities, whole training step against the baseline's.
    cost: ClassVar[float] = 0.75

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.down = nn.ModuleDict({m: nn.Linear(cfg.hidden, cfg.fusion_dim) for m in cfg.modalities})
        self.out = nn.Linear((cfg.fusion_dim + 1) ** len(cfg.modalities), cfg.hidden)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        product = vectors[0].new_ones(vectors[0].shape[0], 1)  # (B, 1)
        for down, v in zip(self.down.values(), vectors):
            z = with_one(down(v))  # (B, d + 1)
            product = (product.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)  # (B, P * (d + 1)), row-major
        return self.out(product)  # (B, H)


class LowRankFusion(nn.Module):
    """Low-rank Multimodal Fusion (LMF, Liu et al. 2018): TFN's map with its weight tensor written
    as a sum of `rank` outer products of modality-specific factors, so the outer product is never
    formed: per rank, the elementwise product of each modality's projection of (v; 1), then a
    weighted sum over ranks. On the raw (B, H) vectors, no down-projection needed.

    Each factor's row for the appended 1 starts at 1, so the M-fold product starts near 1 plus a sum
    of per-modality terms instead of a product of M small numbers, whose gradients would vanish.
    """

    uses_heads: ClassVar[bool] = False
    cost: ClassVar[float] = 0.5  # measured as TFN's

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, r = cfg.hidden, cfg.rank
        factors = {}
        for m in cfg.modalities:
            # (H + 1, r, H): input-major, so that all r projections are one matmul of a free view
            factor = torch.randn(H + 1, r, H) / math.sqrt(H + 1)
            factor[-1] = 1.0
            factors[m] = nn.Parameter(factor)
        self.factors = nn.ParameterDict(factors)
        self.rank_weights = nn.Parameter(torch.full((r,), 1.0 / r))  # (r,)
        self.bias = nn.Parameter(torch.zeros(H))  # (H,)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        product = None
        for factor, v in zip(self.factors.values(), vectors):
            projected = (with_one(v) @ factor.flatten(1)).view(v.shape[0], *factor.shape[1:])  # (B, r, H)
            product = projected if product is None else product * projected
        return torch.einsum("r,brh->bh", self.rank_weights, product) + self.bias  # (B, H)


class CrossModalBlock(nn.Module):
    """One MulT cross-modal layer (pre-norm): a target modality's steps query a source modality's
    steps, with a residual, then a feed-forward with a residual. (B, T_t, H), (B, T_s, H) -> (B, T_t, H)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_target = nn.LayerNorm(cfg.hidden)
        self.norm_source = nn.LayerNorm(cfg.hidden)
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(cfg.hidden)
        self.ff = nn.Sequential(nn.Linear(cfg.hidden, cfg.ff_dim), nn.ReLU(), nn.Dropout(cfg.dropout),
                                nn.Linear(cfg.ff_dim, cfg.hidden))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, target: torch.Tensor, source: torch.Tensor, source_real: torch.Tensor | None) -> torch.Tensor:
        pad = None
        if source_real is not None:
            source = torch.where(source_real.unsqueeze(-1), source, 0.0)  # (B, T_s, H): a padded step may hold NaN
            pad = ~source_real  # (B, T_s), True = ignore
        kv = self.norm_source(source)  # (B, T_s, H)
        attended, _ = self.attn(self.norm_target(target), kv, kv, key_padding_mask=pad, need_weights=False)
        x = target + self.dropout(attended)  # (B, T_t, H)
        return x + self.dropout(self.ff(self.norm_ff(x)))


class CrossModalFusion(nn.Module):
    """Cross-modal attention in the style of MulT (Tsai et al. 2019), before pooling: for each target
    modality, one `CrossModalBlock` per other modality (queries from the target's steps, keys and
    values from the source's); the target's outputs concatenated over sources (B, T_t, (M-1)H) and
    pooled over its real steps by `pooling`; the M pooled vectors concatenated, then Linear to hidden.

    One layer per pair (MulT stacks 4-5), and no positional encoding of its own: the encoders' outputs
    already carry order (an LSTM's state, a Transformer's sinusoidal positions).
    """

    takes_sequences: ClassVar[bool] = True
    uses_heads: ClassVar[bool] = True
    # Measured as TFN's: +12 units reading the padding, +7.7 masked (the six blocks, and encoders that
    # now produce every step, without the shared-padding shortcut): 3.6-5x the baseline's step.
    cost: ClassVar[float] = 10.0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.modalities = tuple(cfg.modalities)
        self.pooling = cfg.pooling
        self.blocks = nn.ModuleDict({f"{s}_to_{t}": CrossModalBlock(cfg)
                                     for t in self.modalities for s in self.modalities if s != t})
        width = (len(self.modalities) - 1) * cfg.hidden
        self.attention = nn.ModuleDict({t: AttentionPooling(width) for t in self.modalities}) \
            if cfg.pooling == "attention" else None
        self.out = nn.Linear(len(self.modalities) * width, cfg.hidden)

    @classmethod
    def config_errors(cls, config: ModelConfig) -> list[str]:
        if len(config.modalities) < 2:
            return [f"The 'modalities' parameter of ModelConfig must hold at least 2 modalities for cross-modal "
                    f"attention (each attends to the others). Got {list(config.modalities)} instead."]
        return []

    def forward(self, sequences: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        by_modality = dict(zip(self.modalities, sequences))
        pooled = []
        for t, (target, target_real) in by_modality.items():
            crossed = torch.cat([self.blocks[f"{s}_to_{t}"](target, *by_modality[s])
                                 for s in self.modalities if s != t], dim=-1)  # (B, T_t, (M-1)H)
            pooled.append(pool(crossed, target_real, self.pooling) if self.attention is None
                          else self.attention[t](crossed, target_real))  # (B, (M-1)H)
        return self.out(torch.cat(pooled, dim=-1))  # (B, H)


register("fusion", "sum_lstm", SumLSTMFusion)
register("fusion", "sum_transformer", SumTransformerFusion)
register("fusion", "self_attention", SelfAttentionFusion)
register("fusion", "query_attention", QueryAttentionFusion)
register("fusion", "tfn", TensorFusion)
register("fusion", "lmf", LowRankFusion)
register("fusion", "crossmodal", CrossModalFusion)
