"""The encoders: one modality's (B, T, H) projected features -> (B, H), registered by name."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from msa.config import ModelConfig
from msa.models.layers import PositionalEncoding, encoder_attention, last_real, left_aligned, pool, transformer_stack
from msa.models.registry import register

# --- encoders: (B, T, H) projected features, (B, T) real steps or None (unmasked) -> (B, H) --------
# An encoder whose `takes_shared_prefix` is true also accepts `prefix` (1, S, H): steps every row has
# before x (see MSAModel.encode). Without that attribute an encoder always gets the whole sequence.
# `steps(x, real)` gives the per-step outputs before pooling, (B, L, H), and which of them are real
# ((B, L) or None), for a fusion that takes sequences. An encoder with `needs_real_steps` is given
# the real steps even when the config does not mask padding. `config_errors(config)`, when present,
# lists what the component requires of the config and it does not meet.

class LSTMEncoder(nn.Module):
    """The lab's encoder: an LSTM whose last hidden state (or mean or attention-pooled output)
    represents the sequence.

    `bidirectional`: a forward and a backward LSTM, each hidden/2 wide, concatenated back to `hidden`
    (per step, and for the last state: the forward's at the last step, the backward's at the first),
    so that the fusion and a next layer see the same width with ~3/4 of one LSTM's parameters.
    """

    # Relative training time of one layer on one modality; the suite's schedule and ETA weigh runs by it.
    # Options not counted in it, measured (1 thread, batch 16, T = 50, synthetic MOSI front padding,
    # forward + backward + Adam of the three encoders): attention pooling 1.16x; bidirectional 1.2x
    # reading the padding, 1.7x masked (packed).
    cost: ClassVar[float] = 1.0
    uses_heads: ClassVar[bool] = False  # attention: hidden must be a multiple of heads
    packed: ClassVar[bool] = False  # True: always run on each row's real steps only, as a packed sequence

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooling = cfg.pooling
        self.bidirectional = cfg.bidirectional
        # nn.LSTM applies dropout only between stacked layers; with one layer the lab's dropout=0.1
        # does nothing but warn, so it is passed only when there is a layer boundary to apply it at.
        dropout = cfg.dropout if cfg.encoder_layers > 1 else 0.0
        width = cfg.hidden // 2 if cfg.bidirectional else cfg.hidden
        self.lstm = nn.LSTM(cfg.hidden, width, num_layers=cfg.encoder_layers, dropout=dropout,
                            batch_first=True, bidirectional=cfg.bidirectional)
        self.attention = encoder_attention(cfg)

    @classmethod
    def config_errors(cls, config: ModelConfig) -> list[str]:
        if config.bidirectional and config.hidden % 2:
            return [f"The 'hidden' parameter of ModelConfig must be even for a bidirectional LSTM (two "
                    f"halves of hidden/2). Got {config.hidden} instead."]
        return []

    @property
    def takes_shared_prefix(self) -> bool:
        # A recurrence can start every row from one state computed once: in one direction only (a
        # backward one ends in the prefix), and not while dropout acts between layers, because one
        # row's prefix would give every row the same dropout mask.
        one_way = not (self.packed or self.bidirectional)
        return one_way and not (self.training and self.lstm.dropout > 0)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H); `prefix` (1, S, H), when given, are steps every row has before x."""
        if real is not None or self.packed or self.bidirectional:
            out, real_out, final = self._run(x, real)
            if self.attention is not None:
                return self.attention(out, real_out)
            return final if self.pooling == "last" else pool(out, real_out, "mean")
        state, prefix_out, prefix_sum, steps = None, None, 0.0, x.shape[1]
        if prefix is not None:
            prefix_out, (h0, c0) = self.lstm(prefix)  # (1, S, H), (layers, 1, H)
            B = x.shape[0]
            state = (h0.expand(-1, B, -1).contiguous(), c0.expand(-1, B, -1).contiguous())
            prefix_sum, steps = prefix_out.sum(dim=1), steps + prefix.shape[1]
        out, (h, _) = self.lstm(x, state)  # (B, T, H), (layers, B, H)
        if self.attention is not None:
            if prefix_out is not None:
                out = torch.cat([prefix_out.expand(x.shape[0], -1, -1), out], dim=1)  # (B, S + T, H)
            return self.attention(out, None)
        return h[-1] if self.pooling == "last" else (out.sum(dim=1) + prefix_sum) / steps

    def steps(self, x: torch.Tensor, real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, real_out, _ = self._run(x, real)
        return out, real_out

    def _run(self, x: torch.Tensor, real: torch.Tensor | None):
        """(B, T, H) -> every step's output (B, L, H), which of them are real ((B, L) or None), and
        each row's final state (B, H): the last layer's, both directions."""
        if real is None:
            assert not self.packed, "a packed LSTM needs the real steps (needs_real_steps)"
            out, (h, _) = self.lstm(x)  # (B, T, H), (layers * directions, B, H / directions)
            return out, None, self._final(h)
        x, lengths, left = left_aligned(x, real)  # (B, L, H), (B,), (B, L)
        if self.packed or self.bidirectional:
            # A backward direction must start at each row's own last real step, which packing gives.
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, (h, _) = self.lstm(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, L, H)
            return out, left, self._final(h)
        # An LSTM is causal: with each row's real steps moved to the front, its output at a row's
        # last real step has seen that row's real steps and nothing else, wherever the padding was.
        # The same function as packing (tests/msa check it), keeping the fast oneDNN kernel on CPU.
        out, _ = self.lstm(x)  # (B, L, H)
        return out, left, last_real(out, left)

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """(layers * directions, B, H / directions) -> (B, H): the last layer's final state(s)."""
        return torch.cat([h[-2], h[-1]], dim=-1) if self.bidirectional else h[-1]


class PackedLSTMEncoder(LSTMEncoder):
    """An LSTM that reads each row's real steps only, as a packed sequence (`pack_padded_sequence`),
    whatever `mask_padding` says: the zero prefix is never read. One direction computes the same
    function as `lstm` with `mask_padding: true`, by packing instead of moving the real steps to the
    front; bidirectional, its backward direction starts at each row's last real step."""

    # Measured as for `lstm`: 1.40x the lab's LSTM (which computes the shared padding once, with the
    # fused oneDNN kernel); bidirectional 1.67x. (`lstm` with mask_padding: 1.02x.)
    cost: ClassVar[float] = 1.4
    packed: ClassVar[bool] = True
    needs_real_steps: ClassVar[bool] = True


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
        self.attention = encoder_attention(cfg)

    def forward(self, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        x, real = self.steps(x, real)  # (B, T, H)
        return pool(x, real, self.pooling) if self.attention is None else self.attention(x, real)

    def steps(self, x: torch.Tensor, real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pad = None if real is None else ~real  # (B, T), True = ignore
        return self.transformer(self.pe(x, real), src_key_padding_mask=pad), real  # (B, T, H)


register("encoder", "lstm", LSTMEncoder)
register("encoder", "packed_lstm", PackedLSTMEncoder)
register("encoder", "transformer", TransformerEncoder)
