"""The lab's model family, assembled from one `ModelConfig`: per-modality encoders, a fusion, a head.

Read bottom-up: helpers, the positional encoding, the encoders (`ENCODERS`), the fusions (`FUSIONS`),
then `MSAModel`. Adding an encoder or a fusion is one class (declaring its `cost` and whether it
`uses_heads`) plus `register(kind, name, cls)`; `ModelConfig` accepts the name from then on. The
default config is the lab's baseline, with submodules created in the lab's order so that the same
torch seed gives the lab's initial weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from msa.config import ModelConfig


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


# --- encoders: (B, T, H) projected features, (B, T) real steps or None (unmasked) -> (B, H) --------
# An encoder whose `takes_shared_prefix` is true also accepts `prefix` (1, S, H): steps every row has
# before x (see MSAModel.forward). Without that attribute an encoder always gets the whole sequence.

class LSTMEncoder(nn.Module):
    """The lab's encoder: an LSTM whose last hidden state (or mean output) represents the sequence."""

    # Relative training time of one layer on one modality; the suite's schedule and ETA weigh runs by it.
    cost: ClassVar[float] = 1.0
    uses_heads: ClassVar[bool] = False  # attention: hidden must be a multiple of heads

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooling = cfg.pooling
        # nn.LSTM applies dropout only between stacked layers; with one layer the lab's dropout=0.1
        # does nothing but warn, so it is passed only when there is a layer boundary to apply it at.
        dropout = cfg.dropout if cfg.encoder_layers > 1 else 0.0
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.encoder_layers, dropout=dropout,
                            batch_first=True)

    @property
    def takes_shared_prefix(self) -> bool:
        # A recurrence can start every row from one state computed once; but not while dropout acts
        # between layers, because one row's prefix would give every row the same dropout mask.
        return not (self.training and self.lstm.dropout > 0)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H); `prefix` (1, S, H), when given, are steps every row has before x."""
        if real is not None:
            return self._masked(x, real)
        state, prefix_sum, steps = None, 0.0, x.shape[1]
        if prefix is not None:
            prefix_out, (h0, c0) = self.lstm(prefix)  # (1, S, H), (layers, 1, H)
            B = x.shape[0]
            state = (h0.expand(-1, B, -1).contiguous(), c0.expand(-1, B, -1).contiguous())
            prefix_sum, steps = prefix_out.sum(dim=1), steps + prefix.shape[1]
        out, (h, _) = self.lstm(x, state)  # (B, T, H), (layers, B, H)
        return h[-1] if self.pooling == "last" else (out.sum(dim=1) + prefix_sum) / steps

    def _masked(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # Move each row's real steps to the front, in order: an LSTM is causal, so its output at a
        # row's last real step has seen that row's real steps and nothing else, wherever the padding
        # was. (Packing would do the same but forgoes the fast oneDNN kernel on CPU.)
        lengths = real.sum(dim=1)  # (B,)
        order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)  # (B, T) real steps first
        x = x.gather(1, order.unsqueeze(-1).expand_as(x))  # (B, T, H)
        if not torch.jit.is_tracing():
            x = x[:, : int(lengths.max())]  # steps after the longest row are padding everywhere
        out, _ = self.lstm(x)  # (B, L, H)
        left = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)  # (B, L) left-aligned real
        return pool(out, left, "last" if self.pooling == "last" else "mean")


class TransformerEncoder(nn.Module):
    """The lab's 2.1 encoder: sinusoidal positions, `encoder_layers` Transformer layers, then pooling."""

    takes_shared_prefix = False  # every step attends to every other: no state to share
    # Measured on the full suite, 2 cores: the improved model's ~3 min against the baseline's ~1 min.
    cost: ClassVar[float] = 2.0
    uses_heads: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooling = cfg.pooling
        self.pe = PositionalEncoding(cfg.hidden)
        self.transformer = transformer_stack(cfg)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        pad = None if real is None else ~real  # (B, T), True = ignore
        x = self.transformer(self.pe(x, real), src_key_padding_mask=pad)  # (B, T, H)
        return pool(x, real, self.pooling)


ENCODERS: dict[str, type[nn.Module]] = {
    "lstm": LSTMEncoder,
    "transformer": TransformerEncoder,
}


# --- fusions: M modality vectors (B, H) each -> (B, H) ---------------------------------------------

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


FUSIONS: dict[str, type[nn.Module]] = {
    "sum_lstm": SumLSTMFusion,
    "sum_transformer": SumTransformerFusion,
    "self_attention": SelfAttentionFusion,
    "query_attention": QueryAttentionFusion,
}


# --- the registries' interface: what the config and the pipelines ask of a component -------------

_REGISTRIES: dict[str, dict[str, type[nn.Module]]] = {"encoder": ENCODERS, "fusion": FUSIONS}


def registry(kind: str) -> dict[str, type[nn.Module]]:
    """The registry of `kind`: 'encoder' ((B, T, H), real -> (B, H)) or 'fusion' ([(B, H)] -> (B, H))."""
    assert kind in _REGISTRIES, f"kind must be one of {list(_REGISTRIES)}, got {kind!r}"
    return _REGISTRIES[kind]


def register(kind: str, name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the component `name` of `kind`. `cls(config)` builds it; class attributes `cost`
    (encoders: relative time of one layer, LSTM = 1) and `uses_heads` declare what the rest needs."""
    registry(kind)[name] = cls
    return cls


def constraint_errors(config: ModelConfig) -> list[str]:
    """What the chosen components require of the config and it does not meet (empty: valid)."""
    chosen = [registry("encoder").get(config.encoder), registry("fusion").get(config.fusion)]
    if config.hidden % config.heads and any(getattr(c, "uses_heads", False) for c in chosen):
        return [f"The 'hidden' parameter of ModelConfig must be divisible by 'heads' ({config.heads}) "
                f"for attention. Got {config.hidden} instead."]
    return []


def relative_cost(config: ModelConfig) -> float:
    """Relative training time of one epoch: encoder layers x modalities, weighted by the encoder's cost."""
    encoder = registry("encoder")[config.encoder]
    return len(config.modalities) * config.encoder_layers * getattr(encoder, "cost", 1.0)


# --- the model --------------------------------------------------------------------------------------

class MSAModel(nn.Module):
    """Per modality: [LayerNorm] -> Linear -> ReLU -> encoder; then fusion -> Linear -> sigmoid * 6 - 3.

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
        self.encoders = nn.ModuleDict({m: ENCODERS[config.encoder](config) for m in self.modalities})
        self.fusion = FUSIONS[config.fusion](config)
        self.head = nn.Linear(config.hidden, 1)

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) raw features -> (B, T, H): [LayerNorm] -> Linear -> ReLU."""
        return F.relu(self.proj[modality](self.norm[modality](x)))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        assert len(features) == len(self.modalities), \
            f"expected {len(self.modalities)} inputs {self.modalities}, got {len(features)}"
        vectors = []
        for m, x in zip(self.modalities, features):
            encoder = self.encoders[m]
            if self.config.mask_padding:
                # from the raw features: LayerNorm turns an all-zero step into a non-zero one
                vectors.append(encoder(self.embed(m, x), real_steps(x)))  # (B, H)
                continue
            # The lab's function, padding included. Steps that are padding in every row give every
            # row the same inputs and states, so an encoder that can is handed them once, as a
            # (1, S, H) prefix: the same function, and with MOSI-like front padding often 40% of the
            # baseline's recurrent work saved. (Tracing records one fixed S, so it keeps the plain way.)
            takes_prefix = getattr(encoder, "takes_shared_prefix", False) and not torch.jit.is_tracing()
            shared = shared_padding(x) if takes_prefix else 0
            if shared:
                prefix = self.embed(m, x[:1, :shared])  # (1, S, H)
                vectors.append(encoder(self.embed(m, x[:, shared:]), None, prefix))
            else:
                vectors.append(encoder(self.embed(m, x), None))
        fused = self.fusion(vectors)  # (B, H)
        return torch.sigmoid(self.head(fused)).squeeze(-1) * 6 - 3  # (B,)


def build_model(config: ModelConfig, dims: Mapping[str, int]) -> MSAModel:
    """The one factory: a model for `config` whose input dims come from the data (`data.dims`)."""
    return MSAModel(config, dims)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the lab's baseline: 582,067)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
