"""Two `tune` sessions on one machine: side by side (with and without the shared core budget) against
one after the other, measured in one run. Prints each wall time and, last, the ratios.

Each session searches its own study in its own temporary store through the real command line. The
budget (pipelines/cores.py) is what sessions share through one ledger folder; "unbudgeted" gives
each session a ledger of its own, as before the budget existed: each then sizes torch to every core.

    python benchmarks/concurrent_tune.py --trials 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def _session(tmp: str, name: str, ledger: str, trials: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/{name}/mlflow.db", "MSA_PROGRESS": "0",
           "MSA_CORES_LEDGER": ledger, "MSA_CACHE": f"{tmp}/cache"}
    os.makedirs(f"{tmp}/{name}", exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.run", "tune", "--quick", "--trials", str(trials), "--study", name]
    return subprocess.Popen(cmd, env=env, cwd=f"{tmp}/{name}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a session failed:\n{err[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per session (default 4)")
    args = parser.parse_args(argv)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        _wait(_session(tmp, "warm-up", f"{tmp}/ledger-w", 1))  # the quick data's cache, imports warmed
        start = time.perf_counter()
        _wait(_session(tmp, "seq-a", f"{tmp}/ledger-s", args.trials))
        _wait(_session(tmp, "seq-b", f"{tmp}/ledger-s", args.trials))
        times["one after the other"] = time.perf_counter() - start
        start = time.perf_counter()
        _wait(_session(tmp, "bud-a", f"{tmp}/ledger-b", args.trials), _session(tmp, "bud-b", f"{tmp}/ledger-b",
                                                                               args.trials))
        times["side by side, budgeted"] = time.perf_counter() - start
        start = time.perf_counter()
        _wait(_session(tmp, "own-a", f"{tmp}/ledger-1", args.trials), _session(tmp, "own-b", f"{tmp}/ledger-2",
                                                                               args.trials))
        times["side by side, unbudgeted"] = time.perf_counter() - start
    for label, seconds in times.items():
        print(f"{label:<26} {seconds:7.1f} s  (2 sessions x {args.trials} trials, {os.cpu_count()} cores)")
    base = times["one after the other"]
    print(f"budgeted_vs_sequential {times['side by side, budgeted'] / base:.2f}")
    print(f"unbudgeted_vs_sequential {times['side by side, unbudgeted'] / base:.2f}")


if __name__ == "__main__":
    main()
