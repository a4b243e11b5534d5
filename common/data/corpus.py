"""A generated, deterministic, learnable spoken corpus ("tone speech") in lhotse manifests.

Every word of a small vocabulary is rendered as its own two-tone pattern; an utterance is 1-8
words spoken at a random rate, with pitch jitter, gaps and background noise. A model has to
learn the word -> sound mapping from audio, like a real speech corpus, but the corpus is made
in seconds, needs no download and is identical on every machine for the same settings.

Usage::

    from common.data.corpus import ensure_tone_corpus
    manifests = ensure_tone_corpus("data", seed=0, num_train=2000, num_val=128)
    manifests["train"]  # -> Path to a lhotse CutSet manifest (.jsonl.gz)

Several processes (torchrun ranks, pods sharing a volume) may call it at once: a file lock makes
one of them write the corpus while the others wait, and a marker file makes later calls free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from filelock import FileLock

log = logging.getLogger(__name__)

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel "
    "india juliet kilo lima mike november oscar papa"
).split()

# Tone frequencies (Hz), log-spaced so every pair is well apart on a mel scale.
_TONES_HZ = tuple(float(f) for f in np.geomspace(300.0, 3000.0, 8).round(1))


def word_patterns() -> dict[str, tuple[float, float]]:
    """The fixed word -> (first tone Hz, second tone Hz) mapping: the corpus' "language"."""
    pairs = [(a, b) for a in range(len(_TONES_HZ)) for b in range(len(_TONES_HZ)) if a != b]
    order = np.random.default_rng(1234).permutation(len(pairs))
    return {w: (_TONES_HZ[pairs[i][0]], _TONES_HZ[pairs[i][1]]) for w, i in zip(WORDS, order)}


@dataclass(frozen=True)
class ToneCorpusSpec:
    seed: int = 0
    num_train: int = 2000
    num_val: int = 128
    sample_rate: int = 16000
    min_words: int = 1
    max_words: int = 8
    tone_s: float = 0.09
    pattern: str = "sequence"  # "sequence": a word's two tones one after the other; "chord": together
    snr_db: tuple[float, float] = (15.0, 30.0)
    version: int = 2  # 2: word alignments in the supervisions (same audio as 1)

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _render(words: list[str], rng: np.random.Generator, spec: ToneCorpusSpec) -> tuple[np.ndarray, list[tuple]]:
    """(audio, [(word, start_s, duration_s), ...]); a word's span runs from its first tone to its last."""
    sr = spec.sample_rate
    patterns = word_patterns()
    rate = rng.uniform(0.8, 1.25)  # speaking rate: one factor per utterance
    pitch = rng.uniform(0.97, 1.03)  # speaker pitch: one factor per utterance
    pieces = [np.zeros(int(sr * rng.uniform(0.05, 0.15)))]
    spans = []
    for word in words:
        word_start = sum(len(p) for p in pieces)
        tones = [patterns[word]] if spec.pattern == "chord" else [(f,) for f in patterns[word]]
        for chord in tones:
            n = int(sr * spec.tone_s * (2 if spec.pattern == "chord" else 1) / rate * rng.uniform(0.9, 1.1))
            t = np.arange(n) / sr
            tone = np.zeros(n)
            for f in chord:
                freq = f * pitch * rng.uniform(0.99, 1.01)
                tone += np.sin(2 * math.pi * freq * t + rng.uniform(0, 2 * math.pi))
                tone += 0.3 * np.sin(4 * math.pi * freq * t)  # a harmonic, as voices have
            fade = min(n // 2, int(0.01 * sr))
            env = np.ones(n)
            env[:fade] = np.linspace(0, 1, fade)
            env[n - fade :] = np.linspace(1, 0, fade)
            pieces.append(tone * env * rng.uniform(0.5, 1.0))
        spans.append((word, word_start / sr, (sum(len(p) for p in pieces) - word_start) / sr))
        pieces.append(np.zeros(int(sr * rng.uniform(0.03, 0.08) / rate)))
    pieces.append(np.zeros(int(sr * rng.uniform(0.05, 0.15))))
    signal = np.concatenate(pieces)
    snr_db = rng.uniform(*spec.snr_db)
    noise = rng.standard_normal(len(signal))
    noise *= np.sqrt(np.mean(signal**2) / 10 ** (snr_db / 10))
    audio = signal + noise
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32), spans


def _write_split(root: Path, split: str, count: int, rng: np.random.Generator, spec: ToneCorpusSpec) -> Path:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.audio import AudioSource
    from lhotse.supervision import AlignmentItem

    audio_dir = root / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    recordings, supervisions = [], []
    for i in range(count):
        words = list(rng.choice(WORDS, size=rng.integers(spec.min_words, spec.max_words + 1)))
        audio, spans = _render(words, rng, spec)
        rid = f"tone-{split}-{i:05d}"
        path = audio_dir / f"{rid}.wav"
        sf.write(path, audio, spec.sample_rate, subtype="PCM_16")
        duration = len(audio) / spec.sample_rate
        recordings.append(
            Recording(
                id=rid,
                sources=[AudioSource(type="file", channels=[0], source=str(path.resolve()))],
                sampling_rate=spec.sample_rate,
                num_samples=len(audio),
                duration=duration,
            )
        )
        supervisions.append(
            SupervisionSegment(id=rid, recording_id=rid, start=0.0, duration=duration, text=" ".join(words),
                               alignment={"word": [AlignmentItem(symbol=w, start=round(a, 4), duration=round(d, 4))
                                                   for w, a, d in spans]})
        )
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings(recordings),
        supervisions=SupervisionSet.from_segments(supervisions),
    )
    out = root / f"{split}_cuts.jsonl.gz"
    cuts.to_file(out)
    return out


def ensure_tone_corpus(data_dir: str | Path, **spec_kwargs) -> dict[str, Path]:
    """Create the corpus under ``data_dir/tone_corpus/<digest>/`` unless it is already complete."""
    spec = ToneCorpusSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_kwargs.items()})
    root = Path(data_dir) / "tone_corpus" / spec.digest()
    done = root / "COMPLETE"
    manifests = {"train": root / "train_cuts.jsonl.gz", "val": root / "val_cuts.jsonl.gz"}
    if done.exists():
        return manifests
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if done.exists():  # another process wrote it while we waited for the lock
            return manifests
        log.info("generating tone corpus (%d train, %d val utterances) in %s", spec.num_train, spec.num_val, root)
        # Train and validation draw from independent streams so changing one size never changes the other.
        _write_split(root, "train", spec.num_train, np.random.default_rng([spec.seed, 0]), spec)
        _write_split(root, "val", spec.num_val, np.random.default_rng([spec.seed, 1]), spec)
        (root / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
        done.write_text("ok\n")
    return manifests
