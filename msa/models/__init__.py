"""The lab's model family, assembled from one `ModelConfig`: per-modality encoders, a fusion, a head.

Read bottom-up: `layers` (padding masks, pooling, positional encoding), `encoders` (`ENCODERS`),
`fusions` (`FUSIONS`), then `model` (`MSAModel`); `registry` holds the registries and what a
component declares. Adding an encoder or a fusion is one class (declaring its `cost` and whether it
`uses_heads`) plus `register(kind, name, cls)`; `ModelConfig` accepts the name from then on. The
default config is the lab's baseline, with submodules created in the lab's order so that the same
torch seed gives the lab's initial weights. Besides the lab's components, the field's: tensor and
low-rank fusion (TFN, LMF), MulT-style cross-modal attention, bidirectional and packed LSTMs, and
attention pooling.
"""

from msa.models import encoders as _encoders  # noqa: F401  (registers the encoders)
from msa.models import fusions as _fusions  # noqa: F401  (registers the fusions)
from msa.models.encoders import LSTMEncoder, PackedLSTMEncoder, TransformerEncoder
from msa.models.fusions import (
    CrossModalFusion,
    LowRankFusion,
    QueryAttentionFusion,
    SelfAttentionFusion,
    SumLSTMFusion,
    SumTransformerFusion,
    TensorFusion,
)
from msa.models.layers import (
    AttentionPooling,
    PositionalEncoding,
    masked_mean,
    pool,
    real_steps,
    shared_padding,
    sinusoidal_table,
    tracing_mode,
)
from msa.models.model import MSAModel, build_model, count_parameters
from msa.models.registry import (
    ENCODERS,
    FUSIONS,
    constraint_errors,
    register,
    registry,
    relative_cost,
)

__all__ = ["ENCODERS", "FUSIONS", "register", "registry", "constraint_errors", "relative_cost", "MSAModel",
           "build_model", "count_parameters", "LSTMEncoder", "PackedLSTMEncoder", "TransformerEncoder",
           "SumLSTMFusion", "SumTransformerFusion", "SelfAttentionFusion", "QueryAttentionFusion", "TensorFusion",
           "LowRankFusion", "CrossModalFusion", "AttentionPooling", "PositionalEncoding", "real_steps",
           "shared_padding", "masked_mean", "pool", "sinusoidal_table", "tracing_mode"]
