"""Shared fixtures: tiny synthetic MOSI-like data with the real dims, made once per session."""

import os

import pytest

os.environ.setdefault("MSA_PROGRESS", "0")  # no progress bars in test logs

import torch

from msa.synthetic import make_synthetic

# One intra-op thread: tests train tiny models, for which more threads only add contention on
# a 2-core CI machine (and worker processes the pipeline tests start need the other core).
torch.set_num_threads(1)

TINY_SIZES = (48, 24, 24)


@pytest.fixture(scope="session")
def tiny_data():
    """48/24/24 samples, 12 steps, vision 35, text 300, audio 74 (with some -inf cleaned to 0)."""
    return make_synthetic(sizes=TINY_SIZES, seq_len=12, seed=0, inf_rate=0.02)
