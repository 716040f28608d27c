"""Where the full default suite's time goes: seconds per epoch of each ablation of the spec, alone.

Each ablation trains `--epochs` epochs of `msa.training.fit` on MOSI-sized synthetic data, in this one
process, at `--threads` threads (a suite worker's share of the cores: 1 with the default 2 workers on
2 cores). Printed per ablation: the median seconds per epoch, that against the baseline's, and its share
of the suite's training time (each ablation runs the same epochs x seeds, so the share is its per-epoch
cost over the sum). The last line estimates the suite's wall time from these figures:
`suite_estimate_minutes <training of every (ablation, seed) at 20 epochs, over --workers workers>`.

    python benchmarks/suite_epochs.py [--epochs 2] [--threads 1] [--workers 2] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from msa.data import from_raw
from msa.synthetic import SyntheticSpec, generate_raw
from msa.training import fit
from pipelines.spec import load_spec


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    spec = load_spec(None).select(args.only)
    data = from_raw(generate_raw(SyntheticSpec()), source="benchmark", synthetic=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epochs per ablation", flush=True)

    per_epoch = {}
    for name, config in spec.ablations.items():
        result = fit(_with_epochs(config, args.epochs), data, seed=1111, threads=args.threads,
                     evaluate_test=False, device="cpu")
        per_epoch[name] = statistics.median(h["epoch_seconds"] for h in result.history)
        print(f"{name:18s} {per_epoch[name]:7.2f} s/epoch", flush=True)

    total = sum(per_epoch.values())
    base = per_epoch.get("baseline")
    print(f"\n{'ablation':18s} {'s/epoch':>8s} {'x baseline':>10s} {'share':>6s}")
    for name, s in sorted(per_epoch.items(), key=lambda kv: -kv[1]):
        print(f"{name:18s} {s:8.2f} {s / base if base else float('nan'):10.2f} {s / total:6.1%}")
    if args.only is None:  # the estimate needs every ablation
        seeds = len(spec.seeds)
        print(f"suite_estimate_minutes {total * 20 * seeds / args.workers / 60:.1f}  (training only: 20 epochs x "
              f"{seeds} seeds, {args.workers} workers in parallel, no start-up or logging)")


def _with_epochs(config, epochs: int):
    return replace(config, train=replace(config.train, epochs=epochs))


if __name__ == "__main__":
    main()
