"""Building blocks of the model family: padding masks and pooling, positional encoding, the
Transformer stack, and tracing support."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from msa.config import ModelConfig
from msa.models.registry import fusion_takes_sequences

# --- helpers ----------------------------------------------------------------------------------------

def real_steps(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) raw features -> (B, T) bool, True where a step holds data.

    The files pad at the front with all-zero steps, so a step is padding when every feature is 0.
    A row with no real step keeps its last step, so that no pooling divides by zero and no attention
    row is fully masked (which would give NaN).
    """
    real = x.abs().amax(dim=-1) != 0  # (B, T); as x.ne(0).any(-1), NaN included, at a fifth of the cost
    empty = ~real.any(dim=1)  # (B,)
    real[:, -1] |= empty
    return real


def shared_padding(x: torch.Tensor) -> int:
    """The number of leading steps that are padding (all-zero) in every row of the batch, keeping at
    least one step."""
    any_real = x.abs().amax(dim=(0, 2)) != 0  # (T,)
    return min(int(any_real.int().argmax()) if bool(any_real.any()) else x.shape[1], x.shape[1] - 1)


def masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): mean over the real steps only."""
    # `where`, not a product: a padded step's output may be anything, even NaN, and 0 * NaN is NaN.
    x = torch.where(real.unsqueeze(-1), x, 0.0)  # (B, T, H)
    return x.sum(dim=1) / real.sum(dim=1, keepdim=True).to(x.dtype)


def last_real(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the output at each row's last real step."""
    T = x.shape[1]
    steps = torch.arange(T, device=x.device).expand_as(real)  # (B, T)
    last = torch.where(real, steps, -1).amax(dim=1)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), last]


def pool(x: torch.Tensor, real: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) -> (B, H) by `how` in {'mean', 'last'}, over real steps when `real` is given."""
    if how == "mean":
        return x.mean(dim=1) if real is None else masked_mean(x, real)
    return x[:, -1] if real is None else last_real(x, real)


class AttentionPooling(nn.Module):
    """(B, T, D), (B, T) real steps or None -> (B, D): a learned query scores each (real) step, and
    the softmax of the scores weighs the steps' sum (`pooling: attention`)."""

    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(width, 1, bias=False)  # a bias would add the same to every score: no effect

    def forward(self, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        if real is not None:
            x = torch.where(real.unsqueeze(-1), x, 0.0)  # (B, T, D); a padded step may hold anything
        scores = self.query(x).squeeze(-1)  # (B, T)
        if real is not None:
            scores = scores.masked_fill(~real, float("-inf"))  # every row keeps a real step: no NaN
        return torch.einsum("bt,btd->bd", scores.softmax(dim=1), x)  # (B, D)


def encoder_attention(cfg: ModelConfig) -> AttentionPooling | None:
    """The encoder's attention pooling, when it pools by attention; None when it pools otherwise or
    not at all (a fusion that takes sequences pools them itself)."""
    if cfg.pooling != "attention" or fusion_takes_sequences(cfg):
        return None
    return AttentionPooling(cfg.hidden)


def left_aligned(x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, H), (B, T) -> (B, L, H) each row's real steps moved to the front in order, cut after
    the longest row; (B,) lengths; (B, L) which steps are real now."""
    lengths = real.sum(dim=1)  # (B,)
    order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)  # (B, T) real steps first
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))  # (B, T, H)
    if not torch.jit.is_tracing():
        x = x[:, : int(lengths.max())]  # steps after the longest row are padding everywhere
    left = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)  # (B, L)
    return x, lengths, left


def transformer_stack(cfg: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=cfg.hidden, nhead=cfg.heads, dim_feedforward=cfg.ff_dim,
                                       dropout=cfg.dropout, batch_first=True)
    # Nested tensors only pay off for ragged batches at inference, and asking for them warns when
    # `heads` is odd; the dense path computes the same function.
    return nn.TransformerEncoder(layer, num_layers=cfg.encoder_layers, enable_nested_tensor=False)


@contextlib.contextmanager
def tracing_mode() -> Iterator[None]:
    """Disable the fused attention fast path while inside, so `torch.jit.trace` and TensorBoard's
    `add_graph` can trace the Transformer variants (the fast path's fused kernels do not trace)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# --- positional encoding ----------------------------------------------------------------------------

def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """(length, d_model) sinusoidal positions, the lab's `PositionalEncoding` formula."""
    position = torch.arange(0, length).unsqueeze(1).float()  # (L, 1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])  # odd d_model has one cos fewer
    return pe


class PositionalEncoding(nn.Module):
    """Adds sinusoidal positions; the table grows on demand for sequences longer than `max_len`.

    Given `real`, positions count real steps only (the first real step is position 0), so the amount
    of front padding does not move a sequence; without it, step t gets position t as in the lab.
    """

    def __init__(self, d_model: int, max_len: int = 500):
        super().__init__()
        self.d_model = d_model
        # Not persistent: it is a function of the shape, so checkpoints need not carry it.
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        if T > self.pe.shape[0]:
            self.pe = sinusoidal_table(T, self.d_model).to(self.pe.device)
        if real is None:
            return x + self.pe[:T]  # (B, T, H)
        positions = (real.cumsum(dim=1) - 1).clamp(min=0)  # (B, T); padded steps are masked anyway
        return x + self.pe[positions]  # (B, T, H)


