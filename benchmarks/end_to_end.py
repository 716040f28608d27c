"""Whole commands, timed as processes: the project's one-run `ablations` against the lab's plain script.

    python benchmarks/end_to_end.py [--epochs 10] [--pairs 3] [--data FILE] [--no-warmup] [--breakdown-only]
    python benchmarks/end_to_end.py --study 6 [--epochs 1]

Default mode: the lab's script (`benchmarks/lab_mosi.py FILE --epochs E`) and
`python -m pipelines.run ablations --data FILE --only baseline --epochs E --seeds 1 --workers 1`, each a
fresh process, alternated lab, project, lab, project, ... (`--pairs` of each, after one untimed warm-up of
each). Every project process gets a new empty MLflow store (MLFLOW_TRACKING_URI=sqlite:///<tmp>) and its
own working folder (so its own reports/), so nothing is ever cached or reused. The machine's cache
(~/.cache/msa or $MSA_CACHE) is used as on any machine after its first command. FILE defaults to a
MOSI-sized synthetic pickle (real dims, 1284/229/686 samples, T = 50) written to a temporary folder.

Then one more project process runs instrumented (the same command, in this script's child) and the
breakdown of its fixed cost is printed: everything in the run but its epochs, by phase, largest first.
The line before the last says how low the ratio can go here: the project's epochs alone against the
lab's whole command, and the seconds a ratio of 0.8 leaves for everything else (start-up, data, MLflow,
logging, comparison) beside what `import torch` alone costs. The last line is `end_to_end_ratio
<project/lab>` of the median wall seconds (target <= 0.8).

`--study N`: the fixed cost per trial of `tune` (sampling, the trial's MLflow run and its logging, fit's
set-up; not its epochs), from one `tune --quick --trials N` process on a fresh store: each trial run's
length less its epochs, and the gap between one trial run's end and the next one's start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "benchmarks" / "lab_mosi.py"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "MSA_PROGRESS": "0"}


def project_command(data: str, epochs: int) -> list[str]:
    return ["-m", "pipelines.run", "ablations", "--data", data, "--only", "baseline", "--epochs", str(epochs),
            "--seeds", "1", "--workers", "1"]


CPU: dict[str, list[float]] = defaultdict(list)  # CPU seconds (user + system) of each timed process, by side


def timed(argv: list[str], tmp: Path, side: str = "") -> float:
    """Wall seconds of one whole process, run in `tmp` (its own store and reports/); its CPU seconds go
    to CPU[side] (steadier than wall time on a machine that others share, though threads that spin
    while waiting for a busy core inflate it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tmp, env=_env(tmp), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[side].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def lab(data: str, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return timed([str(LAB), data, "--epochs", str(epochs), "--checkpoint-dir", tmp], Path(tmp), "lab")


def project(data: str, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return timed(project_command(data, epochs), Path(tmp), "project")


# --- the breakdown: the same command in a child of this script, its phases wrapped with timers ----------

PHASES = {  # module attribute -> phase name; none of these calls another of them
    "pipelines.stages.prepare:prepare": "data: load + validate the file",
    "pipelines.tracking:setup": "MLflow: open the store, the experiment",
    "pipelines.tracking:finished_runs": "MLflow: look up cached runs",
    "pipelines.parent:open_parent": "MLflow: the suite's parent run",
    "pipelines.parent:describe": "MLflow: the suite's description",
    "pipelines.tracking:start_run": "MLflow: the run, its tags and params",
    "pipelines.tracking:log_dataset": "MLflow: dataset inputs",
    "pipelines.stages.train:fit": "fit (its epochs are counted apart)",
    "pipelines.stages.train:evaluate": "test evaluation + predictions table",
    "pipelines.stages.train:_add_graph": "TensorBoard graph",
    "pipelines.stages.train:_plot_curves": "loss curve figure",
    "pipelines.stages.train:_log_model": "MLflow: log the model",
    "mlflow.tracking:MlflowClient.log_artifacts": "MLflow: artifacts (predictions, curves, tensorboard)",
    "pipelines.suite:_crown": "champion registration",
    "pipelines.suite:compare": "comparison (bootstrap, report.html)",
    "pipelines.suite:report": "report to the terminal",
}


def _child_breakdown(argv: list[str], out: str) -> None:
    """Run `python -m pipelines.run <argv>` here with timers on PHASES; write the seconds to `out`.
    A phase called inside another (a parent run is a run; the comparison logs artifacts) counts once,
    in the outer one."""
    import atexit
    import importlib

    began = time.time()
    # Registered first, so run last: what the other exit handlers (MLflow's, torch's) took is counted.
    atexit.register(lambda: Path(out + ".exit").write_text(repr(time.time())))
    t0 = time.perf_counter()
    spent: dict[str, float] = defaultdict(float)
    epochs, depth = [0.0], [0]
    # The modules `ablations` imports, imported first so that their time is counted as imports (not
    # pipelines.tuning: Optuna is imported only where a study journal exists, never on a new store).
    for name in ("pipelines.run", "pipelines.suite", "pipelines.stages.prepare", "pipelines.stages.train",
                 "pipelines.stages.compare"):
        importlib.import_module(name)
    spent["imports (pipelines, mlflow, torch, ...)"] = time.perf_counter() - t0

    def wrap(owner, attr, phase):
        original = getattr(owner, attr)

        def timed_call(*args, **kwargs):
            if depth[0]:
                return original(*args, **kwargs)
            start, depth[0] = time.perf_counter(), 1
            try:
                result = original(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start
                depth[0] = 0
            if attr == "fit":
                epochs[0] += sum(h["epoch_seconds"] for h in result.history)
            return result
        setattr(owner, attr, timed_call)

    for target, phase in PHASES.items():
        module, _, attr = target.partition(":")
        owner = importlib.import_module(module)
        if "." in attr:
            cls, attr = attr.split(".")
            owner = getattr(owner, cls)
        wrap(owner, attr, phase)

    from pipelines.fast_exit import exit_now
    from pipelines.run import main
    code = main(argv)
    spent["fit (its epochs are counted apart)"] -= epochs[0]
    in_process = time.perf_counter() - t0
    spent["other (not in a phase above)"] = in_process - epochs[0] - sum(spent.values())
    Path(out).write_text(json.dumps({"phases": spent, "epochs": epochs[0], "began": began,
                                     "ended": time.time()}))
    exit_now(code)  # as `python -m pipelines.run` ends


def breakdown(data: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phases.json"
        start = time.time()
        wall = timed([__file__, "--child", str(out), "--", *project_command(data, epochs)[2:]], Path(tmp))
        end = start + wall
        found = json.loads(out.read_text())
        exit_handlers_done = float(Path(str(out) + ".exit").read_text())
    phases = found["phases"]
    phases["python start-up"] = found["began"] - start
    phases["exit: atexit handlers (MLflow's, torch's, ...)"] = exit_handlers_done - found["ended"]
    phases["exit: interpreter teardown"] = end - exit_handlers_done
    return {"wall": wall, "epochs": found["epochs"], "phases": phases}


def print_breakdown(b: dict) -> None:
    fixed = b["wall"] - b["epochs"]
    print(f"breakdown of one project run: wall {b['wall']:.2f} s = epochs {b['epochs']:.2f} s "
          f"+ fixed cost {fixed:.2f} s")
    for name, seconds in sorted(b["phases"].items(), key=lambda kv: -kv[1]):
        print(f"  {seconds:7.2f} s  {name}")
    print(f"fixed_cost_seconds {fixed:.2f}")


# --- tune: fixed cost per trial -------------------------------------------------------------------------

def study(trials: int, epochs: int) -> None:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall = timed(["-m", "pipelines.run", "tune", "--quick", "--trials", str(trials), "--epochs", str(epochs),
                      "--workers", "1", "--storage", str(tmp / "journal.log"), "--study", "bench"], tmp)
        client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.optuna_study = 'bench'", max_results=1000)
        runs = sorted((r for r in runs if "optuna_trial" in r.data.tags), key=lambda r: r.info.start_time)
        inside, gaps = [], []
        for r in runs:
            trained = sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_seconds"))
            inside.append((r.info.end_time - r.info.start_time) / 1000 - trained)
        gaps = [(b.info.start_time - a.info.end_time) / 1000 for a, b in itertools.pairwise(runs)]
    print(f"tune --quick: {len(runs)} trial runs, {epochs} epoch(s) each, whole command {wall:.1f} s")
    print("per trial, in its run but not its epochs (s): " + " ".join(f"{s:.2f}" for s in inside))
    print("between trial runs (s): " + " ".join(f"{s:.2f}" for s in gaps))
    per_trial = statistics.median(inside) + (statistics.median(gaps) if gaps else 0.0)
    print(f"study_overhead_seconds_per_trial {per_trial:.2f}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_breakdown(argv[3:], argv[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; 1 with --study)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--data", help="a MOSI pickle (default: a MOSI-sized synthetic one)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each side")
    parser.add_argument("--breakdown-only", action="store_true", help="only the instrumented project run")
    parser.add_argument("--study", type=int, metavar="N", help="time N tune trials instead")
    args = parser.parse_args(argv)
    if args.study:
        return study(args.study, args.epochs or 1)
    epochs = args.epochs or 10

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            sys.path.insert(0, str(ROOT))
            from msa.synthetic import SyntheticSpec, generate_raw, write_pickle
            data = str(Path(tmp) / "mosi_raw.pkl")
            write_pickle(generate_raw(SyntheticSpec()), data)
        print(f"data {data}, {epochs} epochs; {os.cpu_count()} cores, load average "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
        if not args.breakdown_only:
            if not args.no_warmup:
                lab(data, epochs), project(data, epochs)  # warm-up: file cache, the machine's msa cache
            times = {"lab": [], "project": []}
            CPU.clear()
            for i in range(1, args.pairs + 1):
                for side, run in (("lab", lab), ("project", project)):
                    times[side].append(run(data, epochs))
                print(f"pair {i}: lab {times['lab'][-1]:6.2f} s  project {times['project'][-1]:6.2f} s  "
                      f"ratio {times['project'][-1] / times['lab'][-1]:.3f}   cpu s: lab {CPU['lab'][-1]:6.2f}  "
                      f"project {CPU['project'][-1]:6.2f}", flush=True)
        found = breakdown(data, epochs)
        print_breakdown(found)
        print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        if not args.breakdown_only:
            med = {k: statistics.median(v) for k, v in times.items()}
            cpu = {k: statistics.median(CPU[k]) for k in times}
            print(f"median cpu s:  lab {cpu['lab']:.2f}  project {cpu['project']:.2f}  ratio "
                  f"{cpu['project'] / cpu['lab']:.3f}")
            print(f"median wall s: lab {med['lab']:.2f}  project {med['project']:.2f}")
            print_floor(found["epochs"], med["lab"])
            print(f"end_to_end_ratio {med['project'] / med['lab']:.3f}")


def print_floor(project_epochs: float, lab_wall: float, target: float = 0.8) -> None:
    """What the ratio could be at best on this machine: the project's epochs alone against the lab's
    whole command, and the fixed cost the target leaves, beside what `import torch` alone costs here
    (every process that trains pays it, the lab's included)."""
    imports = min(_seconds([sys.executable, "-c", "import torch"]) for _ in range(3))
    print(f"floor: the project's epochs alone ({project_epochs:.2f} s) are {project_epochs / lab_wall:.3f} of the "
          f"lab's whole command; a ratio of {target} leaves {target * lab_wall - project_epochs:.2f} s for "
          f"everything else, and `import torch` alone takes {imports:.2f} s here")


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
