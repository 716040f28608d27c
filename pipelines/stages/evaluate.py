"""Stage 3, evaluate: the selected checkpoint on the test split, once; metrics and per-sample predictions."""

from __future__ import annotations

import pandas as pd
from torch import nn

from msa.data import Split
from msa.metrics import eval_mosi_regression
from msa.training import predict


def evaluate(model: nn.Module, split: Split, batch_size: int = 256) -> tuple[dict[str, float], pd.DataFrame]:
    """Test metrics of `model` and a table of (id, label, prediction[, oracle]) per sample."""
    pred = predict(model, split, batch_size=batch_size)
    table = pd.DataFrame({"id": split.ids, "label": split.labels.numpy(), "prediction": pred})
    if split.oracle is not None:
        table["oracle"] = split.oracle.numpy()
    return eval_mosi_regression(pred, split.labels), table
