"""A synthetic MOSI-like data set: the embedded default, since real MOSI cannot be downloaded here.

It has the lab file's layout, dims (vision 35, text 300, audio 74), 50 front-padded steps and split
sizes (1284/229/686), and is built so that the lab's questions have real answers:

- text carries most of the polarity: GloVe-like word vectors whose projection on a hidden axis is
  the word's sentiment, in 3-word phrases where a negator flips and an intensifier doubles the next
  sentiment word. One sentiment word in five is negated, so word order matters: a sequence model
  reads the text better than a bag of words can;
- vision shows an expression the words do not say (a weak polarity cue on its own, a gain when
  fused with text);
- audio shows arousal, which scales how strongly the sentiment is felt, and almost no polarity:
  useless alone, a gain in magnitude when fused. Its columns are scaled like raw COVAREP's, with a
  few `-inf` values;
- every utterance has its own recording gain on audio and vision (and level on vision), and word
  vectors have GloVe-like varying norms: nuisances that a per-step LayerNorm removes and a model
  without it must learn around, which is the lab's LayerNorm question;
- labels are means of 5 simulated annotators' integer scores in [-3, 3] (MOSI's grid), and every
  sample ships its noise-free expected label, the oracle, so reports can show the reachable best.

Every number here is SYNTHETIC; nothing made from it is a MOSI result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import ndtr

from msa.config import stable_hash
from msa.data import SPLITS, DataError, MOSIData, from_raw, load

MOSI_SIZES = (1284, 229, 686)
_log = logging.getLogger(__name__)


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
    polar_words: int = 400                     # vocabulary entries that carry sentiment
    polarity_scale: float = 1.5                # length of a sentiment word's vector along the polarity axis
    negation: float = 0.2                      # chance that a sentiment word is negated
    intensify: float = 0.2                     # chance that it is intensified (x2) instead
    annotators: int = 5
    annotator_noise: float = 1.1               # std of one annotator's score around the true sentiment
    vision_weight: float = 0.4                 # an expression the words do not carry, against text's 1
    arousal_weight: float = 0.4                # how strongly vocal arousal scales the sentiment
    gain_spread: float = 1.0                   # log-std of per-utterance recording gain (audio, vision)
    inf_rate: float = 0.002                    # share of real audio steps holding one -inf

    def __post_init__(self):
        problems = []
        if len(self.sizes) != 3 or not all(isinstance(k, int) and k >= 2 for k in self.sizes):
            problems.append(f"sizes must be three integers >= 2 (train, valid, test), got {self.sizes!r}")
        if self.seq_len < 3:
            problems.append(f"seq_len must be >= 3 (the shortest utterance has 3 words), got {self.seq_len}")
        if min(self.vision_dim, self.text_dim, self.audio_dim) < 1:
            problems.append("vision_dim, text_dim and audio_dim must be >= 1")
        if self.text_dim < 3:
            problems.append(f"text_dim must be >= 3 (polarity, negation and intensity axes), got {self.text_dim}")
        if self.polar_words < 1 or self.vocab <= _FIRST_POLAR + self.polar_words:
            problems.append(f"need 1 <= polar_words and vocab > {_FIRST_POLAR} + polar_words (room for neutral "
                            f"words), got vocab={self.vocab}, polar_words={self.polar_words}")
        if not (0 <= self.negation and 0 <= self.intensify and self.negation + self.intensify <= 1):
            problems.append(f"negation and intensify are chances: >= 0 with a sum <= 1, "
                            f"got {self.negation} and {self.intensify}")
        if self.annotators < 1 or self.annotator_noise <= 0:
            problems.append("annotators must be >= 1 and annotator_noise > 0")
        if not 0 <= self.inf_rate <= 1:
            problems.append(f"inf_rate must be in [0, 1], got {self.inf_rate}")
        if problems:
            raise ValueError("SyntheticSpec: " + "; ".join(problems))

    def key(self) -> str:
        # The cache key: bump the generator's name whenever a change would alter its output.
        return stable_hash({"generator": "msa-synthetic-v2", **asdict(self)})


def make_synthetic(spec: SyntheticSpec | None = None, *, cache_dir: str | Path | None = None,
                   on_cache_error: Callable[[str], None] | None = None, **overrides: Any) -> MOSIData:
    """Generate (or read from `cache_dir`) the synthetic data set, validated and cleaned like a real file.

    The cache only saves time: a cache that cannot be read or written is reported through
    `on_cache_error` (one line; default: a logging warning) and the data is generated in memory.
    Several processes may fill one cache at once: each writes its own temporary file and renames it
    into place, so a reader sees either no file or a whole one."""
    if spec is None:
        spec = SyntheticSpec(**overrides)
    elif overrides:
        raise TypeError("pass either a SyntheticSpec or keyword overrides, not both")
    source = f"synthetic(seed={spec.seed}, sizes={'/'.join(map(str, spec.sizes))})"
    if cache_dir is None:
        return from_raw(generate_raw(spec), source=source, synthetic=True)
    warn = on_cache_error or _log.warning
    path = Path(cache_dir) / f"synthetic-{spec.key()}.pkl"
    data = _read_cache(path, warn)
    if data is None:
        raw = generate_raw(spec)
        data = from_raw(raw, source=source, synthetic=True)
        try:
            _write_atomically(raw, path)
        except OSError as e:
            warn(f"cannot write the synthetic data cache in {path.parent} ({_reason(path.parent, e)}); "
                 "generated the data in memory instead")
    data.source, data.synthetic, data.layout = source, True, "synthetic"
    return data


def _read_cache(path: Path, warn: Callable[[str], None]) -> MOSIData | None:
    try:
        if not path.is_file():
            return None
    except OSError:  # an unreadable cache directory: as good as empty
        return None
    try:
        return load(path)
    except DataError as e:  # a damaged or unreadable cache file is made again, never a failed run
        warn(f"ignored the cached synthetic data: {e}; generated it again")
        return None


def _write_atomically(raw: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # one per writer: writers never share it
    try:
        write_pickle(raw, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _reason(directory: Path, error: OSError) -> str:
    if os.path.exists(directory) and not os.path.isdir(directory):  # os.path: never raises
        return "it is a file, not a directory"
    return error.strerror or str(error)


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
    embed, polarity, neutral_p = _vocabulary(rng, spec)
    words, lengths = _utterances(rng, spec, n, neutral_p)
    real = words >= 0                                          # (N, T) True on real steps

    # --- the true sentiment: what the words say, an expression they do not, scaled by vocal arousal
    text_z = _read_words(words, polarity)
    text_z /= text_z.std() + 1e-8
    cue = rng.standard_normal(n)                               # shown by the face only
    arousal = rng.standard_normal(n)                           # heard in the voice only
    valence = (text_z + spec.vision_weight * cue) / np.sqrt(1 + spec.vision_weight ** 2)
    mu = 3.0 * np.tanh(0.75 * np.exp(spec.arousal_weight * arousal) * valence)
    scores = np.clip(np.round(mu[:, None] + rng.normal(0, spec.annotator_noise, (n, spec.annotators))), -3, 3)
    labels = scores.mean(axis=1)
    oracle = expected_label(mu, spec.annotator_noise)

    text = embed[np.maximum(words, 0)] * real[..., None]       # (N, T, 300)
    vision = _vision(rng, spec, n, T, cue) * real[..., None]
    audio = _audio(rng, spec, n, T, arousal, mu) * real[..., None]
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


# Word ids: 0-9 negators, 10-19 intensifiers, then sentiment words, then neutral words.
_NEGATORS, _INTENSIFIERS, _FIRST_POLAR = range(10), range(10, 20), 20


def _vocabulary(rng, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GloVe-like vectors: noise around a few shared axes (polarity, negation, intensity), with word
    norms that vary as GloVe's do. Returns (vectors, polarity per word, neutral-word frequencies)."""
    axes = np.linalg.qr(rng.standard_normal((spec.text_dim, 3)))[0].T       # 3 orthonormal axes
    embed = rng.normal(0, 0.35, (spec.vocab, spec.text_dim))
    embed -= (embed @ axes.T) @ axes                                          # noise is off the axes
    polar = slice(_FIRST_POLAR, _FIRST_POLAR + spec.polar_words)
    polarity = np.zeros(spec.vocab)
    polarity[polar] = rng.choice([-1.0, 1.0], spec.polar_words) * rng.uniform(0.5, 1.5, spec.polar_words)
    embed += np.outer(spec.polarity_scale * polarity, axes[0])
    embed[_NEGATORS] += 1.5 * axes[1]
    embed[_INTENSIFIERS] += 1.5 * axes[2]
    embed *= rng.lognormal(0.0, 0.4, (spec.vocab, 1))                         # word norms vary
    neutral_p = np.zeros(spec.vocab)
    first_neutral = _FIRST_POLAR + spec.polar_words
    neutral_p[first_neutral:] = 1.0 / np.arange(1, spec.vocab - first_neutral + 1) ** 0.9   # Zipf-like
    return embed, polarity, neutral_p / neutral_p.sum()


def _utterances(rng, spec: SyntheticSpec, n: int, neutral_p: np.ndarray):
    """Word ids (N, T), -1 on the front padding, and each utterance's length (around MOSI's ~12).

    An utterance is a run of 3-word phrases, aligned to its end, after `length % 3` neutral words.
    About 60% of the phrases (at least one) end in a sentiment word; one of the two slots before it
    may hold a modifier: a negator (flips it) or an intensifier (doubles it). The other phrases, and
    every other slot, hold neutral words."""
    T = spec.seq_len
    lengths = np.clip(np.round(rng.lognormal(np.log(12), 0.5, n)), 3, T).astype(int)
    words = np.full((n, T), -1)
    for i, length in enumerate(lengths):
        row = rng.choice(spec.vocab, size=length, p=neutral_p)
        phrases = length // 3
        chosen = rng.choice(phrases, size=max(1, rng.binomial(phrases, 0.6)), replace=False)
        for k in chosen:
            end = length - 1 - 3 * k                                   # phrase ends at `end`
            row[end] = _FIRST_POLAR + rng.integers(spec.polar_words)
            u = rng.random()
            modifier = (_NEGATORS[rng.integers(len(_NEGATORS))] if u < spec.negation else
                        _INTENSIFIERS[rng.integers(len(_INTENSIFIERS))] if u < spec.negation + spec.intensify
                        else None)
            if modifier is not None:
                row[end - 1 - rng.integers(2)] = modifier               # right before, or one word earlier
        words[i, T - length:] = row
    return words, lengths


def _read_words(words: np.ndarray, polarity: np.ndarray) -> np.ndarray:
    """What the words say, read left to right: each sentiment word adds its polarity, flipped by an
    odd number of negators since the previous sentiment word and doubled after an intensifier.
    Scaled by 1/sqrt(number of sentiment words), so long utterances are not more extreme."""
    n, T = words.shape
    score, count = np.zeros(n), np.zeros(n)
    negate, boost = np.zeros(n, dtype=bool), np.ones(n)
    for t in range(T):
        w = words[:, t]
        s = np.where(w >= 0, polarity[np.maximum(w, 0)], 0.0)
        carries = s != 0
        score += np.where(carries, np.where(negate, -s, s) * boost, 0.0)
        count += carries
        is_neg = (w >= _NEGATORS.start) & (w < _NEGATORS.stop)
        is_int = (w >= _INTENSIFIERS.start) & (w < _INTENSIFIERS.stop)
        negate = np.where(carries, False, negate) ^ is_neg
        boost = np.where(carries, 1.0, np.where(is_int, 2.0, boost))
    return score / np.sqrt(np.maximum(count, 1))


def _vision(rng, spec: SyntheticSpec, n: int, T: int, cue: np.ndarray) -> np.ndarray:
    # A few "action unit" columns show the expression, over per-utterance face offsets and frame noise;
    # the camera's distance and exposure scale and shift every column of an utterance together.
    loading = np.zeros(spec.vision_dim)
    loading[: min(6, spec.vision_dim)] = rng.uniform(0.4, 0.9, min(6, spec.vision_dim))
    face = rng.normal(0, 0.5, (n, 1, spec.vision_dim))
    frames = rng.normal(0, 1.0, (n, T, spec.vision_dim))
    x = face + frames + cue[:, None, None] * loading
    gain = rng.lognormal(0.0, spec.gain_spread, (n, 1, 1))
    return gain * x + rng.normal(0, 2.0, (n, 1, 1))


def _audio(rng, spec: SyntheticSpec, n: int, T: int, arousal: np.ndarray, mu: np.ndarray) -> np.ndarray:
    # Loudness/pitch-range columns follow arousal (and, barely, the sign of the sentiment); columns are
    # scaled like raw COVAREP (Hz, dB next to unit-free ones), and a per-utterance recording gain
    # multiplies all of them, so only their ratios carry arousal: that is what the input LayerNorm is for.
    loading = np.zeros(spec.audio_dim)
    loading[: min(8, spec.audio_dim)] = rng.uniform(0.5, 1.0, min(8, spec.audio_dim))
    level = arousal + 0.1 * mu
    frames = rng.normal(0, 1.0, (n, T, spec.audio_dim)) + level[:, None, None] * loading
    scale = np.exp(rng.uniform(np.log(0.05), np.log(80.0), spec.audio_dim))
    offset = rng.normal(0, 3.0, spec.audio_dim) * scale
    gain = rng.lognormal(0.0, spec.gain_spread, (n, 1, 1))
    return gain * (frames * scale + offset)
