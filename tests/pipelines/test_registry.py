"""The champion: the ablation with the best mean validation score, never the best test score, registered
with the alias `champion`, kept against a worse suite on the same data, replaced on other data."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import registry, tracking
from pipelines.registry import Candidate, choose

EXPERIMENT = "unit-registry"
N_TEST = 40
# ablation -> seed -> (validation Corr at the kept epoch, test prediction noise sd). text_only is best on
# validation and worst on test; improved is best on test, not on validation.
DESIGN = {
    "baseline": {1: (0.50, 1.0), 2: (0.52, 1.0)},
    "text_only": {1: (0.61, 2.0), 2: (0.57, 2.0)},
    "improved": {1: (0.55, 0.3), 2: (0.40, 0.3)},
}


def _labels():
    return np.round(np.random.default_rng(0).uniform(-3, 3, N_TEST) * 5) / 5


def _suite(recorder, data, design, *, suite="ablations"):
    """A recorded suite whose runs have validation curves (a better value at an epoch they did not keep,
    so only the kept epoch may count), test predictions and models. Returns (parent id, rows)."""
    labels = _labels()
    pid = recorder.parent(list(design), [1, 2], tags={"suite": suite})
    rows = []
    for ablation, seeds in design.items():
        for seed, (val, sd) in seeds.items():
            pred = labels + np.random.default_rng(seed).normal(0, sd, N_TEST)
            row = recorder.child(pid, ablation, seed, labels, pred)
            recorder.validated(row.run_id, "val_Corr", {1: val - 0.1, 2: val, 3: val + 0.3}, best_epoch=2)
            recorder.model(row.run_id, ablation, seed, data)
            rows.append(row)
    recorder.finish(pid, rows)
    return pid, rows


def _crown(client, exp_id, pid, rows, digest, label="suite-a"):
    return registry.crown(client, EXPERIMENT, exp_id, pid, rows, [1, 2], select_key="val_Corr", higher=True,
                          data_digest=digest, synthetic=True, suite_label=label)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, suite_recorder, tiny_data):
    tmp = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.chdir(tmp)
        client, exp_id = tracking.setup(EXPERIMENT)
        recorder = suite_recorder(client, exp_id)
        pid, rows = _suite(recorder, tiny_data, DESIGN)
        champion, line = _crown(client, exp_id, pid, rows, tiny_data.digest)
        yield {"client": client, "exp_id": exp_id, "recorder": recorder, "pid": pid, "rows": rows,
               "champion": champion, "line": line, "data": tiny_data, "uri": tracking.tracking_uri(), "tmp": tmp}


def test_choice_is_by_mean_validation_in_the_metric_direction():
    a = Candidate("a", {1: ("r1", 0.3), 2: ("r2", 0.55)}, higher=True)
    b = Candidate("b", {1: ("r3", 0.45), 2: ("r4", 0.35)}, higher=True)
    assert choose([b, a]).ablation == "a" and a.best_seed == 2
    assert choose([Candidate("mae", {1: ("r", 0.9)}, higher=False),
                   Candidate("mae2", {1: ("r", 0.8)}, higher=False)]).ablation == "mae2"
    assert choose([]) is None


def test_the_best_validation_ablation_is_registered_not_the_best_test_one(registered):
    client, champion = registered["client"], registered["champion"]
    test_corr = {r.ablation: r.test_metrics["Corr"] for r in registered["rows"] if r.seed == 1}
    assert max(test_corr, key=test_corr.get) == "improved"          # the case is built so that test disagrees
    assert champion.ablation == "text_only" and champion.seed == 1 and champion.moved
    assert champion.mean == pytest.approx(0.59) and champion.n == 2  # the kept epoch's values, not the best ones
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert str(version.version) == champion.version == "1"
    assert version.run_id == next(r.run_id for r in registered["rows"] if (r.ablation, r.seed) == ("text_only", 1))
    tags = version.tags
    assert tags["ablation"] == "text_only" and tags["seed"] == "1" and tags["synthetic"] == "true"
    assert tags["data_digest"] == registered["data"].digest and tags["suite_run"] == registered["pid"]
    assert tags["validation_metric"] == "val_Corr" and tags["validation"] == "0.5900 ± 0.0283 (n=2)"
    assert "SYNTHETIC" in version.description and "validation split only" in version.description
    model = client.get_logged_model(registry.logged_model_id(client, client.get_run(version.run_id)))
    assert model.tags["mlflow.modelVersions"] == '[{"name": "unit-registry", "version": "1"}]'  # UI: registered
    assert registered["line"].startswith("champion: models:/unit-registry@champion = version 1, text_only/seed-1")


def test_models_are_named_and_carry_the_config_as_params(registered):
    client = registered["client"]
    models = client.search_logged_models([registered["exp_id"]])
    assert sorted(m.name for m in models) == sorted(f"{a}-seed-{s}" for a in DESIGN for s in (1, 2))
    model = next(m for m in models if m.name == "text_only-seed-1")
    assert model.params["model.hidden"] == "8"
    assert model.tags["ablation"] == "text_only" and model.tags["data_digest"] == registered["data"].digest


def test_rerun_keeps_the_version_a_worse_suite_keeps_the_champion_and_tune_is_considered(registered):
    client, exp_id, recorder, data = (registered[k] for k in ("client", "exp_id", "recorder", "data"))
    again, _ = _crown(client, exp_id, registered["pid"], registered["rows"], data.digest)
    assert again.version == "1" and again.moved                      # the same model is not registered twice

    pid, rows = _suite(recorder, data, {"baseline": DESIGN["baseline"]}, suite="ablations")
    kept, line = _crown(client, exp_id, pid, rows, data.digest, label="suite-b")
    assert not kept.moved and kept.ablation == "text_only" and "champion unchanged" in line
    assert str(client.get_model_version_by_alias(EXPERIMENT, "champion").version) == "1"

    # A tune suite: improved_tuned beside the (here re-recorded) references, better on validation.
    tuned = {"baseline": DESIGN["baseline"], "improved": DESIGN["improved"],
             "improved_tuned": {1: (0.66, 1.5), 2: (0.70, 1.5)}}
    pid, rows = _suite(recorder, data, tuned, suite="tune")
    champion, _ = _crown(client, exp_id, pid, rows, data.digest, label="tune-a")
    assert champion.moved and champion.ablation == "improved_tuned" and champion.seed == 2
    assert str(client.get_model_version_by_alias(EXPERIMENT, "champion").version) == champion.version == "2"


def test_other_data_takes_the_title_and_incomplete_ablations_are_left_out(registered, suite_recorder):
    client, exp_id, recorder, data = (registered[k] for k in ("client", "exp_id", "recorder", "data"))
    pid, rows = _suite(recorder, data, {"baseline": DESIGN["baseline"], "text_only": DESIGN["text_only"]})
    rows = [r for r in rows if (r.ablation, r.seed) != ("text_only", 2)] + [suite_recorder.failed("text_only", 2)]
    before = client.get_model_version_by_alias(EXPERIMENT, "champion").version
    champion, line = _crown(client, exp_id, pid, rows, "other-digest", label="suite-c")
    assert champion.moved and champion.ablation == "baseline"
    assert line.startswith("champion: ") and f"; it was version {before})" in line   # the one it displaced
    assert "text_only left out: not every seed finished" in line
    version = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert version.tags["data_digest"] == "other-digest"


def test_back_on_the_first_data_a_worse_suite_gives_the_title_to_that_datas_best(registered):
    """After another data set's suite took the alias, a worse suite on the first data does not take it:
    the alias goes back to the best version ever registered on that data."""
    client, exp_id, recorder, data = (registered[k] for k in ("client", "exp_id", "recorder", "data"))
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").tags["data_digest"] == "other-digest"
    pid, rows = _suite(recorder, data, {"baseline": DESIGN["baseline"]})
    champion, line = _crown(client, exp_id, pid, rows, data.digest, label="suite-d")
    assert champion.moved and (champion.ablation, champion.version) == ("improved_tuned", "2")
    assert champion.mean == pytest.approx(0.68)
    assert str(client.get_model_version_by_alias(EXPERIMENT, "champion").version) == "2"
    assert "version 2, improved_tuned/seed-2" in line
    kept, line = _crown(client, exp_id, pid, rows, data.digest, label="suite-d")   # and then stays there
    assert not kept.moved and kept.version == "2" and "champion unchanged" in line


def test_a_version_chosen_again_on_fewer_seeds_keeps_its_evidence(store, suite_recorder, tiny_data):
    """`ablations --seeds 1` after the full suite: every run cached, the same model chosen, on one seed
    whose mean is higher. The version's tags and description must still say what they said."""
    client, exp_id = tracking.setup(EXPERIMENT)
    pid, rows = _suite(suite_recorder(client, exp_id), tiny_data, DESIGN)
    first, _ = _crown(client, exp_id, pid, rows, tiny_data.digest)
    before = client.get_model_version(EXPERIMENT, first.version)
    one_seed = [r for r in rows if r.seed == 1]
    again, line = registry.crown(client, EXPERIMENT, exp_id, pid, one_seed, [1], select_key="val_Corr", higher=True,
                                 data_digest=tiny_data.digest, synthetic=True, suite_label="suite-b")
    after = client.get_model_version(EXPERIMENT, first.version)
    assert again.version == first.version and (again.mean, again.n) == (first.mean, 2)
    assert after.tags == before.tags and after.description == before.description
    assert line.endswith("(validation val_Corr 0.5900 ± 0.0283 over 2 seeds)")
    # On as many seeds, the newer evidence replaces it, tags and description together.
    registry.crown(client, EXPERIMENT, exp_id, pid, rows, [1, 2], select_key="val_Corr", higher=True,
                   data_digest=tiny_data.digest, synthetic=True, suite_label="suite-c")
    latest = client.get_model_version(EXPERIMENT, first.version)
    assert latest.tags["suite"] == "suite-c" and "suite `suite-c`" in latest.description


def test_of_two_suites_crowning_at_once_the_better_keeps_the_title(store, suite_recorder, tiny_data, monkeypatch):
    """B read the registry before A's version was in it (a stale read), so both checks passed and B,
    the worse, set the alias last: B reads again after writing and hands the title back."""
    client, exp_id = tracking.setup(EXPERIMENT)
    recorder = suite_recorder(client, exp_id)
    pid_a, rows_a = _suite(recorder, tiny_data, DESIGN)                                 # text_only, 0.59
    worse = {"baseline": DESIGN["baseline"]}                                           # 0.51
    pid_b, rows_b = _suite(recorder, tiny_data, worse)
    a, _ = _crown(client, exp_id, pid_a, rows_a, tiny_data.digest)
    best_on, reads = registry._best_on, []

    def stale_first(*args, **kwargs):
        reads.append(1)
        return (None, None) if len(reads) == 1 else best_on(*args, **kwargs)

    monkeypatch.setattr(registry, "_best_on", stale_first)
    b, line = _crown(client, exp_id, pid_b, rows_b, tiny_data.digest, label="suite-b")
    assert str(client.get_model_version_by_alias(EXPERIMENT, "champion").version) == a.version
    assert b.version == a.version and "champion unchanged" in line


def test_no_validation_scores_no_champion(store, suite_recorder):
    client, exp_id = tracking.setup("no-val")
    recorder = suite_recorder(client, exp_id)
    labels = _labels()
    pid = recorder.parent(["baseline"], [1])
    rows = [recorder.child(pid, "baseline", 1, labels, labels)]
    champion, line = registry.crown(client, "no-val", exp_id, pid, rows, [1], select_key="val_Corr", higher=True,
                                    data_digest="d", synthetic=False, suite_label="s")
    assert champion is None and line.startswith("no champion: no ablation has a validation val_Corr")
    assert not MlflowClient(store).search_registered_models()


def test_the_champion_line_shows_a_spread_only_over_several_seeds():
    one = registry.Champion("m", "1", "baseline", 7, "r", "val_Corr", 0.5123, 0.0, 1, True)
    three = registry.Champion("m", "2", "baseline", 7, "r", "val_Corr", 0.5123, 0.0101, 3, False)
    assert one.line().endswith("(validation val_Corr 0.5123 on 1 seed)")
    assert three.line().endswith("(validation val_Corr 0.5123 ± 0.0101 over 3 seeds)")
    assert three.line().startswith("champion unchanged")
