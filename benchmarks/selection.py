"""How a study should pick its winner: which rule gives the better test result per hour of compute.

Two arms, each the real `tune` pipeline (search, choice, then `improved_tuned` and `baseline` trained
over the suite's three seeds and compared on test), each on a fresh store:

- `confirm` (the tune spec's default): each trial scored on one seed (1111); after the search its top 3
  trials re-trained on seeds 1112 and 1113, the best 3-seed validation mean wins;
- `two_seed`: each trial scored on the mean of two seeds (1111, 1112), nothing re-trained; the best
  two-seed validation mean wins.

Both search the same space with the same seeded TPE sampler and the spec's pruner, for the same number
of trials; the test split is read only by the final comparison, as in `tune`. The two arms run side by
side (two processes started together), so that a busy machine slows both alike; the cost of an arm is
its CPU seconds (the whole command, final suite included), which the other arm's presence does not
change. Per arm it prints wall and CPU time, the winner, and its test Corr and MAE against the
baseline with the paired bootstrap interval. Then one line per arm,
`selection <arm> corr <test Corr> mae <test MAE> cpu_h <CPU hours> corr_gain_per_cpu_h <x>`, and which
rule gave the better test Corr at what cost.

    python benchmarks/selection.py [--trials 20] [--epochs 10] [--data synthetic] [--quick] [--sampler-seed N]

One study per arm is one draw: a difference smaller than the intervals printed is not a finding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.comparison.bootstrap import PRINTED_DIGITS  # noqa: E402  (the reports' decimals)

ARMS = {  # arm -> what it changes in the tune spec
    "confirm": {"seeds": [1111], "confirm": {"top": 3, "seeds": [1112, 1113]}},
    "two_seed": {"seeds": [1111, 1112], "confirm": {"top": 0}},
}


def run_arm(arm: str, args: argparse.Namespace, out: Path) -> None:
    """In a child process whose store and working folder are new: run `tune` with the arm's rule and
    write what it found to `out` (JSON)."""
    from pipelines.spec import TUNED, read_yaml
    from pipelines.tuning.pipeline import tune
    from pipelines.tuning.spec import DEFAULT_TUNE_SPEC, parse_tune_spec

    raw = {**read_yaml(DEFAULT_TUNE_SPEC), **ARMS[arm], "study": f"selection-{arm}", "compare_with": ["baseline"]}
    if args.sampler_seed is not None:  # another draw of the same comparison
        raw["sampler"] = {**raw.get("sampler", {}), "seed": args.sampler_seed}
    spec = parse_tune_spec(raw, str(DEFAULT_TUNE_SPEC))
    started = time.perf_counter()
    result = tune(spec, data_source=args.data, quick=args.quick, epochs=args.epochs, trials=args.trials,
                  storage=str(Path.cwd() / "journal.log"), workers=1)
    total = time.perf_counter() - started
    session, comparison = result.session, result.comparison
    if comparison is None:
        sys.exit(f"arm {arm}: no comparison ({result.comparison_note})")
    row = comparison.table.loc[TUNED]
    base = comparison.table.loc[comparison.baseline]
    choice = session.choice
    found = {
        "arm": arm, "search_s": session.seconds, "total_s": total, "trials": len(session.trials),
        "trial": session.best.number if session.best else None,
        "val_mean": choice.mean if choice else None, "val_std": choice.std if choice else None,
        "val_seeds": len(choice.seed_values) if choice else 0,
        "override": session.override, "synthetic": comparison.synthetic, "digest": session.data_digest,
    }
    for metric in ("Corr", "MAE"):
        found[metric] = float(row[f"{metric}_mean"])
        found[f"{metric}_std"] = float(row[f"{metric}_std"])
        found[f"{metric}_base"] = float(base[f"{metric}_mean"])
        for stat in ("delta", "ci_low", "ci_high", "mark"):
            value = row[f"{metric}_{stat}"]
            found[f"{metric}_{stat}"] = value if isinstance(value, str) else float(value)
    out.write_text(json.dumps(found, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per arm (default 20)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial and final run (default 10)")
    parser.add_argument("--data", default=None, help="a MOSI pickle, or synthetic (default: the spec's)")
    parser.add_argument("--quick", action="store_true", help="the quick profile's small data (a smoke test)")
    parser.add_argument("--sampler-seed", type=int, help="TPE's seed in both arms (default: the spec's)")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        run_arm(args.arm, args, Path(args.out))
        return

    data = args.data or "the spec's default"
    print(f"selection rules, {args.trials} trials x {args.epochs} epochs per arm, data {data}"
          f"{' (quick)' if args.quick else ''}; {os.cpu_count()} cores; both arms side by side", flush=True)
    found, cpu = {}, {}
    with tempfile.TemporaryDirectory() as root:
        children = {}
        for arm in ARMS:  # started together, so that the machine's load falls on both alike
            tmp = Path(root) / arm
            tmp.mkdir()
            child = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--out", str(tmp / "found.json"),
                     "--trials", str(args.trials), "--epochs", str(args.epochs)]
            child += ["--sampler-seed", str(args.sampler_seed)] if args.sampler_seed is not None else []
            child += ["--data", args.data] if args.data else []
            child += ["--quick"] if args.quick else []
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                   "MSA_PROGRESS": "0"}
            log = (tmp / "log.txt").open("w")
            children[arm] = (subprocess.Popen(child, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT), tmp)
        try:
            for arm, (proc, tmp) in children.items():
                # wait4: this child's CPU seconds, its own children's (the workers it waited for) included
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu[arm] = usage.ru_utime + usage.ru_stime
                if proc.returncode != 0:
                    sys.exit(f"arm {arm} failed ({proc.returncode}):\n{(tmp / 'log.txt').read_text()[-3000:]}")
                found[arm] = json.loads((tmp / "found.json").read_text())
        finally:  # Ctrl-C, or one arm failed: the other one stops too (it records its runs as KILLED)
            for proc, _ in children.values():
                if proc.returncode is None:
                    proc.terminate()
                    proc.wait()
    for arm, f in found.items():
        label = " (SYNTHETIC data, not a MOSI result)" if f["synthetic"] else ""
        print(f"{arm:<9} {f['trials']} trials; search + choice {f['search_s']:.0f} s wall; whole command "
              f"{f['total_s']:.0f} s wall, {cpu[arm]:.0f} CPU s; winner trial {f['trial']}: validation Corr "
              f"{f['val_mean']:.4f} ± {f['val_std']:.4f} over {f['val_seeds']} seed(s)", flush=True)
        for metric in ("Corr", "MAE"):
            spread = f"± {f[f'{metric}_std']:.3f}" if not math.isnan(f[f"{metric}_std"]) else "(1 seed)"
            print(f"          test {metric} {f[metric]:.3f} {spread} (baseline "
                  f"{f[f'{metric}_base']:.3f}): {f[f'{metric}_delta']:+.3f} [{f[f'{metric}_ci_low']:+.3f}, "
                  f"{f[f'{metric}_ci_high']:+.3f}] {f[f'{metric}_mark']}{label}", flush=True)
        print(f"          winner: {json.dumps(f['override'])}", flush=True)
    for arm, f in found.items():
        hours = cpu[arm] / 3600
        print(f"selection {arm} corr {f['Corr']:.4f} mae {f['MAE']:.4f} cpu_h {hours:.3f} "
              f"corr_gain_per_cpu_h {(f['Corr'] - f['Corr_base']) / hours:+.4f}")
    corr = {arm: f["Corr"] for arm, f in found.items()}
    better = "neither (the same to 3 decimals)" \
        if round(corr["confirm"], PRINTED_DIGITS) == round(corr["two_seed"], PRINTED_DIGITS) \
        else max(corr, key=corr.get)
    print(f"better test Corr: {better}; CPU two_seed / confirm {cpu['two_seed'] / cpu['confirm']:.2f}x")


if __name__ == "__main__":
    main()
