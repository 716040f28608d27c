"""Seconds per epoch of `msa.training.fit` in fp32 and under bf16 autocast, side by side, per ablation.

Each ablation of the default spec (or those named) trains on MOSI-sized synthetic data (real dims,
splits 1284/229/686, T = 50) with its own config, once in fp32 and once with `train.precision: bf16`,
the order alternating between rounds so that machine noise hits both alike. An epoch is timed
between successive callbacks; the first epoch of each run (model building, warm-up) is left out.
bf16 needs native support (AVX-512 BF16 or AMX on a CPU, or a CUDA GPU with bf16): without it `fit`
falls back to fp32 with a warning, and this benchmark says so and stops. Needs torch, numpy, pyyaml
and this repository only (no MLflow), so it also runs on a bare GPU machine.

The last line printed is `bf16_speedup <fp32/bf16>`: the median over ablations of each one's ratio of
median seconds per epoch (higher is faster; issue 12's target is >= 1.6 on a CPU with AVX-512 BF16).

    python benchmarks/precision.py [--epochs 4] [--rounds 2] [--threads N] [--only baseline transformer]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msa.data import from_raw
from msa.synthetic import SyntheticSpec, generate_raw
from msa.training import bf16_supported, fit
from pipelines.spec import load_spec


def seconds_per_epoch(config, data, epochs: int, device, threads: int) -> list[float]:
    stamps = [time.perf_counter()]
    fit(config, data, seed=1111, callback=lambda epoch, metrics: stamps.append(time.perf_counter()),
        device=device, threads=threads, evaluate_test=False)
    return [b - a for a, b in itertools.pairwise(stamps[1:])]  # epochs 2.., warm-up left out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, the first not timed (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="fp32/bf16 pairs per ablation (default 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="ablations of the default spec (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not bf16_supported(device):
        print(f"this {device.type} has no native bf16: `--precision bf16` trains in fp32 here (with a warning); "
              "nothing to measure")
        print("bf16_speedup nan")
        return
    specs = {p: load_spec().with_train(precision=p, epochs=args.epochs) for p in ("fp32", "bf16")}
    names = args.only or list(specs["fp32"].ablations)
    data = from_raw(generate_raw(SyntheticSpec()), source="benchmark", synthetic=True)
    print(f"data: sizes {data.sizes}; torch {torch.__version__}, {device}, {args.threads} threads, "
          f"{args.epochs} epochs x {args.rounds} rounds per precision")
    ratios = []
    for name in names:
        times = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                times[precision] += seconds_per_epoch(specs[precision].ablations[name], data, args.epochs, device,
                                                      args.threads)
        median = {p: statistics.median(t) for p, t in times.items()}
        ratios.append(median["fp32"] / median["bf16"])
        print(f"{name:18s} s/epoch fp32 {median['fp32']:6.3f}  bf16 {median['bf16']:6.3f}  "
              f"speedup {ratios[-1]:.2f}", flush=True)
    print(f"bf16_speedup {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
