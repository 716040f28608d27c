"""The suite's ETA weighs each epoch by its run's estimated cost, so long runs going first do not inflate it."""

import io

from pytest import approx

from pipelines.progress import SuiteProgress, brief
from pipelines.stages.train import RunOutcome


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _epochs(p, ablation, seed, n):
    for e in range(1, n + 1):
        p.on_event({"event": "epoch", "ablation": ablation, "seed": seed, "epoch": e, "epochs": n, "val_Corr": 0.1})


def _done(p, ablation, seed, status="FINISHED", epochs=3):
    metrics = {"Corr": 0.5, "MAE": 1.0, "Has0_acc_2": 0.7} if status == "FINISHED" else None
    p.on_done(RunOutcome(ablation, seed, status, "r", 1.0, metrics, epochs, None if metrics else "boom"))


def test_eta_weighs_epochs_by_cost():
    clock = Clock()
    p = SuiteProgress({("improved", 1): (10, 4.0), ("text_only", 1): (10, 1.0)}, io.StringIO(), clock=clock)
    assert p.eta() == float("inf")
    clock.now = 40.0                                   # 10 heavy epochs took 40 s: 1 s per unit of cost
    _epochs(p, "improved", 1, 10)
    assert p.eta() == approx(10.0)                     # 10 light epochs of cost 1 are left, not 40 s
    assert p.done_epochs == 10 and p.total_epochs == 20


def test_early_stop_and_failure_take_the_missing_epochs_off():
    out, clock = io.StringIO(), Clock()
    p = SuiteProgress({("a", 1): (10, 2.0), ("b", 1): (10, 1.0), ("c", 1): (5, 1.0)}, out, clock=clock)
    clock.now = 6.0
    _epochs(p, "a", 1, 3)                              # 3 epochs of cost 2 in 6 s, then stopped early
    _done(p, "a", 1)
    assert p.total_epochs == 18 and p.total_cost == approx(21.0)
    assert p.eta() == approx(15.0)
    assert "[1/3] a/seed-1" in out.getvalue() and "suite ETA 15s" in out.getvalue()
    _done(p, "c", 1, status="FAILED")                  # failed before its first epoch
    assert p.total_epochs == 13 and p.eta() == approx(10.0)
    assert "FAILED: boom" in out.getvalue()


def test_late_and_unknown_events_are_not_counted():
    clock = Clock()
    p = SuiteProgress({("a", 1): (4, 1.0), ("b", 1): (4, 1.0)}, io.StringIO(), clock=clock)
    _epochs(p, "a", 1, 2)
    _done(p, "a", 1)
    _epochs(p, "a", 1, 1)                              # an epoch event that arrives after its run ended
    _epochs(p, "zzz", 7, 3)                            # and one from a run this suite does not plan
    assert p.done_epochs == 2 and p.done_cost == approx(2.0) and p.total_cost == approx(6.0)


def test_a_long_error_is_cut_at_a_word_on_the_run_line():
    out = io.StringIO()
    p = SuiteProgress({("a", 1): (2, 1.0)}, out, clock=Clock())
    error = "ValueError: " + " ".join(["somewhat-long-words"] * 12) + "\nsecond line"
    p.on_done(RunOutcome("a", 1, "FAILED", "r", 1.0, None, 0, error))
    line = out.getvalue().splitlines()[0]
    assert "FAILED: ValueError: somewhat-long-words somewhat-long-words" in line
    assert "somewhat-long-words ...  1s" in line and "second line" not in line
    assert brief("short", 120) == "short" and brief("x" * 200, 10) == "xxxxxx ..."
