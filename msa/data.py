"""Load, validate and clean MOSI pickles (MultiBench, MulT/CMU, MMSA layouts) into contiguous tensors.

Pickle files can run code when loaded, so they are read with a restricted unpickler that builds only
numpy arrays, numpy dtypes/scalars and plain containers; anything else is refused before it runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from msa.config import MODALITIES

SPLITS: tuple[str, ...] = ("train", "valid", "test")
LABEL_KEYS: tuple[str, ...] = ("labels", "regression_labels")  # MultiBench/MulT, MMSA


class DataError(ValueError):
    """A data file a user brought is not what it must be; the message names the file, split and key."""


# --- containers -------------------------------------------------------------------------------------

@dataclass
class Split:
    """One split held as contiguous float32 tensors; batches are gathered by index, never item by item."""

    name: str
    features: dict[str, torch.Tensor]       # modality -> (N, T, D) float32, zero-padded steps kept
    labels: torch.Tensor                    # (N,) float32 in [-3, 3]
    ids: list[str]
    oracle: torch.Tensor | None = None      # (N,) noise-free expected label; synthetic data only

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self, modalities: Sequence[str], index: torch.Tensor | slice | None = None) -> list[torch.Tensor]:
        """The feature tensors of `modalities` (in that order) for the rows in `index` (all rows if None)."""
        if index is None:
            return [self.features[m] for m in modalities]
        return [self.features[m][index] for m in modalities]


@dataclass
class MOSIData:
    """Three splits plus what is known of where they came from and what cleaning did to them."""

    splits: dict[str, Split]
    source: str                              # the file path, or a description of the generator
    layout: str                              # multibench | mult | mmsa | synthetic
    synthetic: bool
    cleaned: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> modality -> values set to 0
    _digest: str | None = field(default=None, repr=False)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(t.shape[-1]) for m, t in self.splits["train"].features.items()}

    @property
    def seq_lens(self) -> dict[str, int]:
        return {m: int(t.shape[1]) for m, t in self.splits["train"].features.items()}

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(s) for name, s in self.splits.items()}

    @property
    def has_oracle(self) -> bool:
        return all(s.oracle is not None for s in self.splits.values())

    @property
    def digest(self) -> str:
        """Content hash of every feature, label and id, after cleaning: what a run trained on."""
        if self._digest is None:
            h = hashlib.sha256()
            for name in SPLITS:
                s = self.splits[name]
                h.update(name.encode())
                for m in MODALITIES:
                    if m in s.features:
                        t = s.features[m]
                        h.update(f"{m}{tuple(t.shape)}".encode())
                        h.update(t.numpy().tobytes())
                h.update(s.labels.numpy().tobytes())
                h.update("\x1f".join(s.ids).encode())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def summary(self) -> str:
        """A short report a person reads after `prepare`."""
        kind = "SYNTHETIC MOSI-like data (not a MOSI result)" if self.synthetic else "real data"
        lines = [f"{self.source}  [{self.layout} layout, {kind}]  digest {self.digest}"]
        lines.append("  splits:    " + ", ".join(f"{k} {v}" for k, v in self.sizes.items()))
        lines.append("  features:  " + ", ".join(
            f"{m} (T={self.seq_lens[m]}, D={self.dims[m]})" for m in self.dims))
        lo = min(float(s.labels.min()) for s in self.splits.values())
        hi = max(float(s.labels.max()) for s in self.splits.values())
        lines.append(f"  labels:    [{lo:.3f}, {hi:.3f}]")
        for name in SPLITS:
            counts = self.cleaned.get(name, {})
            total = sum(counts.values())
            detail = ", ".join(f"{m} {n}" for m, n in counts.items() if n) or "none"
            lines.append(f"  cleaned:   {name}: {total} non-finite values set to 0 ({detail})")
        if self.has_oracle:
            lines.append("  oracle:    noise-free expected labels available")
        return "\n".join(lines)


# --- safe loading -----------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "complex"),
}
_ALLOWED_PREFIXES = ("numpy.dtypes",)  # numpy 2 dtype classes, e.g. numpy.dtypes.Float32DType


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or module.startswith(_ALLOWED_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (only numpy arrays and plain "
                                     "containers are allowed in a data file)")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file, allowing only numpy arrays, dtypes and plain containers."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: the file is empty, expected a pickle")
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("refused"):
            raise DataError(f"{path}: {msg}") from None
        raise DataError(f"{path}: not a readable pickle, or truncated ({msg})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError, ImportError, OverflowError) as e:
        raise DataError(f"{path}: not a readable pickle, or truncated "
                        f"({type(e).__name__}: {e or 'unexpected end of file'})") from None


def load(path: str | os.PathLike) -> MOSIData:
    """Read a MOSI pickle in any known layout, validate it and clean non-finite features."""
    raw = safe_load_pickle(path)
    return from_raw(raw, source=str(path))


def from_raw(raw: Any, source: str, *, synthetic: bool = False) -> MOSIData:
    """Validate and clean a loaded `{split: {key: array}}` mapping. Dims are read, never assumed."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: expected a dict of splits {list(SPLITS)}, got {type(raw).__name__}")
    for name in SPLITS:
        if name not in raw:
            raise DataError(f"{source}: missing split '{name}' (found {sorted(map(str, raw))}; "
                            f"expected {list(SPLITS)})")
    splits: dict[str, Split] = {}
    cleaned: dict[str, dict[str, int]] = {}
    layout = "synthetic" if synthetic else None
    for name in SPLITS:
        split, counts, split_layout = _read_split(raw[name], name, source)
        splits[name], cleaned[name] = split, counts
        layout = layout or split_layout
    _check_dims_agree(splits, source)
    return MOSIData(splits=splits, source=source, layout=layout or "multibench",
                    synthetic=synthetic, cleaned=cleaned)


def _read_split(d: Any, name: str, source: str) -> tuple[Split, dict[str, int], str]:
    where = f"{source}: split '{name}'"
    if not isinstance(d, Mapping):
        raise DataError(f"{where} is a {type(d).__name__}, expected a dict of arrays")
    for m in MODALITIES:
        if m not in d:
            raise DataError(f"{where} has no key '{m}' (expected {list(MODALITIES)} and one of {list(LABEL_KEYS)})")
    label_key = next((k for k in LABEL_KEYS if k in d), None)
    if label_key is None:
        raise DataError(f"{where} has no key 'labels' or 'regression_labels' (expected the sentiment scores)")

    labels = _as_array(d[label_key], where, label_key)
    n = labels.shape[0] if labels.ndim else 0
    if labels.ndim == 0 or labels.size != n:
        raise DataError(f"{where}: '{label_key}' must have shape (N,), (N, 1) or (N, 1, 1), got {labels.shape}")
    if n == 0:
        raise DataError(f"{where} is empty (0 samples)")
    labels = labels.reshape(n).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(labels))
    if bad.size:
        raise DataError(f"{where}: '{label_key}' has a non-finite value at index {int(bad[0])} "
                        f"({bad.size} in all); labels must be numbers")

    features, counts = {}, {}
    for m in MODALITIES:
        arr = _as_array(d[m], where, m)
        if arr.ndim != 3:
            raise DataError(f"{where}: '{m}' must be 3-D (samples, steps, features), got shape {arr.shape}")
        if arr.shape[0] != n:
            raise DataError(f"{where}: '{m}' has {arr.shape[0]} samples but '{label_key}' has {n}")
        if arr.shape[2] == 0:
            raise DataError(f"{where}: '{m}' has 0 features per step")
        arr = np.array(arr, dtype=np.float32, order="C", copy=True)
        nonfinite = ~np.isfinite(arr)
        counts[m] = int(nonfinite.sum())
        if counts[m]:
            arr[nonfinite] = 0.0
        features[m] = torch.from_numpy(arr)

    ids = _read_ids(d.get("id"), n, name, where)
    oracle = None
    if "oracle" in d:
        o = _as_array(d["oracle"], where, "oracle").reshape(-1).astype(np.float32)
        if o.shape[0] != n:
            raise DataError(f"{where}: 'oracle' has {o.shape[0]} values but '{label_key}' has {n}")
        oracle = torch.from_numpy(o)
    split_layout = "mmsa" if label_key == "regression_labels" else (
        "mult" if features["audio"].shape[-1] != 74 or features["vision"].shape[-1] != 35 else "multibench")
    return Split(name, features, torch.from_numpy(labels), ids, oracle), counts, split_layout


def _as_array(value: Any, where: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise DataError(f"{where}: '{key}' is not an array ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{where}: '{key}' must hold numbers, got dtype {arr.dtype}")
    return arr


def _read_ids(value: Any, n: int, name: str, where: str) -> list[str]:
    if value is None:
        return [f"{name}-{i}" for i in range(n)]
    rows = list(np.asarray(value, dtype=object).reshape(len(value), -1)) if len(value) else []
    if len(rows) != n:
        raise DataError(f"{where}: 'id' has {len(rows)} rows but there are {n} samples")
    return ["$_$".join(_text(x) for x in row) for row in rows]


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _check_dims_agree(splits: Mapping[str, Split], source: str) -> None:
    ref = splits["train"].features
    for name, s in splits.items():
        for m, t in s.features.items():
            if t.shape[-1] != ref[m].shape[-1]:
                raise DataError(f"{source}: '{m}' has {t.shape[-1]} features per step in split '{name}' "
                                f"but {ref[m].shape[-1]} in 'train'")
