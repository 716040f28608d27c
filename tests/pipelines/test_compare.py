"""The comparison stage on a hand-made tracking store: known metrics, known differences, no training."""

import json
import math
import re
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from msa.metrics import METRIC_NAMES, eval_mosi_regression
from pipelines import tracking
from pipelines.run import main
from pipelines.stages.compare import (SYNTHETIC_BANNER, CompareError, RunRecord, compare, find_suite,
                                      counts_of, open_experiment, resampled_metrics, summarise)

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


def _child(client, exp_id, parent_id, ablation, seed, pred, labels, params):
    run = client.create_run(exp_id, run_name=f"{ablation}/seed-{seed}", tags={
        "mlflow.parentRunId": parent_id, "ablation": ablation, "seed": str(seed), "run_key": f"{ablation}-{seed}",
        "synthetic": "true"})
    rid = run.info.run_id
    test = eval_mosi_regression(pred, labels)
    curves = {"val_Corr": test["Corr"], "val_MAE": test["MAE"], "val_loss": 1.0, "train_loss": 1.0}
    history = [Metric(k, v + 0.01 * epoch, 0, epoch) for epoch in (1, 2, 3) for k, v in curves.items()]
    client.log_batch(rid, metrics=history + [Metric(f"test_{k}", v, 0, 0) for k, v in test.items()],
                     params=[Param(k, v) for k, v in ({"model.modalities": ALL, "model.encoder": "lstm", "train.loss":
                                                       "mse", "train.lr": "0.001", "data.dim.text": "300"}
                                                      | params | {"seed": str(seed)}).items()])
    frame = pd.DataFrame({"id": [f"v{i}$_${i}" for i in range(N_TEST)], "label": labels, "prediction": pred,
                          "oracle": labels * 0.9})
    client.log_text(rid, frame.to_csv(index=False), "test_predictions.csv")
    client.set_terminated(rid, "FINISHED")
    return {"ablation": ablation, "seed": seed, "run_key": f"{ablation}-{seed}", "run_id": rid, "status": "FINISHED",
            "test_metrics": test, "error": None}


def build_suite(client, exp_id):
    labels = _labels()
    preds = _predictions(labels)
    parent = client.create_run(exp_id, run_name="ablations test", tags={"suite": "ablations", "synthetic": "true"})
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param("ablations", ",".join(ORDER)), Param("seeds", "1,2,3")],
                     metrics=[Metric(f"oracle_test_{k}", v, 0, 0) for k, v in
                              eval_mosi_regression(labels * 0.9, labels).items()])
    rows = [_child(client, exp_id, pid, a, s, preds[a][s], labels, DESIGN[a][2])
            for a in DESIGN for s in DESIGN[a][0]]
    rows.append({"ablation": "crashed", "seed": 1, "run_key": "c", "run_id": None, "status": "FAILED",
                 "test_metrics": {}, "error": "RuntimeError: boom"})
    client.log_text(pid, json.dumps(rows), "suite.json")
    client.set_terminated(pid, "FINISHED")
    return pid, labels, preds


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store with one finished suite, a newer suite still running (no suite.json), and a comparison of it."""
    tmp = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.chdir(tmp)
        client, exp_id = tracking.setup(EXPERIMENT)
        pid, labels, preds = build_suite(client, exp_id)
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


# ---------------------------------------------------------------------------------------------------


def test_resampled_metrics_match_eval_mosi_regression():
    rng = np.random.default_rng(3)
    t = np.round(rng.uniform(-3, 3, 150) * 5) / 5
    p = np.clip(t + rng.normal(0, 1.2, 150), -3, 3)
    idx = np.vstack([np.arange(150), rng.integers(0, 150, size=(5, 150))])
    got = resampled_metrics(p, t, counts_of(idx, 150))
    assert tuple(got) == METRIC_NAMES
    for b in range(idx.shape[0]):
        want = eval_mosi_regression(p[idx[b]], t[idx[b]])
        np.testing.assert_allclose([got[m][b] for m in METRIC_NAMES], [want[m] for m in METRIC_NAMES], atol=6e-5,
                                   err_msg=f"resample {b}")
    constant = resampled_metrics(np.zeros(150), t, counts_of(idx, 150))
    assert np.isnan(constant["Corr"]).all() and constant["MAE"][0] == pytest.approx(np.abs(t).mean())


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
    assert improved["test"] == "paired, 3 seeds"

    same = table.loc["same"]                                                # identical predictions
    for m in ("Corr", "MAE", "Has0_acc_2", "Mult_acc_7"):
        assert same[f"{m}_ci_low"] <= 0 <= same[f"{m}_ci_high"] and same[f"{m}_mark"] == "~"

    worse = table.loc["vision_only"]
    assert worse["MAE_ci_low"] > 0 and worse["MAE_mark"] == "▼" and worse["Corr_mark"] == "▼"
    assert table.loc["lonely", "test"].startswith("unpaired")
    assert table.loc["text_only", "test"] == "paired on seed 1 only; Δ uses every seed"


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
    with pytest.raises(CompareError, match="has no suite.json yet"):
        find_suite(client, exp_id, made["running"])
    child = made["c"].runs["run_id"].iloc[0]
    with pytest.raises(CompareError, match="is not a suite run"):
        find_suite(client, exp_id, child)


def test_outputs_are_written_and_logged_on_the_parent_run(made):
    c, client = made["c"], made["client"]
    assert set(c.paths) == {"comparison.csv", "comparison.md", "report.html"}
    for path in c.paths.values():
        assert path.parent == made["tmp"] / "reports" / EXPERIMENT and path.stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(made["parent"], "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/report.html"}
    assert client.get_run(made["parent"]).data.tags["comparison"] == "comparison/report.html"

    csv = pd.read_csv(c.paths["comparison.csv"])
    assert list(csv["ablation"]) == [*ORDER, "oracle"]
    for m in METRIC_NAMES:
        for stat in ("mean", "std", "n", "delta", "ci_low", "ci_high", "mark"):
            assert f"{m}_{stat}" in csv.columns

    md = c.paths["comparison.md"].read_text()
    assert SYNTHETIC_BANNER in md and "Test used: paired bootstrap over test samples" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| **baseline** | 3 |")                    # baseline first, n seeds
    assert "Without text (vision_audio)" in md and "Strongest single modality: text (text_only" in md


def test_html_report_is_self_contained(made):
    page = made["c"].paths["report.html"].read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="https?:', page) and "<script" not in page and "<link" not in page
    assert SYNTHETIC_BANNER in page and "Which modalities matter" in page and "Validation curves" in page
    assert "paired bootstrap over test samples" in page


def test_cli_compare_rebuilds_from_the_store_alone(in_store, capsys):
    assert main(["compare", "--experiment", EXPERIMENT]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"*** {SYNTHETIC_BANNER} ***"
    body = [line.split()[0] for line in lines[4:4 + len(ORDER) + 1]]
    assert body == [*ORDER, "oracle"]
    assert re.search(r"^improved\s+3\s+0\.\d{3} ± 0\.\d{3} \+0\.\d{3} ▲", out, re.M)
    assert f"Report: {in_store['tmp'] / 'reports' / EXPERIMENT / 'report.html'}" in out

    _, exp_id = open_experiment(None, suite_run_id=in_store["parent"])      # --suite alone names the experiment
    assert exp_id == in_store["exp_id"]


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
