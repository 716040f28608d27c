"""The comparison on a hand-made tracking store: known metrics, known differences, no training."""

import math
import os
import re
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from msa.metrics import METRIC_NAMES, eval_mosi_regression
from pipelines import tracking
from pipelines.comparison import (
    SYNTHETIC_BANNER,
    CompareError,
    compare,
    find_suite,
    open_experiment,
)
from pipelines.run import main

EXPERIMENT = "unit-compare"
N_TEST = 300
ALL = "[vision, text, audio]"
# ablation -> (seeds, prediction noise sd, params that differ from the baseline's)
DESIGN = {
    "baseline": ((1, 2, 3), 1.0, {}),
    "improved": ((1, 2, 3), 0.4, {"model.encoder": "transformer"}),
    "same": ((1, 2, 3), None, {"train.loss": "l1"}),             # None: the baseline's predictions, exactly
    "text_only": ((1,), 0.9, {"model.modalities": "[text]"}),
    "vision_only": ((1, 2, 3), 3.0, {"model.modalities": "[vision]"}),
    "vision_audio": ((1, 2, 3), 2.5, {"model.modalities": "[vision, audio]"}),
    "lonely": ((9,), 1.0, {"train.lr": "0.01"}),                  # shares no seed with the baseline
}
ORDER = [*DESIGN, "crashed"]                                      # crashed: a FAILED row only


def _labels():
    rng = np.random.default_rng(0)
    return np.round(rng.uniform(-3, 3, N_TEST) * 5) / 5          # MOSI's annotator grid, some exact zeros


def _predictions(labels):
    """ablation -> seed -> predictions: label + seeded noise (same noise per seed for `same`)."""
    out = {}
    for ablation, (seeds, sd, _) in DESIGN.items():
        out[ablation] = {}
        for seed in seeds:
            if sd is None:
                out[ablation][seed] = out["baseline"][seed]
            else:
                noise = np.random.default_rng(1000 * seed + len(out)).normal(0, sd, N_TEST)
                out[ablation][seed] = labels + noise  # unclipped, so the expected MAE is sd * sqrt(2 / pi)
    return out


BASE_PARAMS = {"model.modalities": ALL, "model.encoder": "lstm", "train.loss": "mse", "train.lr": "0.001",
               "data.dim.text": "300"}


def build_suite(recorder):
    labels = _labels()
    preds = _predictions(labels)
    pid = recorder.parent(ORDER, [1, 2, 3], name="ablations test", tags={"synthetic": "true"},
                          oracle=eval_mosi_regression(labels * 0.9, labels))
    rows = []
    for a in DESIGN:
        for s in DESIGN[a][0]:
            test = eval_mosi_regression(preds[a][s], labels)
            rows.append(recorder.child(
                pid, a, s, labels, preds[a][s], params=BASE_PARAMS | DESIGN[a][2], tags={"synthetic": "true"},
                curves={"val_Corr": test["Corr"], "val_MAE": test["MAE"], "val_loss": 1.0, "train_loss": 1.0},
                ids=[f"v{i}$_${i}" for i in range(N_TEST)], oracle=labels * 0.9))
    rows.append(recorder.failed("crashed", 1))
    recorder.finish(pid, rows)
    return pid, labels, preds


@pytest.fixture(scope="module")
def made(tmp_path_factory, suite_recorder):
    """A store with one finished suite, a newer suite still running (no suite.json), and a comparison of it."""
    tmp = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.chdir(tmp)
        client, exp_id = tracking.setup(EXPERIMENT)
        pid, labels, preds = build_suite(suite_recorder(client, exp_id))
        time.sleep(0.01)  # the running suite must start later
        running = client.create_run(exp_id, run_name="ablations running", tags={"suite": "ablations"}).info.run_id
        comparison = compare(client, exp_id, n_boot=1000)
        yield {"tmp": tmp, "client": client, "exp_id": exp_id, "parent": pid, "running": running,
               "labels": labels, "preds": preds, "c": comparison, "uri": tracking.tracking_uri()}


@pytest.fixture
def in_store(made, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", made["uri"])
    monkeypatch.chdir(made["tmp"])
    return made


def test_table_holds_mean_std_delta_of_the_logged_metrics(made):
    table, preds, labels = made["c"].table, made["preds"], made["labels"]
    assert list(table.index) == [*ORDER, "oracle"]                           # suite order, baseline first
    for ablation in ("baseline", "improved", "vision_only"):
        values = [eval_mosi_regression(p, labels)["Corr"] for p in preds[ablation].values()]
        base = np.mean([eval_mosi_regression(p, labels)["Corr"] for p in preds["baseline"].values()])
        row = table.loc[ablation]
        assert row["Corr_mean"] == pytest.approx(np.mean(values))
        assert row["Corr_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["Corr_n"] == 3 and row["Corr_delta"] == pytest.approx(np.mean(values) - base)
    for m in METRIC_NAMES:
        assert f"{m}_ci_low" in table and f"{m}_mark" in table
    assert table.loc["crashed", "test"] == "no finished run" and table.loc["crashed", "Corr_n"] == 0


def test_interval_covers_the_known_difference_and_marks_the_direction(made):
    table, preds, labels = made["c"].table, made["preds"], made["labels"]
    improved = table.loc["improved"]
    # Noise sd 1.0 -> 0.4 on labels in [-3, 3]: MAE drops by about (1.0 - 0.4) * sqrt(2 / pi) = 0.479.
    assert improved["MAE_ci_low"] < -0.6 * np.sqrt(2 / np.pi) < improved["MAE_ci_high"] < 0
    observed = np.mean([eval_mosi_regression(preds["improved"][s], labels)["MAE"]
                        - eval_mosi_regression(preds["baseline"][s], labels)["MAE"] for s in (1, 2, 3)])
    assert improved["MAE_ci_low"] < observed < improved["MAE_ci_high"]
    assert improved["MAE_mark"] == "▲" and improved["Corr_mark"] == "▲"      # MAE: lower is better
    assert improved["Corr_ci_low"] > 0
    assert improved["test"] == "test samples bootstrapped, seeds by Welch's t, 3 vs 3 seeds"

    same = table.loc["same"]                                                # identical predictions
    for m in ("Corr", "MAE", "Has0_acc_2", "Mult_acc_7"):
        assert same[f"{m}_ci_low"] <= 0 <= same[f"{m}_ci_high"] and same[f"{m}_mark"] == "~"

    worse = table.loc["vision_only"]
    assert worse["MAE_ci_low"] > 0 and worse["MAE_mark"] == "▼" and worse["Corr_mark"] == "▼"
    for lone in ("lonely", "text_only"):                                  # one seed: its spread is unknown
        assert table.loc[lone, "test"] == ("test samples bootstrapped, seeds by Welch's t, 1 vs 3 seeds: one seed on a "
                                           "side leaves its seed-to-seed spread out of the interval, so no mark")
        assert math.isfinite(table.loc[lone, "MAE_ci_low"]) and table.loc[lone, "MAE_mark"] == ""
    from pipelines.comparison.render import special_tests

    assert special_tests(made["c"]) == [f"text_only, lonely: {table.loc['lonely', 'test']}",   # said once
                                        "crashed: no finished run"]


def test_oracle_row_and_synthetic_label(made):
    c = made["c"]
    assert c.synthetic and c.baseline == "baseline" and c.n_test == N_TEST and c.seeds == (1, 2, 3)
    oracle = c.table.loc["oracle"]
    assert oracle["role"] == "oracle"
    assert oracle["Corr_mean"] == pytest.approx(1.0) and oracle["Corr_mark"] == ""
    assert c.modality_subsets == {"baseline": ("text", "vision", "audio"), "text_only": ("text",),
                                  "vision_only": ("vision",), "vision_audio": ("vision", "audio")}
    curves = c.curves["baseline"]
    assert set(curves.columns) >= {"val_Corr", "val_loss"} and list(curves.index) == [1, 2, 3]


def test_the_latest_usable_suite_is_chosen_and_a_named_one_checked(made):
    client, exp_id = made["client"], made["exp_id"]
    assert made["c"].suite_run_id == made["parent"]                        # the newer one has no suite.json
    with pytest.raises(CompareError, match=r"has no suite\.json yet"):
        find_suite(client, exp_id, made["running"])
    child = made["c"].runs["run_id"].iloc[0]
    with pytest.raises(CompareError, match="is not a suite run"):
        find_suite(client, exp_id, child)


def test_outputs_are_written_and_logged_on_the_parent_run(made):
    c, client = made["c"], made["client"]
    assert set(c.paths) == {"comparison.csv", "comparison.md", "report.html"}
    folder = made["tmp"] / "reports" / EXPERIMENT / f"ablations-{made['parent'][:8]}"   # recorded without a label
    for path in c.paths.values():
        assert path.parent == folder and path.stat().st_size > 0
        assert (folder.parent / "latest" / path.name).read_bytes() == path.read_bytes()
    logged = {a.path for a in client.list_artifacts(made["parent"], "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/report.html"}
    assert client.get_run(made["parent"]).data.tags["comparison"] == "comparison/report.html"

    csv = pd.read_csv(c.paths["comparison.csv"])
    assert list(csv["ablation"]) == [*ORDER, "oracle"]
    assert set(csv["data"]) == {"SYNTHETIC (not a MOSI result)"}                # the file may travel alone
    assert not re.search(r"\d\.\d*(0{7}|9{7})\d", c.paths["comparison.csv"].read_text())  # no float noise
    for m in METRIC_NAMES:
        for stat in ("mean", "std", "n", "delta", "ci_low", "ci_high", "mark"):
            assert f"{m}_{stat}" in csv.columns

    md = c.paths["comparison.md"].read_text()
    assert SYNTHETIC_BANNER in md and "Test used: test samples bootstrapped, seeds by Welch's t" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| **baseline** | 3 |")                    # baseline first, n seeds
    assert "Without text (vision_audio)" in md and "Strongest single modality: text (text_only" in md


def test_html_report_is_self_contained(made):
    page = made["c"].paths["report.html"].read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="https?:', page) and "<script" not in page and "<link" not in page
    assert SYNTHETIC_BANNER in page and "Which modalities matter" in page and "Validation curves" in page
    assert "test samples bootstrapped, seeds by Welch&#x27;s t" in page or "seeds by Welch" in page


def test_cli_compare_rebuilds_from_the_store_alone(in_store, capsys):
    assert main(["compare", "--experiment", EXPERIMENT]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"*** {SYNTHETIC_BANNER} ***"
    body = [line.split()[0] for line in lines[4:4 + len(ORDER) + 1]]
    assert body == [*ORDER, "oracle"]
    assert re.search(r"^improved\s+3\s+0\.\d{3} ± 0\.\d{3} \+0\.\d{3} ▲", out, re.MULTILINE)
    folder = in_store["tmp"] / "reports" / EXPERIMENT / f"ablations-{in_store['parent'][:8]}"
    assert f"Report: {folder / 'report.html'}" in out

    _, exp_id = open_experiment(None, suite_run_id=in_store["parent"])      # --suite alone names the experiment
    assert exp_id == in_store["exp_id"]


def test_each_suite_keeps_its_reports_and_compare_suite_rebuilds_any(in_store, suite_recorder, capsys):
    client, exp_id = in_store["client"], in_store["exp_id"]
    labels = _labels()
    recorder = suite_recorder(client, exp_id)
    other = recorder.parent(["baseline", "improved"], [1], tags={"suite_label": "other-suite"})
    recorder.finish(other, [recorder.child(other, a, 1, labels, labels + np.random.default_rng(i).normal(0, 1, N_TEST))
                            for i, a in enumerate(("baseline", "improved"))])
    reports = in_store["tmp"] / "reports" / EXPERIMENT
    first = reports / f"ablations-{in_store['parent'][:8]}"
    before = (first / "comparison.csv").read_bytes()

    assert main(["compare", "--suite", other]) == 0                          # a new suite's report: its own folder
    assert "other-suite/report.html" in capsys.readouterr().out
    assert (first / "comparison.csv").read_bytes() == before                 # the first suite's report survives
    assert "improved" in (reports / "other-suite" / "comparison.csv").read_text()
    assert (reports / "latest" / "comparison.csv").read_bytes() == before    # --suite never moves `latest`

    (first / "report.html").unlink()
    assert main(["compare", "--suite", first.name]) == 0                     # by label, as the folder is named
    assert (first / "report.html").is_file() and str(first / "report.html") in capsys.readouterr().out
    # `latest` names a folder too: the suite that ran last, as `compare` alone takes it (here `other`).
    assert main(["compare", "--experiment", EXPERIMENT, "--suite", "latest"]) == 0
    assert (reports / "latest" / "comparison.csv").read_bytes() == (reports / "other-suite" / "comparison.csv"
                                                                   ).read_bytes() != before
    capsys.readouterr()
    (first / "report.html").unlink()
    assert main(["compare", "--suite", in_store["parent"][:8]]) == 0         # by the start of its id
    assert (first / "report.html").is_file() and str(first / "report.html") in capsys.readouterr().out


def test_cli_errors_are_one_line(in_store, capsys, tmp_path, monkeypatch):
    assert main(["compare", "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no experiment 'nope' in sqlite:///") and err.count("\n") == 1
    assert main(["compare", "--experiment", EXPERIMENT, "--suite", "0123abcd"]) == 2
    assert capsys.readouterr().err.startswith("error: no run '0123abcd'")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    assert main(["compare"]) == 2
    assert "no tracking store at" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()                              # looking never creates a store


def test_a_disk_that_fills_up_is_one_line_exit_1_and_the_store_is_kept(in_store, capsys, monkeypatch):
    import errno
    import pathlib

    write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "report.html":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    assert main(["compare", "--experiment", EXPERIMENT]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "report.html: No space left on device" in err
    parent = MlflowClient(in_store["uri"]).get_run(in_store["parent"])
    assert parent.info.status == "FINISHED"                                 # what was recorded stays


def test_report_renders_in_a_real_browser(made, browser, tmp_path):
    """report.html in headless Chromium: no console error, every chart decodes, the tables hold every ablation."""
    page = made["c"].paths["report.html"]
    assert browser.open(page.as_uri()) == []
    images = browser.evaluate("Promise.all([...document.images].map(i => i.decode().then("
                              "() => [i.alt, i.naturalWidth, i.naturalHeight], () => [i.alt, 0, 0])))")
    assert len(images) >= 6 and all(w > 0 and h > 0 for _, w, h in images), images
    tables = browser.evaluate("[...document.querySelectorAll('table')].map(t => "
                              "[...t.tBodies[0].rows].map(r => r.cells[0].textContent))")
    assert tables[0] == [*ORDER, "oracle"] and tables[-1] == [*ORDER, "oracle"]   # test metrics; all metrics
    assert set(tables[1]) == set(made["c"].modality_subsets)                        # which modalities matter
    assert browser.evaluate("document.querySelector('.banner').textContent").startswith(SYNTHETIC_BANNER)
    browser.screenshot(tmp_path / "report.png", full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert browser.drain() == []                                                     # nothing failed late either


def test_compare_alone_takes_the_suite_that_ran_last_as_ablations_makes_it_latest(store, suite_recorder):
    """Suite A, then suite B, then A run again (resumed: its parent RUNNING, then FINISHED anew): A is
    the newest, as `ablations` made its report `latest`, though B started later."""
    from pipelines.comparison import store as comparison_store

    client, exp_id = tracking.setup("unit-latest")
    recorder = suite_recorder(client, exp_id)
    labels = _labels()
    parents = {}
    for name in ("a", "b"):
        pid = recorder.parent(["baseline"], [1], tags={"suite_label": name})
        recorder.finish(pid, [recorder.child(pid, "baseline", 1, labels, labels)])
        parents[name] = pid
        time.sleep(0.01)
    assert comparison_store.find_suite(client, exp_id)[0].info.run_id == parents["b"]
    client.update_run(parents["a"], "RUNNING")                               # resumed ...
    assert comparison_store.find_suite(client, exp_id)[0].info.run_id == parents["a"]   # running now
    time.sleep(0.01)
    client.set_terminated(parents["a"], "FINISHED")                           # ... and finished again
    assert comparison_store.find_suite(client, exp_id)[0].info.run_id == parents["a"]


def test_a_bf16_suite_says_so_in_every_report(store, suite_recorder, tmp_path):
    from pipelines.comparison import compare, format_table

    client, exp_id = tracking.setup("unit-bf16")
    recorder = suite_recorder(client, exp_id)
    labels = _labels()
    pid = recorder.parent(["baseline", "text_only"], [1])
    recorder.finish(pid, [recorder.child(pid, a, 1, labels, labels + np.random.default_rng(i).normal(0, 1, N_TEST),
                                         params={"train.precision": "bf16"})
                          for i, a in enumerate(("baseline", "text_only"))])
    c = compare(client, exp_id, suite_run_id=pid, out_dir=tmp_path / "out")
    assert c.precision == "bf16" and "trained in bf16" in format_table(c).splitlines()[0]
    assert "worse than the baseline in the metric's own direction" in format_table(c)
    assert "· precision bf16" in c.paths["comparison.md"].read_text()
    assert "precision bf16" in c.paths["report.html"].read_text()
    assert set(pd.read_csv(c.paths["comparison.csv"])["precision"]) == {"bf16"}


def test_the_legend_names_the_ablation_compared_against(store, suite_recorder, tmp_path):
    from pipelines.comparison import compare, format_table

    client, exp_id = tracking.setup("unit-nobaseline")
    recorder = suite_recorder(client, exp_id)
    labels = _labels()
    pid = recorder.parent(["tfn", "text_only"], [1])
    recorder.finish(pid, [recorder.child(pid, a, 1, labels, labels + np.random.default_rng(i).normal(0, 1, N_TEST))
                          for i, a in enumerate(("tfn", "text_only"))])
    c = compare(client, exp_id, suite_run_id=pid, out_dir=tmp_path / "out")
    assert "worse than 'tfn' (the baseline here) in the metric's own direction" in format_table(c)
    assert "than 'tfn' (the baseline here)" in c.paths["comparison.md"].read_text()
