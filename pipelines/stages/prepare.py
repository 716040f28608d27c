"""Stage 1, prepare: turn a data source (a file path or `synthetic`) into validated, cleaned MOSIData."""

from __future__ import annotations

import os
from pathlib import Path

from msa.data import MOSIData, load
from msa.synthetic import SyntheticSpec, make_synthetic

SYNTHETIC = "synthetic"
# --quick: MOSI's dims and sequence length, a tenth of its samples.
QUICK_SIZES = (160, 64, 96)


def cache_dir() -> Path:
    """Where generated synthetic data is kept between runs ($MSA_CACHE, else ~/.cache/msa)."""
    return Path(os.environ.get("MSA_CACHE") or Path.home() / ".cache" / "msa")


def prepare(source: str = SYNTHETIC, *, quick: bool = False, seed: int = 0) -> MOSIData:
    """Load `source`: `synthetic` (the embedded default; small with `quick`) or a MOSI pickle path."""
    if source == SYNTHETIC:
        spec = SyntheticSpec(sizes=QUICK_SIZES, seed=seed) if quick else SyntheticSpec(seed=seed)
        return make_synthetic(spec, cache_dir=cache_dir())
    return load(source)
