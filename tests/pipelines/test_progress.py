"""The suite's ETA weighs each epoch by its run's estimated cost, so long runs going first do not inflate it."""

import io

import pytest

from pipelines import progress as progress_mod
from pipelines.progress import SuiteProgress
from pipelines.stages.train import RunOutcome


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    return now


def _epochs(p, ablation, seed, n):
    for e in range(1, n + 1):
        p.on_event({"event": "epoch", "ablation": ablation, "seed": seed, "epoch": e, "epochs": n, "val_Corr": 0.1})


def test_eta_weighs_epochs_by_cost(clock):
    p = SuiteProgress({("improved", 1): (10, 4.0), ("text_only", 1): (10, 1.0)}, io.StringIO())
    assert p.eta() == float("inf")
    clock[0] = 40.0                                    # 10 heavy epochs took 40 s: 1 s per unit of cost
    _epochs(p, "improved", 1, 10)
    assert p.eta() == pytest.approx(10.0)              # 10 light epochs of cost 1 are left, not 40 s
    assert p.done_epochs == 10 and p.total_epochs == 20


def test_early_stop_takes_the_missing_epochs_off(clock):
    out = io.StringIO()
    p = SuiteProgress({("a", 1): (10, 2.0), ("b", 1): (10, 1.0)}, out)
    clock[0] = 6.0
    _epochs(p, "a", 1, 3)                              # 3 epochs of cost 2 in 6 s, then stopped early
    p.on_done(RunOutcome("a", 1, "FINISHED", "r1", 6.0, {"Corr": 0.5, "MAE": 1.0, "Has0_acc_2": 0.7}, 3))
    assert p.total_epochs == 13 and p.total_cost == pytest.approx(16.0)
    assert p.eta() == pytest.approx(10.0)
    assert "[1/2] a/seed-1" in out.getvalue() and "suite ETA 10s" in out.getvalue()
