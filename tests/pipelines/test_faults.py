"""Faults that must not end in a lie in the store: a run that trains to NaN, a study whose worker
died, two commands on a new store at once, concurrent sessions on one machine's cores."""

import os
import subprocess
import sys
import time
import warnings

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipelines import claims, cores, tracking, tune
from pipelines.executor import LeftRunning
from pipelines.run import main
from pipelines.tuning.storage import OnDeadTrial, trial_id

TINY = "experiment: unit\nseeds: [7]\nbase:\n  model: {hidden: 8, heads: 2, ff_dim: 16}\nablations:\n"


def _children(client, experiment="unit"):
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "ablation" in r.data.tags]


def test_a_run_that_trains_to_nan_is_failed_never_cached_nor_compared(tmp_path, store, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY + "  baseline: {}\n  diverges:\n    train: {lr: 1.0e+30}\n"
                    "  saturates:\n    train: {lr: 1.0e+6}\n")             # constant predictions: no Corr
    argv = ["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1"]
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert main(argv) == 1
    # Its reason is in the run's line; no Python warning about the NaN Corr beside it.
    assert [str(w.message) for w in raised if "Corr is undefined" in str(w.message)] == []
    out = capsys.readouterr().out
    assert "FAILED: diverges/seed-7: NonFiniteRun: train_loss is nan at the selected epoch 1" in out
    assert "FAILED: saturates/seed-7: NonFiniteRun: " in out
    assert "1 trained, 0 cached, 2 failed" in out
    runs = {r.data.tags["ablation"]: r for r in _children(MlflowClient(store))}
    assert runs["diverges"].info.status == "FAILED"
    assert runs["diverges"].data.tags["error"].startswith("NonFiniteRun: train_loss is nan")

    assert main(argv) == 1                    # tried again, not reused as cached
    capsys.readouterr()
    diverged = [r for r in _children(MlflowClient(store)) if r.data.tags["ablation"] == "diverges"]
    assert len(diverged) == 2 and {r.info.status for r in diverged} == {"FAILED"}


def test_a_finished_run_without_a_finite_score_is_not_reused_nor_compared(store, suite_recorder):
    import numpy as np

    client, exp_id = tracking.setup("unit")
    recorder = suite_recorder(client, exp_id)
    labels = np.linspace(-3, 3, 20)
    pid = recorder.parent(["baseline", "nan_run"], [1])
    rows = [recorder.child(pid, "baseline", 1, labels, labels + 0.5),
            recorder.child(pid, "nan_run", 1, labels, np.full(20, np.nan))]   # as runs logged before the fix
    recorder.finish(pid, rows)
    assert set(tracking.finished_runs(client, exp_id, ["baseline-1", "nan_run-1"])) == {"baseline-1"}
    assert claims.find_taken(client, exp_id, "baseline-1").finished
    assert claims.find_taken(client, exp_id, "nan_run-1") is None     # trained again, not taken as done
    from pipelines.stages.compare import compare_suite

    comparison, _ = compare_suite("unit", exp_id, pid)
    assert comparison.table.loc["nan_run", "test"] == "no finished run"
    assert any(note.startswith("nan_run/seed-1") for note in comparison.left_out)
    from pipelines.stages.compare import format_table
    assert "Left out: nan_run/seed-1" in format_table(comparison)


def test_a_bf16_run_that_fell_back_to_fp32_is_never_reused_as_a_bf16_result(store):
    """On a cluster where only some workers have native bf16, a worker without it trains a bf16 run in
    fp32 and says so in `precision_used`: a later bf16 suite trains that seed again."""
    client, exp_id = tracking.setup("unit")
    for key, used in (("fell-back", "fp32"), ("native", "bf16")):
        run_id = tracking.start_run(client, exp_id, key, tags={"run_key": key, "precision_used": used},
                                    params={"train.precision": "bf16"})
        tracking.log_metrics(client, run_id, {"test_MAE": 0.9, "test_Corr": 0.6})
        client.set_terminated(run_id, "FINISHED")
    assert set(tracking.finished_runs(client, exp_id, ["fell-back", "native"])) == {"native"}
    assert claims.find_taken(client, exp_id, "fell-back") is None
    assert claims.find_taken(client, exp_id, "native").finished


TUNE = """study: unit
ablations: spec.yaml
base: baseline
seeds: [7]
trials: 1
sampler: {seed: 1}
storage: {heartbeat_interval: 1, grace_period: 1, max_retry: 1}
compare_with: [baseline]
space:
  train.lr: {float: [1.0e-3, 1.0e-2], log: true}
"""


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_study_whose_session_died_completes_on_the_next_run(tmp_path, store):
    (tmp_path / "spec.yaml").write_text(TINY + "  baseline: {}\n" + "quick: {epochs: 1, seeds: [7]}\n")
    (tmp_path / "tune.yaml").write_text(TUNE)
    spec = tune.load_tune_spec(tmp_path / "tune.yaml")
    # A session that was killed (SIGKILL) mid-trial: its run and trial run left RUNNING, one heartbeat.
    dead = optuna.create_study(study_name="unit-quick", direction="maximize",
                               storage=tune.open_storage(None, spec.storage))
    trial = dead.ask()
    tune.sample(trial, spec.space)
    client, exp_id = tracking.setup("unit")
    session = tracking.start_run(client, exp_id, "tune unit-quick", tags={"tune_study": "unit-quick"})
    trial_run = tracking.start_run(client, exp_id, "trial-0", tags={"optuna_trial": "0"}, parent_run_id=session)
    trial.set_user_attr("mlflow_run_id", trial_run)
    dead._storage.record_heartbeat(trial_id(trial))
    time.sleep(1.5)
    # Its one FAIL reaches --trials 1; the re-queued trial runs all the same, so the study completes.
    done = tune.run_study(spec, quick=True, trials=1)
    study = optuna.load_study(study_name="unit-quick", storage=tune.open_storage(None))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert done.best is not None and done.best.number == 1
    assert client.get_run(trial_run).info.status == "FAILED"
    killed = client.get_run(session)                                  # the dead session's run is not left RUNNING
    assert killed.info.status == "KILLED" and "session died" in killed.data.tags["error"]


def test_a_dead_worker_of_a_live_session_leaves_the_session_running(store):
    client, exp_id = tracking.setup("unit")
    session = tracking.start_run(client, exp_id, "tune s", tags={"tune_study": "s", **claims.claim_tags()})
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())

    def dead_trial():                        # a trial whose worker process died mid-run
        run_id = tracking.start_run(client, exp_id, "trial", tags={"optuna_trial": "0"}, parent_run_id=session)
        study.ask().set_user_attr("mlflow_run_id", run_id)
        return run_id, study.trials[-1]

    run_id, trial = dead_trial()
    OnDeadTrial(max_retry=0, grace_period=1)(study, trial)      # tune --workers 2: one worker died
    assert client.get_run(run_id).info.status == "FAILED"
    alive = client.get_run(session)
    assert alive.info.status == "RUNNING" and "error" not in alive.data.tags
    client.set_tag(session, claims.HEARTBEAT, f"{time.time() - 3600:.3f}")   # the session stopped beating
    run_id, trial = dead_trial()
    OnDeadTrial(max_retry=0, grace_period=1)(study, trial)
    killed = client.get_run(session)
    assert killed.info.status == "KILLED" and "session died" in killed.data.tags["error"]


def test_trial_runs_of_a_session_that_died_are_killed_with_it_by_the_next_command(store):
    client, exp_id = tracking.setup("unit")
    dead = tracking.start_run(client, exp_id, "tune s", tags={"tune_study": "s", **claims.claim_tags()})
    client.set_tag(dead, claims.HEARTBEAT, f"{time.time() - 3600:.3f}")     # SIGKILLed an hour ago
    live = tracking.start_run(client, exp_id, "tune t", tags={"tune_study": "t", **claims.claim_tags()})
    trials = {parent: tracking.start_run(client, exp_id, "trial", tags={"optuna_trial": "0"}, parent_run_id=parent)
              for parent in (dead, live)}
    ended = tracking.start_run(client, exp_id, "tune u", tags={"tune_study": "u"})
    client.set_terminated(ended, "KILLED")                                  # marked by an earlier command
    trials[ended] = tracking.start_run(client, exp_id, "trial", tags={"optuna_trial": "0"}, parent_run_id=ended)
    assert claims.kill_stale(client, exp_id) == 3
    status = lambda run_id: client.get_run(run_id).info.status
    assert status(dead) == status(trials[dead]) == status(trials[ended]) == "KILLED"
    assert "its parent run" in client.get_run(trials[dead]).data.tags[claims.KILLED_REASON]
    assert status(live) == status(trials[live]) == "RUNNING"               # a live session's trial goes on


def test_the_core_share_counts_every_live_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_CORES_LEDGER", str(tmp_path / "ledger"))
    me = os.getpid()
    assert cores.share(1, cores=2, claims={}) == 2                     # alone: every core
    assert cores.share(2, cores=2, claims={}) == 1                     # two workers of ours: one each
    assert cores.share(1, cores=2, claims={12345: 1}) == 1             # another session: half each
    assert cores.share(1, cores=2, claims={12345: 4}) == 1             # never less than one thread
    assert cores.share(1, cores=16, claims={12345: 1, 23456: 2, me: 1}) == 4   # ours counted once
    # A worker process takes the share of the command that claimed it, whose claim is not another's:
    # 2 workers on 8 cores get 4 threads each, not 8 // (2 + 2).
    assert cores.share(2, cores=8, claims={me: 2}, owner=me) == 4
    assert cores.Share(2, owner=12345)() == cores.share(2, owner=12345)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "ledger").mkdir()
        (tmp_path / "ledger" / f"{other.pid}.json").write_text('{"workers": 1}')
        (tmp_path / "ledger" / "999999.json").write_text('{"workers": 5}')   # a dead command's entry
        with cores.claim(1):
            assert cores.live_claims() == {other.pid: 1, me: 1}
            assert cores.share(1, cores=2) == 1
        assert cores.live_claims() == {other.pid: 1}                   # released; the dead entry is gone
        assert not (tmp_path / "ledger" / "999999.json").exists()
    finally:
        other.kill()
        other.wait()


FIRST_USE = """
import sys
from pipelines import tracking
from pipelines.stages.prepare import prepare

data = prepare("synthetic", quick=True)
client, exp_id = tracking.setup("unit")              # the schema and the experiment, created at once
run_id = tracking.start_run(client, exp_id, "suite", tags={"suite": "ablations"})
with tracking.recorded_run(client, run_id):
    tracking.log_dataset(client, run_id, data)        # the dataset's first insert, at once
print(run_id)
"""


def test_two_commands_on_a_new_store_at_once_both_succeed(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
           "MSA_CACHE": str(tmp_path / "cache"), "MSA_PROGRESS": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.inputs.dataset_inputs for r in runs)


@pytest.mark.parametrize("raised, said", [
    (KeyboardInterrupt(), "any run in flight was recorded as KILLED"),
    (LeftRunning("again"), "runs still in flight stay RUNNING until the next command marks them KILLED"),
])
def test_an_interrupt_says_truly_what_became_of_the_runs_in_flight(monkeypatch, capsys, raised, said):
    import pipelines.run

    def interrupted(args):
        raise raised

    monkeypatch.setattr(pipelines.run, "_ablations", interrupted)
    assert main(["ablations", "--quick"]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: {said}; finished runs are kept.") and err.count("\n") == 1


def test_an_interrupt_while_torch_is_imported_is_one_line_and_imports_nothing_more(monkeypatch, capsys):
    """Ctrl-C in a command's first second lands inside `import torch`; the handler must not import it
    again (a second traceback, or a segfault), and a command that trains nothing says no more than that."""
    import pipelines.run

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.run, "_prepare", interrupted)
    monkeypatch.setattr(pipelines.run, "user_errors", lambda: pytest.fail("imported the error classes"))
    assert main(["prepare", "--data", "synthetic"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
