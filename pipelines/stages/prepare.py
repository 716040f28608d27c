"""Stage 1, prepare: turn a data source (a file path or `synthetic`) into validated, cleaned MOSIData."""

from __future__ import annotations

import sys

from msa.data import DataError, MOSIData, load
from msa.synthetic import SyntheticSpec, make_synthetic
from pipelines.cache import CACHE_ENV, cache_dir

SYNTHETIC = "synthetic"
# --quick: MOSI's dims and sequence length, a tenth of its samples.
QUICK_SIZES = (160, 64, 96)


def prepare(source: str = SYNTHETIC, *, quick: bool = False, seed: int = 0, partial: bool = False) -> MOSIData:
    """Load `source`: `synthetic` (the embedded default; small with `quick`) or a MOSI pickle path
    (`partial`: a file to predict on, which may lack splits and labels)."""
    if source == SYNTHETIC:
        spec = SyntheticSpec(sizes=QUICK_SIZES, seed=seed) if quick else SyntheticSpec(seed=seed)
        return make_synthetic(spec, cache_dir=cache_dir(), on_cache_error=_warn_cache)
    if not str(source).strip():
        raise DataError(f"the data source is empty (expected a MOSI pickle path or '{SYNTHETIC}')")
    return load(source, partial=partial)


def _warn_cache(message: str) -> None:
    # The cache only saves time, so a broken one is a warning, not an error; say how to move it.
    print(f"warning: {message} (set {CACHE_ENV} to a writable directory to keep it between runs)",
          file=sys.stderr)
