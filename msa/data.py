"""Load, validate and clean MOSI pickles (MultiBench, MulT/CMU, MMSA layouts) into contiguous tensors.

Pickle files can run code when loaded, so they are read with a restricted unpickler that builds only
numpy arrays, numpy dtypes/scalars and plain containers; anything else is refused before it runs.

What a file must hold, checked at load so that a bad file fails here, in one line, and never in training:
- features (N, T, D) with N, T, D >= 1, and labels (N,), (N, 1) or (N, 1, 1), as float or int arrays
  (ints are converted to float32, as float64 and float16 are); bool, complex, string and object arrays
  are refused;
- labels finite and in the annotators' range [-3, 3]; a split holding both `labels` and
  `regression_labels` must hold the same scores in both;
- feature values finite (NaN and +-inf are set to 0 in every modality and counted; MulT, MMSA and
  MultiBench set only audio's -inf to 0, so a NaN from a constant feature reached their models), or at
  most MAX_ABS_FEATURE in size: larger ones are refused, since their float32 squares (LayerNorm's
  variance, Adam's moments) overflow and a run would silently zero the modality or train to NaN;
- ids (optional) strings, byte strings (decoded) or integers (written as decimals), one row per sample;
- padding: sequences padded at the end (MMSA's feature tool) are re-padded at the front, as MultiBench
  and MulT files are and as the models read them (`_padding_to_the_front`);
- valid and test with at least two different labels: runs are selected and compared by correlation,
  which a single sample or constant labels leave undefined (every run would end with NaN).

A file to predict on (`load(path, partial=True)`) may hold any of the three splits, and no labels: its
labels are then NaN and `Split.has_labels` is False.
"""

from __future__ import annotations

import _compat_pickle  # the standard library's table of Python 2 -> 3 names that pickle itself uses
import hashlib
import io
import os
import pickle
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa.config import MODALITIES

SPLITS: tuple[str, ...] = ("train", "valid", "test")
LABEL_KEYS: tuple[str, ...] = ("labels", "regression_labels")  # MultiBench/MulT, MMSA
LABEL_RANGE: tuple[float, float] = (-3.0, 3.0)  # MOSI's annotators score from -3 to 3
_LABEL_SLACK = 1e-3                              # rounding in a file's float labels, not a wrong scale
MAX_ABS_FEATURE = 1e18                           # float32 squares overflow past ~1.8e19


class DataError(ValueError):
    """A data file a user brought is not what it must be; the message names the file, split and key.

    The message is always one line: the CLI prints it as is."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


# --- containers -------------------------------------------------------------------------------------

@dataclass
class Split:
    """One split held as contiguous float32 tensors; batches are gathered by index, never item by item."""

    name: str
    features: dict[str, torch.Tensor]       # modality -> (N, T, D) float32, zero-padded steps kept
    labels: torch.Tensor                    # (N,) float32 in [-3, 3]; NaN in a file without labels
    ids: list[str]
    oracle: torch.Tensor | None = None      # (N,) noise-free expected label; synthetic data only

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_labels(self) -> bool:
        return not bool(torch.isnan(self.labels).any())

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
    synthetic: bool                          # generated, not recorded: never a MOSI result
    cleaned: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> modality -> values set to 0
    repadded: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> modality -> samples whose
    #                                                                   end padding was moved to the front
    _digest: str | None = field(default=None, repr=False)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(t.shape[-1]) for m, t in self._first.features.items()}

    @property
    def seq_lens(self) -> dict[str, int]:
        return {m: int(t.shape[1]) for m, t in self._first.features.items()}

    @property
    def _first(self) -> Split:
        return self.splits.get("train") or next(iter(self.splits.values()))  # a partial file may lack train

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
            for name in (n for n in SPLITS if n in self.splits):
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
        labelled = [s for s in self.splits.values() if s.has_labels]
        if labelled:
            lo = min(float(s.labels.min()) for s in labelled)
            hi = max(float(s.labels.max()) for s in labelled)
            lines.append(f"  labels:    [{lo:.3f}, {hi:.3f}]")
        else:
            lines.append("  labels:    none")
        for name in (n for n in SPLITS if n in self.splits):
            counts = self.cleaned.get(name, {})
            total = sum(counts.values())
            detail = ", ".join(f"{m} {n}" for m, n in counts.items() if n) or "none"
            lines.append(f"  cleaned:   {name}: {total} non-finite values set to 0 ({detail})")
            moved = {m: n for m, n in self.repadded.get(name, {}).items() if n}
            if moved:
                lines.append(f"  padding:   {name}: padded at the end, moved to the front (the models read the last "
                             f"step) in {', '.join(f'{m} {n}' for m, n in moved.items())} samples")
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


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as pickle protocols 0-2 use it, to write bytes (an array's buffer) as text:
    with latin-1 only, so that a file cannot reach any other codec."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refused to load '_codecs.encode' with encoding {encoding!r} (pickle "
                                     "protocols 0-2 write bytes as latin-1 text; nothing else is allowed)")
    return text.encode("latin-1", errors)


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as pickle protocols 0-2 write an empty byte string (an empty array's buffer): with no
    argument only, so that a file cannot ask for a buffer of any size."""
    if args:
        raise pickle.UnpicklingError("refused to load 'builtins.bytes' with arguments (pickle protocols 0-2 "
                                     "call it without any, for an empty byte string)")
    return b""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Python 2's names, which Python 3 also writes with protocols 0-2 (`__builtin__.set`), as Python 3's.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("_codecs", "encode"):  # the bytes of arrays pickled with protocol 0, 1 or 2
            return _latin1_encode
        if (module, name) == ("builtins", "bytes"):
            return _empty_bytes
        if (module, name) in _ALLOWED_GLOBALS or module.startswith(_ALLOWED_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' (only numpy arrays and plain "
                                     "containers are allowed in a data file)")


# What a pickle's place sometimes holds instead, by its first bytes
_OTHER_FORMATS = {
    b"\x1f\x8b": "a gzip-compressed file (decompress it first: gunzip)",
    b"PK\x03\x04": "a zip archive (numpy's .npz is one)",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (the CMU-MultimodalSDK's .csd files are HDF5)",
}


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file, allowing only numpy arrays, dtypes and plain containers."""
    path = Path(path)
    raw = _read_bytes(path)
    if not raw:
        raise DataError(f"{path}: the file is empty, expected a pickle")
    for magic, what in _OTHER_FORMATS.items():
        if raw.startswith(magic):
            raise DataError(f"{path}: {what}, expected a pickle (MultiBench mosi_raw.pkl, MulT mosi_data.pkl or "
                            "MMSA aligned_50.pkl)")
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("refused"):
            raise DataError(f"{path}: {msg}") from None
        raise DataError(f"{path}: not a readable pickle, or truncated ({msg})") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable pickle, or truncated "
                        f"({type(e).__name__}: {e or 'unexpected end of file'})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # e.g. an embedded null byte
        raise DataError(f"{path!r}: not a usable path ({e})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: not a file but a directory (expected a pickle file)")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a file (expected a pickle file, found a device, pipe or socket)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied; the file must be readable by this user)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except MemoryError:
        raise DataError(f"{path}: too large to read into memory ({os.path.getsize(path)} bytes)") from None


def load(path: str | os.PathLike, *, partial: bool = False) -> MOSIData:
    """Read a MOSI pickle in any known layout, validate it and clean non-finite features. `partial`: a
    file to predict on, which may hold only some of the splits and no labels."""
    raw = safe_load_pickle(path)
    return from_raw(raw, source=str(path), partial=partial)


def from_raw(raw: Any, source: str, *, synthetic: bool = False, partial: bool = False) -> MOSIData:
    """Validate and clean a loaded `{split: {key: array}}` mapping. Dims are read, never assumed."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: expected a dict of splits {list(SPLITS)}, got {type(raw).__name__}")
    for name in SPLITS:
        if name not in raw and not partial:
            raise DataError(f"{source}: missing split '{name}' (found {sorted(map(str, raw))}; "
                            f"expected {list(SPLITS)})")
    present = [name for name in SPLITS if name in raw]
    if not present:
        raise DataError(f"{source}: no split {list(SPLITS)} in it (found {sorted(map(str, raw))})")
    splits: dict[str, Split] = {}
    cleaned: dict[str, dict[str, int]] = {}
    repadded: dict[str, dict[str, int]] = {}
    layout = "synthetic" if synthetic else None
    for name in present:
        split, counts, moved, split_layout = _read_split(raw[name], name, source, labels_optional=partial)
        splits[name], cleaned[name], repadded[name] = split, counts, moved
        layout = layout or split_layout
    _check_dims_agree(splits, source)
    if not partial:
        _check_scoreable(splits, source)
    # Noise-free expected labels exist only where a generator made the data: a file holding them (the
    # synthetic set written out, or its cache) is synthetic, whatever path it was read from.
    synthetic = synthetic or any(s.oracle is not None for s in splits.values())
    return MOSIData(splits=splits, source=source, layout=layout or "multibench",
                    synthetic=synthetic, cleaned=cleaned, repadded=repadded)


def _read_split(d: Any, name: str, source: str, *, labels_optional: bool = False
                ) -> tuple[Split, dict[str, int], dict[str, int], str]:
    where = f"{source}: split '{name}'"
    if not isinstance(d, Mapping):
        raise DataError(f"{where} is a {type(d).__name__}, expected a dict of arrays")
    for m in MODALITIES:
        if m not in d:
            raise DataError(f"{where} has no key '{m}' (expected {list(MODALITIES)} and one of {list(LABEL_KEYS)})")
    label_key = next((k for k in LABEL_KEYS if k in d), None)
    if label_key is None and not labels_optional:
        raise DataError(f"{where} has no key 'labels' or 'regression_labels' (expected the sentiment scores)")

    if label_key is None:  # a file to predict on: as many NaN labels as the first modality has samples
        label_key = MODALITIES[0]
        first = _real_array(d[label_key], where, label_key)
        labels = np.full(first.shape[0] if first.ndim else 0, np.nan, dtype=np.float32)
    else:
        labels = _scores(d[label_key], where, label_key)
        for other in (k for k in LABEL_KEYS if k != label_key and k in d):  # two label keys must agree
            others = _scores(d[other], where, other)
            if others.shape != labels.shape or not np.allclose(others, labels, atol=1e-6):
                raise DataError(f"{where} holds both '{label_key}' and '{other}', which disagree ("
                                + (f"first at index {int(np.argmax(~np.isclose(others, labels, atol=1e-6)))}"
                                   if others.shape == labels.shape else f"{others.shape[0]} against {labels.shape[0]} "
                                   "values") + "): expected one of them, or the same scores in both")
    n = labels.shape[0]
    if n == 0:
        raise DataError(f"{where} is empty (0 samples)")

    features, counts = {}, {}
    for m in MODALITIES:
        features[m], counts[m] = _features(d[m], where, m, n, label_key)
    features, moved = _padding_to_the_front(features)

    ids = _read_ids(d.get("id"), n, name, where)
    oracle = None
    if "oracle" in d:
        o = _scores(d["oracle"], where, "oracle")
        if o.shape[0] != n:
            raise DataError(f"{where}: 'oracle' has {o.shape[0]} values but '{label_key}' has {n}")
        oracle = torch.from_numpy(o)
    split_layout = "mmsa" if label_key == "regression_labels" else (
        "mult" if features["audio"].shape[-1] != 74 or features["vision"].shape[-1] != 35 else "multibench")
    return Split(name, features, torch.from_numpy(labels), ids, oracle), counts, moved, split_layout


def _real_array(value: Any, where: str, key: str) -> np.ndarray:
    """`value` as a numpy array of real numbers (float or int dtype), or a DataError saying what it is."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:  # ragged lists and the like
        raise DataError(f"{where}: '{key}' is not an array of one shape ({e})") from None
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{where}: '{key}' must hold real numbers (a float or int array), got dtype {arr.dtype}")
    return arr


def _scores(value: Any, where: str, key: str) -> np.ndarray:
    """Sentiment scores (labels or oracle) as (N,) float32: finite and in LABEL_RANGE."""
    arr = _real_array(value, where, key)
    if arr.ndim not in (1, 2, 3) or any(k != 1 for k in arr.shape[1:]):
        raise DataError(f"{where}: '{key}' must have shape (N,), (N, 1) or (N, 1, 1), got {arr.shape}")
    arr = arr.reshape(arr.shape[0])
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(f"{where}: '{key}' has a non-finite value at index {int(bad[0])} "
                        f"({bad.size} in all); labels must be numbers")
    lo, hi = LABEL_RANGE
    bad = np.flatnonzero((arr < lo - _LABEL_SLACK) | (arr > hi + _LABEL_SLACK))
    if bad.size:
        raise DataError(f"{where}: '{key}' must be sentiment scores in [{lo:g}, {hi:g}], got {float(arr[bad[0]]):g} "
                        f"at index {int(bad[0])} ({bad.size} outside in all)")
    return arr.astype(np.float32)


def _features(value: Any, where: str, key: str, n: int, label_key: str) -> tuple[torch.Tensor, int]:
    """(N, T, D) features as a contiguous float32 tensor with non-finite values set to 0, and their count."""
    arr = _real_array(value, where, key)
    if arr.ndim != 3:
        raise DataError(f"{where}: '{key}' must be 3-D (samples, steps, features), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise DataError(f"{where}: '{key}' has {arr.shape[0]} samples but '{label_key}' has {n}")
    if arr.shape[1] == 0:
        raise DataError(f"{where}: '{key}' has sequences of 0 steps, shape {arr.shape} (expected at least 1 step)")
    if arr.shape[2] == 0:
        raise DataError(f"{where}: '{key}' has 0 features per step")
    if _largest(arr.dtype) > MAX_ABS_FEATURE:  # float16 and int32 cannot hold such values
        huge = ((arr > MAX_ABS_FEATURE) | (arr < -MAX_ABS_FEATURE)) & np.isfinite(arr)
        if huge.any():
            at = tuple(int(i) for i in np.argwhere(huge)[0])
            raise DataError(f"{where}: '{key}' holds {int(huge.sum())} finite values beyond +-{MAX_ABS_FEATURE:g}, "
                            f"the first {float(arr[at]):g} at {list(at)} (float32 training overflows on them; "
                            "rescale the features, or set such values to NaN to have them cleaned to 0)")
    arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    nonfinite = ~np.isfinite(arr)
    count = int(nonfinite.sum())
    if count:
        arr[nonfinite] = 0.0
    return torch.from_numpy(arr), count


def _padding_to_the_front(features: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Features padded at the end (MMSA's feature tool pads 'back') as the models read them: padded at
    the front, as MultiBench and MulT files are, so that a sequence's last step is its last word.
    Which side a split pads on, and each sample's length, are read off the text (a word's vector is
    never all zero; a face or a voice may be, at any step): the split pads at the end when more of its
    samples start with a word and end all-zero than the reverse. Every modality of the text's length
    (word-aligned) then moves by the text's padding, so that the modalities stay aligned; a modality
    of its own length (unaligned files) by its own. A front-padded split, or one that pads nowhere, is
    left exactly as it is. Returns the features and, per modality, how many samples moved."""
    text = features["text"]
    lengths = _lengths(text)
    if lengths is None:
        return features, {m: 0 for m in features}
    out, moved = {}, {}
    for m, x in features.items():
        own = lengths if x.shape[1] == text.shape[1] else _lengths(x, decided=True)
        out[m], moved[m] = _shifted(x, own)
    return out, moved


def _lengths(x: torch.Tensor, *, decided: bool = False) -> torch.Tensor | None:
    """Each sample's length up to its last step holding a feature, when `x` pads at the end (or when
    the text has `decided` so); None when it pads at the front or not at all."""
    used = x.ne(0).any(dim=2)                                       # (N, T): steps holding a feature
    if not decided and int((used[:, 0] & ~used[:, -1]).sum()) <= int((~used[:, 0] & used[:, -1]).sum()):
        return None
    t = torch.arange(x.shape[1])
    return torch.where(used, t + 1, 0).amax(dim=1)


def _shifted(x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Each sample's first `lengths` steps moved to the end (its trailing steps, padding, to the front)."""
    if lengths is None:
        return x, 0
    steps = x.shape[1]
    t = torch.arange(steps)
    shift = (steps - lengths) % steps                               # a full or an empty sample stays put
    source = (t.unsqueeze(0) - shift.unsqueeze(1)) % steps          # out[i, t] = x[i, t - shift_i]
    return torch.gather(x, 1, source.unsqueeze(2).expand_as(x)).contiguous(), int((shift > 0).sum())


def _largest(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).max if dtype.kind == "f" else np.iinfo(dtype).max)


def _read_ids(value: Any, n: int, name: str, where: str) -> list[str]:
    if value is None:
        return [f"{name}-{i}" for i in range(n)]
    try:
        arr = np.asarray(value, dtype=object)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
        raise DataError(f"{where}: 'id' is not an array of one shape ({e})") from None
    if arr.ndim == 0:
        raise DataError(f"{where}: 'id' must have one row per sample, got a single {type(value).__name__}")
    if arr.shape[0] != n:
        raise DataError(f"{where}: 'id' has {arr.shape[0]} rows but there are {n} samples")
    rows = arr.reshape(n, -1)
    for i, row in enumerate(rows):
        for x in row:
            if not isinstance(x, (str, bytes, int, np.integer)) or isinstance(x, bool):
                raise DataError(f"{where}: 'id' rows must hold strings, byte strings or integers, got "
                                f"{type(x).__name__} {_short(x)} in row {i}")
    return ["$_$".join(_text(x) for x in row) for row in rows]


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _short(x: Any, width: int = 40) -> str:
    text = " ".join(repr(x).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_scoreable(splits: Mapping[str, Split], source: str) -> None:
    """Valid and test must have two different labels at least: a correlation with them is defined."""
    for name in ("valid", "test"):
        labels = splits[name].labels
        if labels.numel() < 2:
            raise DataError(f"{source}: split '{name}' has 1 sample (expected at least 2 with different "
                            "sentiment scores: runs are selected and compared by correlation on it)")
        if bool((labels == labels[0]).all()):
            raise DataError(f"{source}: split '{name}': all {labels.numel()} labels are {float(labels[0]):g} "
                            "(expected at least 2 different sentiment scores: the correlation that runs are "
                            "selected and compared by is undefined on constant labels)")


def _check_dims_agree(splits: Mapping[str, Split], source: str) -> None:
    first = "train" if "train" in splits else next(iter(splits))
    ref = splits[first].features
    for name, s in splits.items():
        for m, t in s.features.items():
            if t.shape[-1] != ref[m].shape[-1]:
                raise DataError(f"{source}: '{m}' has {t.shape[-1]} features per step in split '{name}' "
                                f"but {ref[m].shape[-1]} in '{first}'")
