"""The tune pipeline: trials searched on validation only, pruned, resumable, shared, tracked, and compared."""

import contextlib
import importlib
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from msa.training import device_name
from pipelines import tune
from pipelines.devices import resolve_here
from pipelines.errors import StoreError
from pipelines.run import main
from pipelines.spec import SpecError, load_spec
from pipelines.tuning import confirm
from pipelines.tuning.handover import save_best
from pipelines.tuning.storage import trial_id

# Tiny models (hidden 8-16) on the quick data, one epoch: every trial takes a second or two.
ABLATIONS = """\
experiment: tune-unit
seeds: [7, 8]
base:
  model: {hidden: 16, ff_dim: 32}
ablations:
  baseline: {}
  improved:
    model: {encoder: transformer, pooling: mean, mask_padding: true, fusion: query_attention, heads: 2}
    train: {loss: huber}
quick: {epochs: 1, seeds: [7]}
"""

SPACE = """\
space:
  model.hidden:      {choices: [8, 16]}
  model.heads:       {choices: [2, 4]}
  model.dropout:     {float: [0.0, 0.3]}
  train.loss:        {choices: [huber, mse]}
  train.huber_delta: {float: [0.5, 2.0], log: true, when: {train.loss: huber}}
  train.lr:          {float: [1.0e-3, 1.0e-2], log: true}
"""


def _tune_spec(tmp: Path, pruner: str = "{type: median}", space: str = SPACE, name: str = "tune.yaml",
               grace: int = 180, extra: str = "") -> Path:
    (tmp / "ablations.yaml").write_text(ABLATIONS)
    path = tmp / name
    path.write_text(f"study: unit\nablations: ablations.yaml\nbase: improved\nseeds: [7]\ntrials: 3\n"
                    f"sampler: {{seed: 1, n_startup_trials: 10}}\npruner: {pruner}\n"
                    f"storage: {{heartbeat_interval: 1, grace_period: {grace}, max_retry: 1}}\n"
                    f"compare_with: [baseline, improved]\nquick: {{trials: 2}}\n{extra}{space}")
    return path


def _tune_runs(client, experiment="tune-unit"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "tune_study" in r.data.tags]
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    return parents, trials, runs


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`tune --quick` twice on one study: 2 trials, then on to 3."""
    tmp = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MSA_CACHE", str(tmp / "cache"))
        mp.setenv("MSA_PROGRESS", "0")
        mp.chdir(tmp)
        spec = _tune_spec(tmp)
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):   # one stream, as a terminal's
            first = main(["tune", "--spec", str(spec), "--quick", "--trials", "2"])
        second = main(["tune", "--spec", str(spec), "--quick", "--trials", "3"])
        yield {"client": MlflowClient(uri), "rcs": (first, second), "tmp": tmp, "spec": spec,
               "storage": tmp / "mlruns" / "optuna" / "journal.log", "first_said": said.getvalue()}


def _study(tuned):
    return optuna.load_study(study_name="unit-quick", storage=tune.open_storage(str(tuned["storage"])))


# The CPU's model, or the GPU's name where trials train on one (--device auto)
DEVICE_NAME = device_name(torch.device(resolve_here("auto")))


def test_the_choice_is_said_before_the_suite_trains_it(tuned):
    said = tuned["first_said"]
    assert said.index("chosen: trial ") < said.index("including 'improved_tuned'") < said.index("Test metrics")


def test_trials_are_nested_under_one_parent_per_session_and_tagged(tuned):
    assert tuned["rcs"] == (0, 0)
    parents, trials, _ = _tune_runs(tuned["client"])
    assert len(parents) == 2 and len(trials) == 3
    for p in parents:
        assert p.data.tags["tune_study"] == "unit-quick" and p.data.tags["synthetic"] == "true"
        assert "suite" not in p.data.tags              # the comparison must not take a session for a suite
        assert p.info.status == "FINISHED"
        assert "best_val_Corr" in p.data.metrics and "best.model.hidden" in p.data.params
        artifacts = {a.path for a in tuned["client"].list_artifacts(p.info.run_id)}
        assert {"optimization_history.png", "param_importances.png", "trials.csv",
                "unit-quick.best.yaml"} <= artifacts
    parent_ids = {p.info.run_id for p in parents}
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] in parent_ids
        assert t.info.run_name == f"trial-{t.data.tags['optuna_trial']}"
        assert t.data.tags["optuna_state"] == "COMPLETE" and t.data.tags["optuna_study"] == "unit-quick"
        assert "ablation" not in t.data.tags           # trials are not suite runs
        assert t.data.tags["device_name"] == DEVICE_NAME and int(t.data.tags["torch_threads"]) >= 1
        assert t.data.params["model.hidden"] in ("8", "16") and t.data.params["train.epochs"] == "1"
        for key in ("val_Corr", "val_MAE", "val_loss", "train_loss"):
            assert [m.step for m in tuned["client"].get_metric_history(t.info.run_id, key)] == [1], key
        assert not any(k.startswith("test_") for k in t.data.metrics)


def test_rerun_continues_the_study_without_redoing_trials(tuned):
    study = _study(tuned)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    parents, trials, _ = _tune_runs(tuned["client"])
    first, second = sorted(parents, key=lambda r: r.info.start_time)
    by_parent = {p.info.run_id: sorted(int(t.data.tags["optuna_trial"]) for t in trials
                                       if t.data.tags["mlflow.parentRunId"] == p.info.run_id) for p in parents}
    assert by_parent[first.info.run_id] == [0, 1] and by_parent[second.info.run_id] == [2]
    # The resumed session draws fresh values instead of replaying the first session's start-up draws.
    assert study.trials[2].params != study.trials[0].params


def test_a_study_is_not_continued_with_other_epochs(tuned, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tuned['tmp'] / 'mlruns' / 'mlflow.db'}")
    monkeypatch.setenv("MSA_CACHE", str(tuned["tmp"] / "cache"))
    monkeypatch.chdir(tuned["tmp"])
    assert main(["tune", "--spec", str(tuned["spec"]), "--quick", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "study 'unit-quick'" in err and "epochs 1" in err and "--study NAME" in err
    assert len(_study(tuned).trials) == 3


def test_best_trial_becomes_improved_tuned_trained_and_compared(tuned, monkeypatch):
    client = tuned["client"]
    study = _study(tuned)
    best = study.best_trial
    saved = yaml.safe_load((tuned["storage"].parent / "unit-quick.best.yaml").read_text())
    assert saved == {"improved_tuned": best.user_attrs["override"]}
    assert saved == {"improved_tuned": study.user_attrs[tune.TUNED]["override"]}
    assert saved["improved_tuned"]["model"]["fusion"] == "query_attention"      # the improved base, kept
    monkeypatch.chdir(tuned["tmp"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tuned['tmp'] / 'mlruns' / 'mlflow.db'}")
    assert tune.tuned_override(quick=True, spec=tuned["spec"]) == saved["improved_tuned"]
    assert tune.tuned_override(quick=True, spec=tuned["spec"], data_digest="other data") is None
    assert tune.tuned_override(study="no-such-study", spec=tuned["spec"]) is None

    _, _, runs = _tune_runs(client)
    tuned_runs = [r for r in runs if r.data.tags.get("ablation") == "improved_tuned"]
    assert tuned_runs and {r.info.status for r in tuned_runs} == {"FINISHED"}
    latest = max(tuned_runs, key=lambda r: r.info.start_time)
    assert "test_Corr" in latest.data.metrics and latest.data.params["train.epochs"] == "1"
    assert latest.data.params["model.hidden"] == str(best.params["model.hidden"])
    suites = sorted((r for r in runs if r.data.tags.get("suite") == "tune"), key=lambda r: r.info.start_time)
    # One suite per tuned config: a session that found no better trial resumes the previous suite run.
    assert len(suites) == len({r.data.tags["config_hash"] for r in tuned_runs}) in (1, 2)
    rows = json.loads(Path(client.download_artifacts(suites[-1].info.run_id, "suite.json")).read_text())
    assert {r["ablation"] for r in rows} == {"baseline", "improved", "improved_tuned"}
    assert {r["status"] for r in rows if r["ablation"] != "improved_tuned"} == {"CACHED"}   # never trained twice
    assert suites[-1].data.tags.get("comparison") == "comparison/report.html"
    assert suites[-1].data.tags["champion"].startswith("models:/tune-unit@champion")   # improved_tuned competed
    folder = tuned["tmp"] / "reports" / "tune-unit" / suites[-1].data.tags["suite_label"]
    table = (folder / "comparison.csv").read_text()
    assert "improved_tuned" in table and "improved" in table


def test_a_bad_trial_is_pruned(tmp_path, store):
    # Corr never reaches 1.5, so this pruner must stop every trial at its first report.
    spec = tune.load_tune_spec(_tune_spec(tmp_path, pruner="{type: threshold, lower: 1.5}"))
    session = tune.run_study(spec, quick=True, trials=2)
    assert [t.state for t in session.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(t.intermediate_values == {1: t.intermediate_values[1]} for t in session.trials)
    assert session.best is None and session.override is None
    _, trials, _ = _tune_runs(MlflowClient(store))
    assert sorted(r.data.tags["optuna_state"] for r in trials) == ["PRUNED", "PRUNED"]
    assert {r.info.status for r in trials} == {"FINISHED"}


class _Sealed(dict):
    """Feature tensors that refuse to be read."""

    def __getitem__(self, key):
        raise AssertionError("the search read the test split")

    def values(self):
        raise AssertionError("the search read the test split")

    items = values


def test_the_search_never_reads_the_test_split(tmp_path, store):
    import dataclasses

    from pipelines.stages.prepare import prepare

    real = prepare("synthetic", quick=True)
    real.digest  # noqa: B018  (computed while test is still readable)
    test = real["test"]
    sealed = dataclasses.replace(test, features=_Sealed(test.features))
    data = dataclasses.replace(real, splits={**real.splits, "test": sealed})
    spec = tune.load_tune_spec(_tune_spec(tmp_path))
    session = tune.run_study(spec, quick=True, trials=2, data=data)
    # Any read of the test features (a view that kept the split, or fit's own test evaluation) fails the trial.
    assert [t.state for t in session.trials] == [TrialState.COMPLETE] * 2


def test_two_processes_share_one_journal_study(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path))
    session = tune.run_study(spec, quick=True, trials=4, workers=2)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4   # no duplicated draws
    _, trials, _ = _tune_runs(MlflowClient(store))
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {session.parent_run_id}


SERVERS = {"postgresql": ("postgresql://postgres@127.0.0.1:5432/{}", " WITH (FORCE)"),
           "mysql": ("mysql+pymysql://root@127.0.0.1:3306/{}", "")}


@pytest.fixture(params=["journal", "sqlite", "postgresql", "mysql"])
def race_storage(request, tmp_path, database_admin):
    """A fresh study storage of each kind a session may share between workers (a database of its own
    on the local server, dropped afterwards)."""
    if request.param == "journal":
        yield str(tmp_path / "journal.log")
        return
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'optuna.db'}"
        return
    admin, (url, force) = database_admin(request.param), SERVERS[request.param]
    name = f"msa_race_{os.getpid()}"
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield url.format(name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.close()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_workers_finishing_together_never_start_more_trials_than_the_target(tmp_path, monkeypatch, race_storage):
    from types import SimpleNamespace

    from pipelines.spec import resolve_spec
    from pipelines.tuning import session
    from pipelines.tuning.objective import TrialSetup

    spec = tune.load_tune_spec(_tune_spec(tmp_path))
    setup = TrialSetup.from_specs(spec, resolve_spec(spec.ablations, only=None, seeds=None, epochs=None, quick=True))
    optuna.create_study(study_name="race", storage=tune.open_storage(race_storage, spec.storage))
    # Trials 0 and 1 end together; then each worker counts 2 of 3 and asks for a trial, and creating one
    # takes a while: without the claim lock both would start one, and the study would hold 4.
    together = threading.Barrier(2)

    def objective(trial, *args, **kwargs):
        if trial.number < 2:
            together.wait(timeout=30)
        return 0.5

    ask = optuna.Study.ask

    def slow_ask(study, *args, **kwargs):
        time.sleep(0.5)
        return ask(study, *args, **kwargs)

    monkeypatch.setattr(session, "objective", objective)
    monkeypatch.setattr(optuna.Study, "ask", slow_ask)
    data = SimpleNamespace(digest="d", source="s")
    jobs = [session.WorkerJob(race_storage, spec.storage, "race", 3, None, w, spec, setup, None, None)
            for w in range(2)]
    workers = [threading.Thread(target=session.optimize, args=(job, data, 1, print)) for job in jobs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    study = optuna.load_study(study_name="race", storage=tune.open_storage(race_storage))
    assert [(t.number, t.state) for t in study.trials] == [(n, TrialState.COMPLETE) for n in range(3)]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_worker_died_is_failed_and_retried(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, grace=1))
    # A "worker" starts trial 0, stamps one heartbeat, and dies (its storage object is dropped).
    dead = optuna.create_study(study_name="unit-quick", direction="maximize",
                               storage=tune.open_storage(None, spec.storage))
    trial = dead.ask()
    tune.sample(trial, spec.space)
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("elsewhere"), run_name="trial-0")
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    dead._storage.record_heartbeat(trial_id(trial))
    time.sleep(1.5)
    session = tune.run_study(spec, quick=True, trials=2)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = study.trials[1]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == study.trials[0].params
    assert [t.number for t in session.trials] == [1]
    dead_run = client.get_run(run.info.run_id)           # the dead worker's run is not left RUNNING either
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["optuna_state"] == "FAIL"
    assert "worker died" in dead_run.data.tags["error"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_worker_process_ended_here_is_retried_at_once(tmp_path, store):
    """SIGKILL or out of memory on this machine: no wait for the heartbeat grace (180 s here)."""
    import subprocess
    import sys

    from pipelines import claims

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = claims.process_identity(ended.pid)
    ended.wait()
    if not identity:
        pytest.skip("no /proc here: a trial's process cannot be looked up, only its heartbeat tells")
    spec = tune.load_tune_spec(_tune_spec(tmp_path, grace=180))
    dead = optuna.create_study(study_name="unit-quick", direction="maximize",
                               storage=tune.open_storage(None, spec.storage))
    trial = dead.ask()
    tune.sample(trial, spec.space)
    trial.set_user_attr("worker", f"here:{ended.pid}")
    trial.set_user_attr(claims.CLAIM_PROCESS, identity)
    dead._storage.record_heartbeat(trial_id(trial))                     # it beat just now, then was killed
    tune.run_study(spec, quick=True, trials=2)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].system_attrs["failed_trial"] == 0


def test_a_session_counts_the_trials_it_ran_and_says_when_its_timeout_stopped_it(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [improved, baseline]\n"))
    first = tune.run_study(spec, quick=True, trials=4, timeout=0.01)      # one trial starts, then time is up
    assert [t.number for t in first.trials] == [0]                        # not the start point left queued
    assert "--timeout 0.01 s reached: the study holds 1 of 4 finished trials" in tune.summary(first)
    second = tune.run_study(spec, quick=True, trials=3)
    assert [t.number for t in second.trials] == [1, 2]                    # the queued start point, then one more
    assert "2 trial(s) this session" in tune.summary(second) and "--timeout" not in tune.summary(second)


def test_the_best_yaml_goes_beside_the_studys_own_journal(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path))
    journal = tmp_path / "elsewhere" / "study.log"
    session = tune.run_study(spec, quick=True, trials=1, storage=str(journal))
    assert session.best_path == journal.parent / "unit-quick.best.yaml" and session.best_path.is_file()
    assert not (tmp_path / "mlruns" / "optuna" / "unit-quick.best.yaml").exists()


def test_a_study_starts_from_the_named_ablations_once(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [improved, baseline]\n"))
    improved, baseline = dict(spec.start_from)["improved"], dict(spec.start_from)["baseline"]
    assert improved == {"model.hidden": 16, "model.heads": 2, "model.dropout": 0.1, "train.loss": "huber",
                        "train.huber_delta": 1.0, "train.lr": 1.0e-3}
    assert baseline["train.loss"] == "mse" and "train.huber_delta" not in baseline   # `when` is honoured
    said = io.StringIO()
    tune.run_study(spec, quick=True, trials=1, stream=said)   # one trial asked for: one trial run
    assert "note: start_from 'baseline' not queued: 1 trial(s) leave no room for it" in said.getvalue()
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.user_attrs.get("start_from") for t in study.trials] == ["improved"]
    tune.run_study(spec, quick=True, trials=3)          # the rest now, and the queued one never again
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.user_attrs.get("start_from") for t in study.trials] == ["improved", "baseline", None]
    assert study.trials[0].params == improved and study.trials[1].params == baseline
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    _, runs, _ = _tune_runs(MlflowClient(store))
    assert sorted(r.data.tags.get("start_from", "-") for r in runs) == ["-", "baseline", "improved"]


def test_start_points_are_never_pruned(tmp_path, store):
    # Corr never reaches 1.5, so this pruner stops every other trial at its first report.
    spec = tune.load_tune_spec(_tune_spec(tmp_path, pruner="{type: threshold, lower: 1.5}",
                                          extra="start_from: [baseline]\n"))
    session = tune.run_study(spec, quick=True, trials=2)
    assert [t.state for t in session.trials] == [TrialState.COMPLETE, TrialState.PRUNED]


def test_a_start_point_the_space_cannot_hold_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"start_from 'baseline': its train.loss is 'mse', which is not among"):
        tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [baseline]\n",
                                       space=SPACE.replace("[huber, mse]", "[huber]")))
    with pytest.raises(SpecError, match=r"'start_from' must list ablations"):
        tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [baseline, nope]\n"))
    clipped = tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [baseline]\n",
                                             space=SPACE.replace("[1.0e-3, 1.0e-2]", "[2.0e-3, 1.0e-2]")))
    assert dict(clipped.start_from)["baseline"]["train.lr"] == 2.0e-3   # 1e-3 clipped into the range


def test_a_start_point_with_a_field_left_off_is_refused_in_words(tmp_path):
    space = SPACE + "  train.grad_clip:   {float: [0.5, 5.0]}\n"        # off (null) in every ablation
    with pytest.raises(SpecError, match=r"start_from 'baseline': its train.grad_clip is null \(off\), which the "
                                        r"range \[0.5, 5.0\] cannot express"):
        tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [baseline]\n", space=space))
    with_off = tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [baseline]\n",
                                              space=SPACE + "  train.grad_clip:   {choices: [null, 1.0]}\n"))
    assert dict(with_off.start_from)["baseline"]["train.grad_clip"] is None


@pytest.mark.parametrize("sampler, words", [
    ("{seed: null}", "'sampler.seed' must be an integer in [0, 2**32), got None"),
    ("{seed: abc}", "'sampler.seed' must be an integer in [0, 2**32), got 'abc'"),
    ("{seed: 1, n_startup_trials: '10'}", "'sampler.n_startup_trials' must be an integer, got '10'"),
    ("{seed: 1, multivariate: 1}", "'sampler.multivariate' must be true or false, got 1"),
    ("{seed: 1, prior_weight: x}", "'sampler.prior_weight' must be a number, got 'x'"),
    ("0", "'sampler' must be a mapping"),
    ("{seed: 1, multivariate: null, group: true}", None),      # null where the sampler takes None
])
def test_sampler_arguments_of_the_wrong_type_are_refused_at_load(tmp_path, sampler, words):
    path = _tune_spec(tmp_path)
    path.write_text(path.read_text().replace("sampler: {seed: 1, n_startup_trials: 10}", f"sampler: {sampler}"))
    if words is None:
        assert tune.load_tune_spec(path).sampler == yaml.safe_load(sampler)
        return
    with pytest.raises(SpecError, match=re.escape(words)):
        tune.load_tune_spec(path)


def test_a_journal_with_a_line_that_is_not_optunas_is_one_line(tmp_path):
    journal = tmp_path / "journal.log"
    optuna.create_study(study_name="s", storage=tune.open_storage(str(journal))).set_user_attr("a", 1)
    first, second = journal.read_text().splitlines(keepends=True)
    journal.write_text(first + '{"op_code": 2, "worker_id": \n' + second)   # a torn line, then more
    with pytest.raises(StoreError, match=rf"study storage {re.escape(str(journal))}: a line in it is not Optuna's"):
        tune.open_storage(str(journal))


def test_spec_mistakes_name_the_key(tmp_path):
    bad_heads = SPACE.replace("model.heads:       {choices: [2, 4]}", "model.heads:       {choices: [2, 3]}")
    with pytest.raises(SpecError, match=r"'model.heads' can be 3: The 'hidden' parameter of ModelConfig must be "
                                        r"divisible by 'heads' \(3\)"):
        tune.load_tune_spec(_tune_spec(tmp_path, space=bad_heads))
    # hidden 12 and heads 8 are each fine against the base (hidden 16, heads 2); together they are not
    bad_pair = SPACE.replace("[8, 16]", "[12, 16]").replace("[2, 4]", "[2, 8]")
    with pytest.raises(SpecError, match=r"'model.hidden' 12 with 'model.heads' 8 makes an invalid config"):
        tune.load_tune_spec(_tune_spec(tmp_path, space=bad_pair))
    with pytest.raises(SpecError, match=r"space: 'model.hiden': not a config field"):
        tune.load_tune_spec(_tune_spec(tmp_path, space=SPACE.replace("model.hidden", "model.hiden")))
    with pytest.raises(SpecError, match=r"write 1.0e-4, not 1e-4"):
        tune.load_tune_spec(_tune_spec(tmp_path, space=SPACE.replace("1.0e-3", "1e-3")))
    with pytest.raises(SpecError, match=r"'model.dropout' can be 1.5: The 'dropout' parameter of ModelConfig"):
        tune.load_tune_spec(_tune_spec(tmp_path, space=SPACE.replace("[0.0, 0.3]", "[0.0, 1.5]")))
    with pytest.raises(SpecError, match=r"pruner"):
        tune.load_tune_spec(_tune_spec(tmp_path, pruner="{type: median, n_warmup: 3}"))
    assert tune.load_tune_spec().direction == "maximize"       # the shipped spec loads


def test_ablations_include_improved_tuned_once_a_study_has_a_best_trial(tuned, monkeypatch, capsys):
    client = tuned["client"]
    monkeypatch.chdir(tuned["tmp"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tuned['tmp'] / 'mlruns' / 'mlflow.db'}")
    # The study that joins is the one of the tune spec beside the ablations spec, built on it.
    ablations = str(tuned["tmp"] / "ablations.yaml")
    assert tune.tune_spec_for(ablations) == tuned["spec"]
    assert main(["ablations", "--spec", ablations, "--quick", "--workers", "1"]) == 0
    _, _, runs = _tune_runs(client)
    suite = max((r for r in runs if r.data.tags.get("suite") == "ablations"), key=lambda r: r.info.start_time)
    rows = json.loads(Path(client.download_artifacts(suite.info.run_id, "suite.json")).read_text())
    assert {r["ablation"]: r["status"] for r in rows} == {
        "baseline": "CACHED", "improved": "CACHED", "improved_tuned": "CACHED"}   # all trained by `tune`

    assert main(["ablations", "--spec", ablations, "--quick", "--workers", "1", "--only", "improved_tuned"]) == 0
    other = tuned["tmp"] / "other"
    other.mkdir()
    (other / "ablations.yaml").write_text(ABLATIONS)
    (other / "tune.yaml").write_text(tuned["spec"].read_text().replace("study: unit", "study: never-run"))
    assert main(["ablations", "--spec", str(other / "ablations.yaml"), "--quick", "--only", "improved_tuned"]) == 2
    assert "no tuning study has a best trial on this data yet" in capsys.readouterr().err
    # Named beside others, it is not dropped in silence either: nothing trains, the line says why.
    assert main(["ablations", "--spec", str(other / "ablations.yaml"), "--quick", "--only", "baseline",
                 "improved_tuned"]) == 2
    assert "improved_tuned: no tuning study has a best trial on this data yet" in capsys.readouterr().err


def test_a_study_searched_on_another_base_does_not_join_a_suite(tuned, monkeypatch, capsys):
    """A spec with no tune.yaml beside it is joined by the default study; its override resolved on this
    spec's own base would be a config no trial trained: left out, in words."""
    monkeypatch.chdir(tuned["tmp"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tuned['tmp'] / 'mlruns' / 'mlflow.db'}")
    # The default study, on this data: searched on pipelines/specs/ablations.yaml (the lab's base).
    default = optuna.create_study(study_name="improved-quick", direction="maximize",
                                  storage=tune.open_storage(str(tuned["storage"])))
    default.set_user_attr("data_digest", _study(tuned).user_attrs["data_digest"])
    default.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"override": {"model": {"hidden": 64}}}))
    shifted = tuned["tmp"] / "shifted"
    shifted.mkdir()
    (shifted / "ablations.yaml").write_text(ABLATIONS)                # base: hidden 16, not the lab's
    argv = ["ablations", "--spec", str(shifted / "ablations.yaml"), "--quick", "--workers", "1"]
    assert main([*argv, "--only", "improved_tuned"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: improved_tuned left out: study 'improved' searched on the base of ")
    assert "so its config would be another here" in err and err.count("\n") == 1
    assert main(argv) == 0                                            # the spec's own runs, told why not it
    assert "note: improved_tuned left out: study 'improved'" in capsys.readouterr().err
    client = tuned["client"]
    suite = max((r for r in _tune_runs(client)[2] if r.data.tags.get("suite") == "ablations"),
                key=lambda r: r.info.start_time)
    assert suite.data.params["ablations"] == "baseline,improved"
    assert tune.tuned_elsewhere(tune.DEFAULT_TUNE_SPEC, load_spec()) is None   # the shipped pair agrees
    assert tune.tuned_elsewhere(tuned["spec"], load_spec(tuned["tmp"] / "ablations.yaml")) is None


def test_confirm_mistakes_name_the_key(tmp_path):
    for written, message in [("{top: -1, seeds: [8]}", r"'confirm.top' must be an integer >= 0"),
                             ("{top: 2}", r"'confirm' needs 'seeds'"),
                             ("{top: 2, seeds: [7, 8]}", r"'confirm.seeds' must be other seeds than the search's"),
                             ("{top: 2, seeds: []}", r"'confirm.seeds' must be a non-empty list"),
                             ("{top: 2, seed: [8]}", r"'confirm'.*seed"),
                             ("[2]", r"'confirm' must be a mapping")]:
        with pytest.raises(SpecError, match=message):
            tune.load_tune_spec(_tune_spec(tmp_path, extra=f"confirm: {written}\n"))
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {seeds: [8, 9]}\n"))
    assert spec.confirm.top == 3 and spec.choice_seeds == (7, 8, 9)
    off = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 0}\n"))
    assert off.confirm.top == 0 and off.choice_seeds == (7,)


def _trial(value, override, seed_values):
    return optuna.trial.create_trial(value=value, params={}, distributions={},
                                     user_attrs={"override": override, "seed_values": seed_values})


def test_the_best_validation_mean_wins_not_the_luckiest_seed(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 2, seeds: [8, 9]}\n"))
    study = optuna.create_study(study_name="choose", direction="maximize", storage=tune.open_storage(None))
    for value, name in [(0.70, "lucky"), (0.65, "steady"), (0.60, "third")]:
        study.add_trial(_trial(value, {"model": {"name": name}}, {"7": value}))
    first = tune.choose(study, spec)                             # nothing re-trained yet: the best search value
    assert first.trial.number == 0 and first.candidates == 0 and first.seed_values == {7: 0.70}
    for trial, seed, value in [(1, 8, 0.66), (1, 9, 0.64), (0, 8, 0.50), (0, 9, 0.52), (2, 8, 0.99), (2, 9, 0.99)]:
        study.set_user_attr(f"confirm:{trial}:{seed}", {"value": value, "mlflow_run_id": None})
        if (trial, seed) == (1, 9):                              # a trial missing a seed is no candidate yet
            assert tune.choose(study, spec).trial.number == 1 and tune.choose(study, spec).candidates == 1
    choice, path = save_best(study, spec, None)
    assert choice.trial.number == 1 and choice.candidates == 2   # trial 2 is not in the top 2, whatever its seeds
    record = study.user_attrs[tune.TUNED]
    assert record["trial"] == 1 and record["n_seeds"] == 3 and record["seeds"] == [7, 8, 9]
    assert record["mean"] == pytest.approx(0.65) and record["std"] == pytest.approx(0.01)
    assert record["value"] == 0.65 and record["override"] == {"model": {"name": "steady"}}
    assert yaml.safe_load(path.read_text()) == {"improved_tuned": {"model": {"name": "steady"}}}
    assert "trial 1: validation Corr 0.6500 ± 0.0100 over 3 seed(s)" in path.read_text()


def test_a_pair_another_session_is_retraining_is_waited_for_not_trained_twice(tmp_path, store):
    """Two `tune` sessions on one study reach the same top trial: the second waits for the first's
    re-training of (trial 0, seed 8) and takes its value."""
    from pipelines import claims, tracking
    from pipelines.spec import resolve_spec
    from pipelines.tuning.objective import TrialSetup, trial_config

    searched = tune.load_tune_spec(_tune_spec(tmp_path, name="search.yaml", extra="confirm: {top: 0}\n"))
    tune.run_study(searched, quick=True, trials=1)                   # trial 0, not re-trained yet
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 1, seeds: [8]}\n"))
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    setup = TrialSetup.from_specs(spec, resolve_spec(spec.ablations, only=None, seeds=None, epochs=None, quick=True))
    config = trial_config(setup, study.trials[0].user_attrs["override"])
    digest = study.user_attrs["data_digest"]
    client, exp_id = tracking.setup("tune-unit")
    # A FINISHED re-training of a trial 0 of a study of this name on other data (its journal since
    # removed): another pair, never taken for this one.
    stale = client.create_run(exp_id, run_name="confirm-0-seed-8", tags={
        "run_key": confirm.pair_key("unit-quick", 0, 8, None, config, "0123456789abcdef"), "confirm_trial": "0"})
    client.log_metric(stale.info.run_id, "objective", 0.999)
    client.set_terminated(stale.info.run_id, "FINISHED")
    other = client.create_run(exp_id, run_name="confirm-0-seed-8", tags={
        "run_key": confirm.pair_key("unit-quick", 0, 8, None, config, digest), "confirm_trial": "0",
        "confirm_seed": "8", **claims.claim_tags()})
    other_id = other.info.run_id

    def the_other_session_finishes():
        time.sleep(3)
        client.log_metric(other_id, "objective", 0.4242)
        client.set_terminated(other_id, "FINISHED")

    finisher = threading.Thread(target=the_other_session_finishes)
    finisher.start()
    said = io.StringIO()
    session = tune.run_study(spec, quick=True, trials=1, stream=said)
    finisher.join()
    assert "confirm    0  seed 8          running elsewhere: claimed by" in said.getvalue(), said.getvalue()
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert study.user_attrs["confirm:0:8"] == {"value": 0.4242, "mlflow_run_id": other_id}
    assert session.choice.seed_values[8] == pytest.approx(0.4242)
    _, _, runs = _tune_runs(MlflowClient(store))
    assert [r.info.run_id for r in runs if r.data.tags.get("confirm_trial") == "0"
            and r.info.run_id != stale.info.run_id] == [other_id]                                   # no second


def test_a_study_with_fewer_trials_than_the_top_says_how_many_it_re_trains(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 4, seeds: [8]}\n"))
    said = io.StringIO()
    tune.run_study(spec, quick=True, trials=2, stream=said)
    assert "re-training the top 2 trial(s) on seed(s) [8] (validation only): 2 run(s) to go" in said.getvalue()


def test_top_trials_are_retrained_on_more_seeds_once(tmp_path, store):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 2, seeds: [8]}\n"))
    first = tune.run_study(spec, quick=True, trials=3)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    top = [t.number for t in confirm.top_trials(study, 2)]
    assert sorted(k for k in study.user_attrs if k.startswith("confirm:")) == sorted(f"confirm:{n}:8" for n in top)
    means = {n: (study.trials[n].value + study.user_attrs[f"confirm:{n}:8"]["value"]) / 2 for n in top}
    winner = max(top, key=means.get)
    assert first.best.number == winner and first.choice.seed_values.keys() == {7, 8}
    record = study.user_attrs[tune.TUNED]
    assert record["trial"] == winner and record["n_seeds"] == 2 and record["mean"] == pytest.approx(means[winner])

    client = MlflowClient(store)
    _, _, runs = _tune_runs(client)
    confirms = [r for r in runs if "confirm_trial" in r.data.tags]
    assert sorted((int(r.data.tags["confirm_trial"]), r.data.tags["confirm_seed"]) for r in confirms) == \
        sorted((n, "8") for n in top)
    assert {r.data.tags["mlflow.parentRunId"] for r in confirms} == {first.parent_run_id}
    assert {r.info.status for r in confirms} == {"FINISHED"}
    assert not any(k.startswith("test_") for r in confirms for k in r.data.metrics)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.metrics["best_n_seeds"] == 2 and parent.data.metrics["best_val_Corr_mean"] == \
        pytest.approx(means[winner])

    # A finished study run again with one more seed: only that seed is trained, seed 8 is not redone.
    more = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 2, seeds: [8, 9]}\n"))
    last = tune.run_study(more, quick=True, trials=3)
    _, _, runs = _tune_runs(client)
    seeds = sorted(r.data.tags["confirm_seed"] for r in runs if "confirm_trial" in r.data.tags)
    assert seeds == ["8", "8", "9", "9"]
    assert len(last.choice.seed_values) == 3 and len(study.trials) == 3


def test_the_spec_pruners_build_and_bad_ones_are_refused(tmp_path):
    halving = tune.load_tune_spec(_tune_spec(tmp_path, pruner="{type: successive_halving, min_resource: 1}"))
    assert isinstance(tune.make_pruner(halving.pruner, steps=4), optuna.pruners.SuccessiveHalvingPruner)
    hyperband = tune.load_tune_spec(_tune_spec(tmp_path, pruner="{type: hyperband, reduction_factor: 3}"))
    assert isinstance(tune.make_pruner(hyperband.pruner, steps=4), optuna.pruners.HyperbandPruner)
    for pruner, message in [("{type: successive_halving, min_resource: 0}", r"'sampler' or 'pruner'"),
                            # accepted by Optuna, then a ZeroDivisionError in every trial: refused at load
                            ("{type: hyperband, reduction_factor: 1}", r"reduction_factor must be an integer >= 2"),
                            ("{type: successive_halving, reduction_factor: 1.5}", r"reduction_factor must be"),
                            ("{type: hyperband, min_resource: 0}", r"min_resource must be 'auto' or an integer"),
                            ("{type: halving}", r"pruner type must be one of \['median', 'hyperband', "
                                                r"'successive_halving'")]:
        with pytest.raises(SpecError, match=message):
            tune.load_tune_spec(_tune_spec(tmp_path, pruner=pruner))
    assert tune.load_tune_spec().pruner["type"] == "hyperband"     # the shipped default


def test_a_failed_retraining_is_no_candidate_and_is_tried_again(tmp_path, store, monkeypatch):
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="confirm: {top: 1, seeds: [8]}\n"))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(confirm, "fit", broken)
        session = tune.run_study(spec, quick=True, trials=1)
    assert session.choice.candidates == 0 and session.best.number == 0     # handed over unconfirmed
    _, _, runs = _tune_runs(MlflowClient(store))
    [failed] = [r for r in runs if "confirm_trial" in r.data.tags]
    assert failed.info.status == "FAILED" and "out of memory" in failed.data.tags["error"]
    again = tune.run_study(spec, quick=True, trials=1)
    assert again.choice.candidates == 1 and list(again.choice.seed_values) == [7, 8]


def test_each_trial_line_ends_with_the_searchs_eta():
    from pipelines.tuning.session import StudyEta

    now = [100.0]
    eta = StudyEta(4, clock=lambda: now[0])
    now[0] = 110.0
    assert eta.after_trial("trial    0  COMPLETE ...") == "  search ETA 30s (3 to go)"
    assert eta.after_trial("confirm    0  seed 8 ...") == ""                 # a re-training, not a trial
    assert eta.after_trial("trial 1: could not record the MLflow run: ...") == ""      # a note, not its end
    now[0] = 150.0
    assert eta.after_trial("trial    1  PRUNED ...") == "  search ETA 50s (2 to go)"
    eta.after_trial("trial    2  PRUNED ...")
    assert eta.after_trial("trial    3  COMPLETE ...") == ""                 # the last: nothing left


def test_the_summary_says_when_the_choice_is_a_start_points_own_values():
    own = optuna.trial.create_trial(value=0.5, user_attrs={"start_from": "baseline", "override": {}})
    sampled = optuna.trial.create_trial(value=0.6, user_attrs={"override": {}})
    assert confirm.describe(confirm.Choice(own, {7: 0.5}, 0), "Corr").endswith(
        "(best search value, not re-trained; search value 0.5000; = the 'baseline' ablation's own values: "
        "no sampled trial beat it)")
    assert "own values" not in confirm.describe(confirm.Choice(sampled, {7: 0.6}, 0), "Corr")


def test_an_interrupted_trial_is_trained_by_the_same_command_again(tmp_path, store, monkeypatch):
    """Ctrl-C in a trial (here the `improved` start point): the same command again trains it, and
    `--trials 2` still means two trials trained to the end."""
    import importlib

    trials = importlib.import_module("pipelines.tuning.objective")   # the package exports a function of that name
    spec = tune.load_tune_spec(_tune_spec(tmp_path, extra="start_from: [improved]\n"))
    train, calls = trials._train_trial, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(trials, "_train_trial", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        tune.run_study(spec, quick=True, trials=2)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].user_attrs == {"start_from": "improved", "retry_of": 0}
    tune.run_study(spec, quick=True, trials=2)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[1].params == study.trials[0].params and study.trials[1].user_attrs["start_from"] == "improved"


def test_an_interrupted_trial_is_not_reported_by_optuna_with_a_traceback_but_other_failures_are():
    """Ctrl-C in `tune`: the trial's own line says "interrupted" and the command ends with one line;
    Optuna's warning with the KeyboardInterrupt's traceback would come between them."""
    import logging

    from pipelines.tuning.session import _quiet_optuna

    _quiet_optuna()
    _quiet_optuna()                                    # once per process, however often a session starts
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(handler)
    try:
        study = optuna.create_study()

        def broken(trial):
            raise ValueError("a bug")

        study.optimize(broken, n_trials=1, catch=(Exception,))
        failed = [r.getMessage() for r in seen]
        assert any(m.startswith("Trial 0 failed with parameters") for m in failed), failed
        seen.clear()

        def interrupted(trial):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            study.optimize(interrupted, n_trials=1, catch=(Exception,))
        assert [r.getMessage() for r in seen] == []
        assert study.trials[1].state == TrialState.FAIL
        again = optuna.create_study()                     # another study's trial 0, failing for a reason
        with pytest.raises(KeyboardInterrupt):
            again.optimize(interrupted, n_trials=1)
        again.optimize(broken, n_trials=1, catch=(Exception,))
        assert [r.getMessage().split(" with ")[0] for r in seen] == ["Trial 1 failed", "Trial 1 failed"]
    finally:
        optuna_logger.removeHandler(handler)


def test_a_search_loop_whose_worker_keeps_dying_is_one_line_and_the_session_ends(tmp_path, store, monkeypatch, capsys):
    """A sampled config that OOM-kills its worker on every retry: Dask gives up on that loop
    (KilledWorker). The session says so and ends as usual, instead of a traceback."""
    from distributed.scheduler import KilledWorker

    session = importlib.import_module("pipelines.tuning.session")

    def dying_run_jobs(jobs, work, *, lost=None, **kwargs):
        for job in jobs:
            if lost is None:  # what the executor does without a handler
                raise KilledWorker("msa-x-0", "tcp://127.0.0.1:1", allowed_failures=3)
            lost(job, "its worker died on every attempt (KilledWorker)")
        return []

    monkeypatch.setattr(session, "run_jobs", dying_run_jobs)
    assert main(["tune", "--spec", str(_tune_spec(tmp_path)), "--quick", "--trials", "1"]) in (0, 1)
    out = capsys.readouterr()
    assert "a search loop was lost: its worker died on every attempt (KilledWorker)" in out.out + out.err
    assert "Traceback" not in out.err
