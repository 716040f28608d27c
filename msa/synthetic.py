"""A synthetic MOSI-like data set: the embedded default, since real MOSI cannot be downloaded here.

It has the lab file's layout, dims (vision 35, text 300, audio 74), 50 front-padded steps and split
sizes (1284/229/686), and is built so that the lab's questions have real answers:

- text carries polarity: GloVe-like word vectors whose projection on a hidden direction is the
  word's sentiment, with negators that flip and intensifiers that boost the next sentiment word,
  so word order matters and a sequence model beats a bag of words;
- vision carries a weak polarity cue (an expression the words do not say);
- audio carries intensity (|sentiment|) and almost no polarity, on badly scaled columns with a few
  `-inf` values, as COVAREP's do;
- labels are means of 5 simulated annotators' integer scores in [-3, 3] (MOSI's grid), and every
  sample ships its noise-free expected label, the oracle, so reports can show the reachable best.

Every number here is SYNTHETIC; nothing made from it is a MOSI result.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import ndtr

from msa.config import stable_hash
from msa.data import SPLITS, MOSIData, from_raw, load

MOSI_SIZES = (1284, 229, 686)


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the generator; the defaults mimic the lab's `mosi_raw.pkl`."""

    sizes: tuple[int, int, int] = MOSI_SIZES   # train, valid, test
    seq_len: int = 50
    vision_dim: int = 35
    text_dim: int = 300
    audio_dim: int = 74
    seed: int = 0
    vocab: int = 3000
    annotators: int = 5
    annotator_noise: float = 1.1               # std of one annotator's score around the true sentiment
    text_weight: float = 1.0                   # how strongly words drive the true sentiment
    vision_weight: float = 0.45                # an expression cue the words do not carry
    inf_rate: float = 0.002                    # share of real audio steps holding one -inf

    def key(self) -> str:
        return stable_hash({"generator": "msa-synthetic-v1", **asdict(self)})


def make_synthetic(spec: SyntheticSpec | None = None, *, cache_dir: str | Path | None = None,
                   **overrides: Any) -> MOSIData:
    """Generate (or read from `cache_dir`) the synthetic data set, validated and cleaned like a real file."""
    if spec is None:
        spec = SyntheticSpec(**overrides)
    elif overrides:
        raise TypeError("pass either a SyntheticSpec or keyword overrides, not both")
    source = f"synthetic(seed={spec.seed}, sizes={'/'.join(map(str, spec.sizes))})"
    if cache_dir is not None:
        path = Path(cache_dir) / f"synthetic-{spec.key()}.pkl"
        if path.is_file():
            data = load(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = generate_raw(spec)
            tmp = path.with_suffix(".tmp")
            write_pickle(raw, tmp)
            tmp.replace(path)  # atomic: parallel workers never read half a file
            data = from_raw(raw, source=source, synthetic=True)
        data.source, data.synthetic, data.layout = source, True, "synthetic"
        return data
    return from_raw(generate_raw(spec), source=source, synthetic=True)


def write_pickle(raw: dict[str, dict[str, np.ndarray]], path: str | Path) -> None:
    """Write a `{split: {key: array}}` dict as a pickle in the MultiBench `mosi_raw.pkl` layout."""
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=4)


def expected_label(mu: np.ndarray, noise: float) -> np.ndarray:
    """E[round(clip(mu + N(0, noise^2), -3, 3))]: one annotator's expected integer score.

    P(score > j) = P(mu + e >= j + 0.5) for j = -3..2, and E[score] = -3 + sum_j P(score > j).
    """
    thresholds = np.arange(-3, 3) + 0.5                      # (6,)
    return -3.0 + ndtr((mu[:, None] - thresholds[None, :]) / noise).sum(axis=1)


def generate_raw(spec: SyntheticSpec) -> dict[str, dict[str, np.ndarray]]:
    """The data set as the MultiBench layout: features (N, T, D), labels (N, 1, 1), ids, and `oracle`."""
    rng = np.random.default_rng(spec.seed)
    n, T = sum(spec.sizes), spec.seq_len

    # --- vocabulary: GloVe-like vectors; sentiment is a noisy linear read-out of the vector
    direction = _unit(rng.standard_normal(spec.text_dim))
    polarity = np.where(rng.random(spec.vocab) < 0.3, rng.normal(0, 1.0, spec.vocab), 0.0)
    polarity[:20] = 0.0                                       # 0-9 negators, 10-19 intensifiers
    embed = rng.normal(0, 0.35, (spec.vocab, spec.text_dim))
    embed -= np.outer(embed @ direction, direction)           # only `polarity` lies along `direction`
    embed += np.outer(1.2 * polarity, direction)
    freq = 1.0 / np.arange(1, spec.vocab + 1) ** 0.9          # Zipf-like word frequencies
    freq[:20] = 0.0
    freq /= freq.sum()

    # --- utterances: lengths around MOSI's ~12 words, front-padded to T steps
    lengths = np.clip(np.round(rng.lognormal(np.log(12), 0.5, n)), 3, T).astype(int)
    real = np.arange(T)[None, :] >= (T - lengths)[:, None]   # (N, T) True on real steps
    words = rng.choice(spec.vocab, size=(n, T), p=freq)
    special = rng.random((n, T))
    words = np.where(special < 0.07, rng.integers(0, 10, (n, T)), words)                 # negators
    words = np.where((special >= 0.07) & (special < 0.12), rng.integers(10, 20, (n, T)), words)

    # --- text sentiment: negation flips and intensifiers boost the next sentiment-bearing word
    score = np.zeros(n)
    negate = np.zeros(n, dtype=bool)
    boost = np.ones(n)
    for t in range(T):
        w, on = words[:, t], real[:, t]
        is_neg, is_int = on & (w < 10), on & (w >= 10) & (w < 20)
        s = np.where(on, polarity[w], 0.0)
        carries = s != 0
        score += np.where(carries, np.where(negate, -s, s) * boost, 0.0)
        negate = np.where(carries, False, negate) ^ is_neg
        boost = np.where(carries, 1.0, np.where(is_int, 2.0, boost))
    score /= np.sqrt(lengths / 4.0)
    text_z = score / (score.std() + 1e-8)

    # --- the true sentiment, its annotation, and what each modality shows of it
    cue = rng.standard_normal(n)                              # expression not carried by words
    mu = 3.0 * np.tanh(0.6 * (spec.text_weight * text_z + spec.vision_weight * cue))
    scores = np.clip(np.round(mu[:, None] + rng.normal(0, spec.annotator_noise, (n, spec.annotators))), -3, 3)
    labels = scores.mean(axis=1)
    oracle = expected_label(mu, spec.annotator_noise)

    text = embed[words] * real[..., None]                     # (N, T, 300)
    vision = _vision(rng, spec, n, T, cue, mu) * real[..., None]
    audio = _audio(rng, spec, n, T, mu) * real[..., None]
    inf_at = real & (rng.random((n, T)) < spec.inf_rate)
    audio[inf_at, rng.integers(0, spec.audio_dim, int(inf_at.sum()))] = -np.inf

    ids = np.array([f"synth{i:05d}$_${int(lengths[i])}" for i in range(n)])
    order = rng.permutation(n)
    raw, start = {}, 0
    for name, size in zip(SPLITS, spec.sizes):
        idx = order[start:start + size]
        start += size
        raw[name] = {
            "vision": vision[idx].astype(np.float32), "text": text[idx].astype(np.float32),
            "audio": audio[idx].astype(np.float32), "labels": labels[idx].reshape(-1, 1, 1).astype(np.float32),
            "id": ids[idx], "oracle": oracle[idx].astype(np.float32),
        }
    return raw


def _vision(rng, spec: SyntheticSpec, n: int, T: int, cue: np.ndarray, mu: np.ndarray) -> np.ndarray:
    # A few "action unit" columns follow the expression; per-speaker offsets dominate the rest.
    loading = np.zeros(spec.vision_dim)
    loading[: min(6, spec.vision_dim)] = rng.uniform(0.3, 0.8, min(6, spec.vision_dim))
    expression = 0.35 * cue + 0.05 * mu / 3.0                  # (N,)
    speaker = rng.normal(0, 1.0, (n, 1, spec.vision_dim))
    frames = rng.normal(0, 1.0, (n, T, spec.vision_dim))
    return speaker + frames + expression[:, None, None] * loading[None, None, :] * 2.0


def _audio(rng, spec: SyntheticSpec, n: int, T: int, mu: np.ndarray) -> np.ndarray:
    # Loudness/pitch columns follow intensity |mu|, barely its sign; columns are scaled like raw
    # COVAREP (Hz, dB next to unit-free ones), which is what the input LayerNorm is for.
    intensity = np.abs(mu) / 3.0 - 0.3 + 0.01 * mu           # (N,)
    loading = np.zeros(spec.audio_dim)
    loading[: min(8, spec.audio_dim)] = rng.uniform(0.5, 1.0, min(8, spec.audio_dim))
    frames = rng.normal(0, 1.0, (n, T, spec.audio_dim)) + intensity[:, None, None] * loading * 1.5
    scale = np.exp(rng.uniform(np.log(0.05), np.log(80.0), spec.audio_dim))
    offset = rng.normal(0, 3.0, spec.audio_dim) * scale
    return frames * scale + offset


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)
