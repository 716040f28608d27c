"""Seconds per epoch of the lab's plain training loop and of `msa.training.fit`, side by side.

Both train the baseline on MOSI-sized synthetic data (real dims, splits 1284/229/686, T = 50) in one
process, whole runs alternated (lab, project, then project, lab, ...) so that machine noise hits both alike.
The last line printed is `speed_ratio <project/lab>` of the median wall seconds per epoch (lower is
faster; the target is <= 0.8); the line before gives the same ratio in CPU seconds.

Where the difference comes from: both run the same LSTMs on the same batches, which is most of the
work; `fit` computes the front padding that all rows of a batch share once instead of once per row,
uses fused Adam, gathers batches by index instead of per-item tensors, and validates in one batch.
On a machine other jobs share, prefer `--threads 1`: an OpenMP thread waiting on a busy core can
make any epoch of either loop several times slower.

    python benchmarks/train_speed.py [--epochs 3] [--threads N] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msa.config import RunConfig, TrainConfig
from msa.data import from_raw
from msa.synthetic import SyntheticSpec, generate_raw
from msa.training import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_mosi import MOSIDataset, MultimodalSentimentAnalysisModel, train_epoch, validate_model

# --- the lab's code: benchmarks/lab_mosi.py, its script, driven epoch by epoch on arrays in memory ----

def lab_epochs(raw, epochs, device, checkpoint_dir):
    """The lab's main()/train_model(), as a generator: yields after each epoch (train + validate)."""
    seed = 42
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    criterion = nn.MSELoss()
    model = MultimodalSentimentAnalysisModel()
    train_loader = DataLoader(MOSIDataset(None, 'train', raw=raw), batch_size=16, shuffle=True)
    valid_loader = DataLoader(MOSIDataset(None, 'valid', raw=raw), batch_size=16, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    model.to(device)
    best_corr = 0.
    for epoch in range(epochs):
        loss = train_epoch(model, train_loader, criterion, optimizer, scheduler, device)
        val_corr = validate_model(model, valid_loader, criterion, device, verbose=False)
        if val_corr > best_corr:
            best_corr = val_corr
            torch.save(model.state_dict(), os.path.join(checkpoint_dir, 'best_model.pth'))
        yield loss, val_corr


# --- the benchmark ----------------------------------------------------------------------------------

def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_epoch(stamps):
    """[(wall, cpu), ...] stamps -> [(wall seconds, cpu seconds)] between successive stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def project_run(data, epochs, device, threads):
    """`fit` for `epochs` epochs: (wall, cpu) seconds of each epoch, last train loss and val Corr.

    An epoch is timed between successive callbacks (the first from the call, so it includes building
    the model, as the lab's first epoch includes building its model and loaders).
    """
    stamps, last = [_clock()], {}

    def on_epoch(epoch, metrics):
        stamps.append(_clock())
        last.update(metrics)

    fit(RunConfig(train=TrainConfig(epochs=epochs)), data, seed=42, callback=on_epoch, device=device,
        threads=threads, evaluate_test=False)
    return _per_epoch(stamps), last["train_loss"], last["val_Corr"]


def lab_run(raw, epochs, device, checkpoint_dir):
    stamps, last = [_clock()], None
    for last in lab_epochs(raw, epochs, device, checkpoint_dir):
        stamps.append(_clock())
    return _per_epoch(stamps), *last


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=2, help="lab/project runs, alternating who goes first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    raw = generate_raw(SyntheticSpec())
    data = from_raw(raw, source="benchmark", synthetic=True)
    print(f"data: sizes {data.sizes}, dims {data.dims}, T {data.seq_lens['text']}; torch {torch.__version__}, "
          f"{device}, {args.threads} threads, {args.epochs} epochs x {args.rounds} rounds")

    times = {"lab": [], "project": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"lab": lambda: lab_run(raw, args.epochs, device, tmp),
                "project": lambda: project_run(data, args.epochs, device, args.threads)}
        for r in range(1, args.rounds + 1):
            # Alternate who goes first, so warm-up and drifting machine load fall on both alike.
            for name in (("lab", "project") if r % 2 else ("project", "lab")):
                epochs, loss, corr = runs[name]()
                times[name] += epochs
                print(f"round {r}  {name:8s} s/epoch " + " ".join(f"{w:6.3f}" for w, _ in epochs)
                      + "   cpu s/epoch " + " ".join(f"{c:6.3f}" for _, c in epochs)
                      + f"   last train_loss {loss:.4f}  val_Corr {corr:.4f}")

    # Medians: one epoch slowed by another process on the machine should not decide the figure.
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"cpu seconds/epoch (median)   lab {cpu['lab']:.3f}  project {cpu['project']:.3f}  "
          f"ratio {cpu['project'] / cpu['lab']:.3f}")
    print(f"wall seconds/epoch (median)  lab {wall['lab']:.3f}  project {wall['project']:.3f}")
    print(f"speed_ratio {wall['project'] / wall['lab']:.3f}")


if __name__ == "__main__":
    main()
