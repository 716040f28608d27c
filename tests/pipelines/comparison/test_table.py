"""The comparison table from run records alone: means, spreads and differences of known values."""

import math

import numpy as np
import pytest

from pipelines.comparison import RunRecord, summarise


def test_summarise_aggregates_known_values():
    def rec(ablation, seed, corr, mae):
        return RunRecord(ablation, seed, f"{ablation}{seed}", {"Corr": corr, "MAE": mae}, {}, None)

    records = [rec("baseline", 1, 0.5, 1.0), rec("baseline", 2, 0.6, 0.9), rec("baseline", 3, 0.7, 0.8),
               rec("b", 1, 0.4, 1.1), rec("b", 2, 0.5, 1.2), rec("c", 1, 0.9, 0.5)]
    table = summarise(records, ["baseline", "b", "c"], "baseline", n_boot=10)
    assert list(table.index) == ["baseline", "b", "c"]
    base, b, c = table.loc["baseline"], table.loc["b"], table.loc["c"]
    assert base["Corr_mean"] == pytest.approx(0.6) and base["Corr_std"] == pytest.approx(0.1) and base["Corr_n"] == 3
    assert b["Corr_mean"] == pytest.approx(0.45) and b["Corr_std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert b["Corr_delta"] == pytest.approx(-0.15) and b["MAE_delta"] == pytest.approx(0.25) and b["Corr_n"] == 2
    assert c["Corr_n"] == 1 and math.isnan(c["Corr_std"])                     # one seed: no spread to report
    assert b["Has0_acc_2_n"] == 0 and math.isnan(b["Has0_acc_2_mean"])       # never logged: not invented
    assert b["test"] == "no test predictions logged" and b["Corr_mark"] == ""
