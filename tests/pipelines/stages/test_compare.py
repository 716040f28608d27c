"""The compare stage's entry for a suite that just ran: a comparison, or the reason there is none."""

import shutil

import numpy as np

from pipelines import tracking
from pipelines.stages.compare import Comparison, compare_suite

N_TEST = 40


def _suite(recorder, finished: dict[str, float]) -> str:
    """A one-seed suite of `baseline` and `text_only` in which only the ablations in `finished`
    (ablation -> prediction noise sd) have a FINISHED run; the others FAILED, as suite.json records it."""
    labels = np.round(np.random.default_rng(0).uniform(-3, 3, N_TEST) * 5) / 5
    pid = recorder.parent(["baseline", "text_only"], [1])
    rows = []
    for ablation in ("baseline", "text_only"):
        if ablation not in finished:
            rows.append(recorder.failed(ablation, 1))
            continue
        pred = labels + np.random.default_rng(len(rows)).normal(0, finished[ablation], N_TEST)
        rows.append(recorder.child(pid, ablation, 1, labels, pred))
    recorder.finish(pid, rows)
    return pid


def test_compare_suite_returns_the_comparison_written_where_the_suite_reports(store, tmp_path, suite_recorder):
    client, exp_id = tracking.setup("stage-compare")
    pid = _suite(suite_recorder(client, exp_id), {"baseline": 1.0, "text_only": 0.5})
    comparison, reason = compare_suite("stage-compare", exp_id, pid)
    assert reason is None and isinstance(comparison, Comparison)
    assert comparison.suite_run_id == pid and list(comparison.table.index) == ["baseline", "text_only"]
    folder = tmp_path / "reports" / "stage-compare" / f"ablations-{pid[:8]}"     # a suite recorded without a label
    assert comparison.paths["report.html"] == folder / "report.html"
    assert (folder.parent / "latest" / "report.html").read_bytes() == (folder / "report.html").read_bytes()
    assert client.get_run(pid).data.tags["comparison"] == "comparison/report.html"


def test_compare_suite_without_a_finished_baseline_says_why(store, tmp_path, suite_recorder):
    client, exp_id = tracking.setup("stage-compare")
    pid = _suite(suite_recorder(client, exp_id), {"text_only": 0.5})
    comparison, reason = compare_suite("stage-compare", exp_id, pid)
    assert comparison is None
    assert reason == f"no comparison: suite run '{pid}' has no finished 'baseline' run to compare against"
    assert not (tmp_path / "reports").exists() and "comparison" not in client.get_run(pid).data.tags


def test_runs_still_running_are_left_out_and_counted(store, tmp_path, suite_recorder):
    """A suite that ended while another suite was still training one of its runs: the comparison holds
    FINISHED runs only and says how many are running; once that run FINISHED, it counts."""
    from pipelines.stages.compare import format_table
    from pipelines.status import RunStatus
    from pipelines.suite import SuiteRow

    client, exp_id = tracking.setup("stage-compare")
    recorder = suite_recorder(client, exp_id)
    labels = np.round(np.random.default_rng(0).uniform(-3, 3, N_TEST) * 5) / 5
    pid = recorder.parent(["baseline", "text_only"], [1, 2])
    rows = [recorder.child(pid, a, s, labels, labels + np.random.default_rng(s).normal(0, 0.5, N_TEST))
            for a, s in (("baseline", 1), ("baseline", 2), ("text_only", 1))]
    # Trained under another suite's parent, and RUNNING still when this suite ended.
    other = recorder.parent(["text_only"], [2])
    elsewhere = recorder.child(other, "text_only", 2, labels, labels + np.random.default_rng(2).normal(0, 0.5, N_TEST))
    client.update_run(elsewhere.run_id, status=RunStatus.RUNNING)
    recorder.finish(pid, rows + [SuiteRow("text_only", 2, "text_only-2", elsewhere.run_id, RunStatus.RUNNING)])

    comparison, _ = compare_suite("stage-compare", exp_id, pid)
    assert comparison.n_running == 1 and len(comparison.runs) == 3
    assert "1 run(s) of this suite still running: counted once FINISHED" in format_table(comparison)

    client.set_terminated(elsewhere.run_id, "FINISHED")
    comparison, _ = compare_suite("stage-compare", exp_id, pid)
    assert comparison.n_running == 0 and len(comparison.runs) == 4


def test_a_link_or_file_where_latest_goes_is_replaced_by_the_copy(store, tmp_path, suite_recorder):
    client, exp_id = tracking.setup("stage-compare")
    pid = _suite(suite_recorder(client, exp_id), {"baseline": 1.0, "text_only": 0.5})
    reports = tmp_path / "reports" / "stage-compare"
    reports.mkdir(parents=True)
    for make in (lambda p: p.symlink_to(tmp_path), lambda p: p.write_text("not a folder")):
        make(reports / "latest")
        comparison, reason = compare_suite("stage-compare", exp_id, pid)
        assert reason is None
        latest = reports / "latest"
        assert latest.is_dir() and not latest.is_symlink()
        assert (latest / "report.html").read_bytes() == comparison.paths["report.html"].read_bytes()
        assert not list(reports.glob(".latest-*"))                          # no half-built copy left behind
        shutil.rmtree(latest)
