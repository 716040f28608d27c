"""What a comparison is made of: its result (Comparison), one run as it reads it (RunRecord), its
error, and the names every part of it shares (marks, key metrics, curves, display order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from msa.config import MODALITIES

KEY_METRICS: tuple[str, ...] = ("Corr", "MAE", "Has0_acc_2", "Mult_acc_7")
STAT_COLUMNS: tuple[str, ...] = ("mean", "std", "n", "delta", "ci_low", "ci_high", "mark")
BETTER, WORSE, SAME = "▲", "▼", "~"
SYNTHETIC_BANNER = "SYNTHETIC data — not a MOSI result"
ORACLE = "oracle"
CURVE_KEYS: tuple[str, ...] = ("val_Corr", "val_loss", "val_MAE", "train_loss")
# The order reports list modalities in (text first, as MOSI papers do); the models take them in
# msa.config.MODALITIES order, which is no concern of a report.
DISPLAY_ORDER: tuple[str, ...] = ("text", "vision", "audio")
assert sorted(DISPLAY_ORDER) == sorted(MODALITIES), f"display order {DISPLAY_ORDER} vs modalities {MODALITIES}"


class CompareError(ValueError):
    """The store holds nothing this comparison can use; the message says what to run or pass."""


@dataclass
class RunRecord:
    """One FINISHED child run of the suite, as the comparison needs it."""

    ablation: str
    seed: int
    run_id: str
    test_metrics: dict[str, float]        # test_<Metric> without the prefix; non-finite ones absent
    params: dict[str, str]
    predictions: pd.DataFrame | None      # id, label, prediction[, oracle]; None if not logged


@dataclass
class Comparison:
    table: pd.DataFrame                   # index ablation (suite order, baseline first, oracle last);
                                          # role, seeds, test, then <Metric>_<stat> for every metric
    runs: pd.DataFrame                    # one row per finished run: ablation, seed, run_id, test metrics
    curves: dict[str, pd.DataFrame]       # ablation -> per-epoch CURVE_KEYS, mean over seeds
    modality_subsets: dict[str, tuple[str, ...]]  # ablations that only change the modalities -> them
    experiment: str
    suite_run_id: str
    baseline: str
    synthetic: bool
    test: str                             # the statistical test, in words, as every report states it
    n_test: int                           # test samples per run (0 when no predictions were logged)
    seeds: tuple[int, ...]
    left_out: tuple[str, ...] = ()        # FINISHED runs without a finite test score, in words
    paths: dict[str, Path] = field(default_factory=dict)  # file name -> where it was written
    n_running: int = 0                    # runs of the suite still RUNNING (not counted until FINISHED)
    precision: str = "fp32"               # what the compared runs trained in: fp32, bf16, or "bf16, fp32"

    @property
    def ablations(self) -> list[str]:
        return [a for a in self.table.index if a != ORACLE]
