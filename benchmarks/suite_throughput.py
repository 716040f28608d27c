"""Suite throughput with 1 worker vs N workers, measured side by side in one run.

Each configuration runs the same ablations (MOSI-sized synthetic data, or `--quick` data) into its own
temporary tracking store, through the real command line, so process start-up, MLflow logging and
model export are all counted. Prints runs per minute for each and, last, `workers_speedup <N/1>`.

    python benchmarks/suite_throughput.py --workers 2 --epochs 2 --seeds 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ABLATIONS = ["baseline", "transformer", "text_only", "attention_fusion", "improved", "loss_mae"]


def run_suite(workers: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MSA_PROGRESS": "0"}
        cmd = [sys.executable, "-m", "pipelines.run", "ablations", "--workers", str(workers),
               "--epochs", str(args.epochs), "--seeds", *map(str, args.seeds), "--only", *ABLATIONS]
        cmd += ["--quick"] if args.quick else []
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=tmp, check=True, capture_output=True, text=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small data: measures per-run overhead more")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    n_runs = len(ABLATIONS) * len(args.seeds)
    times = {1: [], args.workers: []}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits both alike
        for w in times:
            times[w].append(run_suite(w, args))
    for w, ts in times.items():
        best = min(ts)
        print(f"workers={w}: {n_runs} runs in {best:.1f}s  ({n_runs / best * 60:.1f} runs/min)")
    print(f"workers_speedup {min(times[1]) / min(times[args.workers]):.2f}")


if __name__ == "__main__":
    main()
