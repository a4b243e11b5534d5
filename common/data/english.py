"""Spoken English made on this machine (``data=english``): real sentences, many synthetic voices.

Sentences come from English prose that ships with every Linux machine and every Python: the
license texts in ``/usr/share/common-licenses`` (Debian's base-files), Python's reference
documentation (``pydoc_data.topics``) and the docstrings of Python's standard library. A
sentence is kept if it is 4-30 words of plain words (no digits, code, acronyms or abbreviations:
what a reader would say is then exactly what its text says) and is new after
:func:`common.data.text.normalize_text`, the project's one normalizer; transcripts are stored
normalized.

Splits are by sentence, from a hash of its normalized text (stable when a source grows):
``dev`` (validation) and ``test`` sentences never occur in ``train``. Speech is espeak-ng
(Debian package ``espeak-ng``): every utterance gets a random voice (an English accent: en-us,
en-gb, Scotland, Received Pronunciation, Lancaster, West Midlands, Caribbean, New York City; times
a voice variant: 98 male, female and character voices), speaking rate and pitch, is resampled to
16 kHz and gets faint noise. The variants are split once, seeded: ``train``, ``dev`` and ``test``
are spoken by training variants; ``test_voices`` (the ``test`` sentences again) only by variants
no other split uses.

``voice`` (``data.english.voice``, e.g. ``en-us+m3``) makes a single-speaker corpus of the same
sentences and splits instead: train, dev and test read by that voice at one rate, pitch and level,
as a TTS model without a speaker input needs (``test_voices`` keeps its many unseen voices).

Usage::

    from common.data.english import ensure_english_corpus
    manifests = ensure_english_corpus("data", seed=0)
    manifests["train"], manifests["dev"], manifests["test"], manifests["test_voices"]  # lhotse cuts

Made once per spec and text (``data/english_corpus/<digest>/``; the digest covers the sentences,
so a machine with other texts makes its own corpus), in parallel processes, with a progress line;
several processes asking at once wait for the one that makes it (a file lock).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from filelock import FileLock

from .text import normalize_text

log = logging.getLogger(__name__)

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
# Variants that are effects rather than voices (a distorted or robotic timbre); whispering variants
# are left out too (voice_variants): no voicing, nothing a recognizer of read speech meets.
_NOT_VOICES = {"Demonic", "UniRobot", "anikaRobot"}
LICENSES_DIR = Path("/usr/share/common-licenses")
SPLITS = ("train", "dev", "test", "test_voices")
# Real human speech to report on, never to train or tune on: Debian's pocketsphinx-testdata (5 LibriVox
# sentences of "Sense and Sensibility", 5 spoken card names), read where the package installs it.
REAL_RECORDINGS_DIR = Path("/usr/share/pocketsphinx/test/data")
INSTALL_HINT = ("install it with: sudo apt-get install espeak-ng (Debian/Ubuntu; a system package, so `make setup`, "
                "which makes the Python environment, does not; README \"Spoken English\")")


class EnglishCorpusError(RuntimeError):
    """The corpus cannot be made here (no espeak-ng, too little text); the message says what to do."""


@dataclass(frozen=True)
class EnglishCorpusSpec:
    seed: int = 0
    sample_rate: int = 16000
    dev_fraction: float = 0.03        # of the sentences (by hash); never in train
    test_fraction: float = 0.04       # of the sentences; spoken twice: training variants and unseen ones
    held_out_voices: float = 0.15     # of the variants, never heard in train/dev/test
    readings: int = 1                 # training readings per train sentence (each by another random voice)
    max_sentences: int | None = None  # a slice (tests, CI): the first N of each split's sentences
    rate_wpm: tuple = (135, 200)
    pitch: tuple = (25, 75)
    snr_db: tuple = (30.0, 50.0)
    voice: str | None = None          # one voice (e.g. en-us+m3) for train/dev/test at one rate, pitch and level:
                                      # a single-speaker corpus for TTS, as LJSpeech is (test_voices stays many voices)
    version: int = 1

    def __post_init__(self):
        if self.voice is not None:
            accent, _, variant = self.voice.partition("+")
            if accent not in ACCENTS or not variant:
                raise EnglishCorpusError(f"data.english.voice={self.voice!r} is not <accent>+<variant>: accents "
                                         f"{', '.join(ACCENTS)}; variants: espeak-ng --voices=variant (e.g. en-us+m3)")

    def digest(self, sentences: list[str]) -> str:
        fields = asdict(self)
        if fields["voice"] is None:
            del fields["voice"]  # the many-voice corpus keeps the digest (and the cache) it had before the setting
        h = hashlib.sha1(json.dumps(fields, sort_keys=True).encode())
        h.update("\n".join(sentences).encode())
        h.update(espeak_version().encode())
        return h.hexdigest()[:10]


# --- text ----------------------------------------------------------------------------------------
def source_texts() -> dict[str, list[str]]:
    """{source name: [document, ...]}: the English prose this machine ships."""
    sources = {}
    if LICENSES_DIR.is_dir():
        sources["licenses"] = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(LICENSES_DIR.iterdir())
                               if p.is_file() and not p.is_symlink()]
    try:
        from pydoc_data.topics import topics

        sources["python_reference"] = [topics[k] for k in sorted(topics)]
    except ImportError:  # some distributions strip it
        pass
    sources["python_docstrings"] = list(_stdlib_docstrings())
    return sources


def _stdlib_docstrings():
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, stdlib)
        if rel.startswith(("site-packages", "dist-packages", "test", "idlelib" + os.sep + "idle_test")):
            continue
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


_WORD = re.compile(r"^[A-Za-z]+(?:'[a-z]+)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def speakable_sentences(text: str, min_words: int = 4, max_words: int = 30):
    """Sentences of ``text`` whose every word a reader says as written: letters only (an inner
    apostrophe allowed), lower case or capitalized (no acronyms, no CamelCase), no inner dots (code,
    abbreviations), no brackets inside a word (calls)."""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(paragraph):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words) or sentence[-1] not in ".!?":
                continue
            if all(_speakable(w) for w in words):
                yield sentence


def _speakable(token: str) -> bool:
    core = token.strip("\",;:.!?'")
    if core.startswith("(") != core.endswith(")") or "()" in core:
        return False
    core = core.strip("()")
    if not _WORD.match(core) or "." in token.rstrip(".!?,;:\"')"):
        return False
    return len(core) == 1 or core[1:] == core[1:].lower()


def english_sentences() -> list[tuple[str, str, str]]:
    """``[(normalized, original, source), ...]``: every speakable sentence once, in source order."""
    seen, out = set(), []
    for source, documents in source_texts().items():
        for doc in documents:
            for sentence in speakable_sentences(doc):
                key = normalize_text(sentence)
                if key and key not in seen:
                    seen.add(key)
                    out.append((key, sentence, source))
    return out


def texts_fingerprint() -> str:
    """Changes when the texts may have: another Python, other license files, another extraction."""
    h = hashlib.sha1(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{_EXTRACTION_VERSION}".encode())
    if LICENSES_DIR.is_dir():
        h.update(json.dumps(sorted((p.name, p.stat().st_size) for p in LICENSES_DIR.iterdir())).encode())
    return h.hexdigest()[:10]


_EXTRACTION_VERSION = 1  # raise when speakable_sentences or the sources change


def cached_sentences(directory: Path) -> list[tuple[str, str, str]]:
    """:func:`english_sentences`, kept in ``directory`` (extracting takes ~10 s; every rank asks)."""
    path = directory / f"sentences-{texts_fingerprint()}.json"
    if path.exists():
        return [tuple(s) for s in json.loads(path.read_text())]
    sentences = english_sentences()
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(sentences)))
    return sentences


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` beside ``path``, then renamed: another process never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    write(tmp)
    tmp.replace(path)


def split_of(normalized: str, spec: EnglishCorpusSpec) -> str:
    """train / dev / test, from the sentence's hash (the same sentence: the same split, everywhere)."""
    u = int(hashlib.sha1(normalized.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if u < spec.test_fraction else "dev" if u < spec.test_fraction + spec.dev_fraction else "train"


# --- voices --------------------------------------------------------------------------------------
def espeak_binary(needed_by: str = "data=english speaks its sentences with espeak-ng") -> str:
    """The espeak-ng binary, or one error line saying what needs it and how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EnglishCorpusError(f"{needed_by}, which is not installed: {INSTALL_HINT}")
    return path


def espeak_version() -> str:
    out = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True).stdout
    return out.split("Data at")[0].strip()


def voice_variants() -> list[str]:
    """espeak-ng's voice variants (``espeak-ng --voices=variant``), minus those that do not speak."""
    out = subprocess.run([espeak_binary(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    # Columns: Pty Language Age/Gender VoiceName File; "-v en+<variant>" takes the file's name (!v/<name>).
    names = sorted({line.split()[4].removeprefix("!v/") for line in out.splitlines()[1:] if len(line.split()) >= 5})
    return [n for n in names if n not in _NOT_VOICES and "whisper" not in n.lower()]


def split_voices(spec: EnglishCorpusSpec) -> dict[str, list[str]]:
    """{"seen": variants of train/dev/test, "unseen": variants of test_voices only}."""
    variants = voice_variants()
    order = np.random.default_rng([spec.seed, 7]).permutation(len(variants))
    n_unseen = max(1, round(spec.held_out_voices * len(variants)))
    return {"unseen": sorted(variants[i] for i in order[:n_unseen]),
            "seen": sorted(variants[i] for i in order[n_unseen:])}


def speak(text: str, voice: str, rate_wpm: int, pitch: int, sample_rate: int) -> np.ndarray:
    """espeak-ng's reading of ``text`` at ``sample_rate`` (float32 in [-1, 1])."""
    from scipy.signal import resample_poly

    proc = subprocess.run([espeak_binary(), "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) < 100:
        raise EnglishCorpusError(f"espeak-ng -v {voice} failed on {text!r}: {proc.stderr.decode()[-300:]}")
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if sr != sample_rate:
        g = np.gcd(sr, sample_rate)
        audio = resample_poly(audio, sample_rate // g, sr // g).astype(np.float32)
    return audio


# --- the corpus ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    uid: str
    split: str
    text: str
    original: str
    source: str
    voice: str
    rate_wpm: int
    pitch: int
    snr_db: float
    gain: float


def plan(spec: EnglishCorpusSpec, sentences: list[tuple[str, str, str]], voices: dict | None = None) -> list[_Item]:
    """Every utterance of the corpus: its sentence, split and voice (deterministic for a spec;
    ``voices``: :func:`split_voices`, computed here if not given)."""
    by_split: dict[str, list] = {"train": [], "dev": [], "test": []}
    for s in sentences:
        by_split[split_of(s[0], spec)].append(s)
    if spec.max_sentences:
        by_split = {k: v[: spec.max_sentences] for k, v in by_split.items()}
    voices = voices or split_voices(spec)
    items = []
    for split, readings in (("train", spec.readings), ("dev", 1), ("test", 1), ("test_voices", 1)):
        rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
        variants = voices["unseen" if split == "test_voices" else "seen"]
        for r in range(readings):
            for i, (key, original, source) in enumerate(by_split["test" if split == "test_voices" else split]):
                voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{variants[rng.integers(len(variants))]}"
                rate = int(rng.integers(spec.rate_wpm[0], spec.rate_wpm[1] + 1))
                pitch = int(rng.integers(spec.pitch[0], spec.pitch[1] + 1))
                snr, gain = float(rng.uniform(*spec.snr_db)), float(rng.uniform(0.3, 0.9))
                if spec.voice is not None and split != "test_voices":  # one speaker, one manner
                    voice, rate, pitch, gain = spec.voice, sum(spec.rate_wpm) // 2, sum(spec.pitch) // 2, 0.6
                items.append(_Item(f"en-{split}-{r}-{i:05d}", split, key, original, source, voice, rate, pitch,
                                   snr, gain))
    return items


def _render(item: _Item, audio_dir: Path, spec: EnglishCorpusSpec) -> tuple[_Item, Path, int]:
    audio = speak(item.original, item.voice, item.rate_wpm, item.pitch, spec.sample_rate)
    rng = np.random.default_rng(int(hashlib.sha1(item.uid.encode()).hexdigest()[:8], 16) + spec.seed)
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    noise *= np.sqrt(np.mean(audio**2) / 10 ** (item.snr_db / 10))
    audio = audio + noise
    audio = item.gain * audio / max(float(np.max(np.abs(audio))), 1e-6)
    path = audio_dir / item.split / f"{item.uid}.flac"
    sf.write(path, audio, spec.sample_rate, subtype="PCM_16")
    return item, path, len(audio)


def ensure_english_corpus(data_dir: str | Path, workers: int | None = None, **spec_kwargs) -> dict[str, Path]:
    """The corpus under ``data_dir/english_corpus/<digest>/``, made unless it is complete.
    Returns ``{split: cuts manifest}`` for ``train``, ``dev``, ``test``, ``test_voices``."""
    spec = EnglishCorpusSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_kwargs.items()})
    sentences = cached_sentences(Path(data_dir) / "english_corpus")
    root = Path(data_dir) / "english_corpus" / spec.digest([s[0] for s in sentences])
    manifests = {split: root / f"{split}_cuts.jsonl.gz" for split in SPLITS}
    done = root / "COMPLETE"
    real = real_recordings_manifest(Path(data_dir) / "english_corpus")
    if real is not None:
        manifests["real"] = real
    if done.exists():
        return manifests
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if done.exists():  # another process made it while this one waited
            return manifests
        _make(root, spec, sentences, workers or os.cpu_count() or 1)
        done.write_text("ok\n")
    return manifests


def _make(root: Path, spec: EnglishCorpusSpec, sentences, workers: int) -> None:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.audio import AudioSource

    voices = split_voices(spec)
    items = plan(spec, sentences, voices)
    if not all(any(i.split == s for i in items) for s in SPLITS):
        raise EnglishCorpusError(f"too little English text on this machine: {len(sentences)} sentences gave no "
                                 f"utterance for some split (sources: {', '.join(sorted({s[2] for s in sentences}))})")
    audio_dir = root / "audio"
    for split in ("train", "dev", "test", "test_voices"):
        (audio_dir / split).mkdir(parents=True, exist_ok=True)
    progress = _Progress(len(items), f"making the spoken English corpus in {root}")
    rows: dict[str, list] = {s: [] for s in SPLITS}
    with ThreadPoolExecutor(max_workers=workers) as pool:  # espeak-ng runs in its own processes
        for item, path, num_samples in pool.map(lambda it: _render(it, audio_dir, spec), items):
            rows[item.split].append((item, path, num_samples))
            progress.step(num_samples / spec.sample_rate)
    progress.close()
    hours = {}
    for split, entries in rows.items():
        recordings, supervisions = [], []
        for item, path, n in entries:
            duration = n / spec.sample_rate
            recordings.append(Recording(id=item.uid, sources=[AudioSource(type="file", channels=[0],
                                                                          source=str(path.resolve()))],
                                        sampling_rate=spec.sample_rate, num_samples=n, duration=duration))
            supervisions.append(SupervisionSegment(
                id=item.uid, recording_id=item.uid, start=0.0, duration=duration, text=item.text, language="en",
                speaker=item.voice, custom={"original_text": item.original, "text_source": item.source,
                                            "rate_wpm": item.rate_wpm, "pitch": item.pitch}))
        CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                              supervisions=SupervisionSet.from_segments(supervisions)).to_file(root / f"{split}_cuts.jsonl.gz")
        hours[split] = round(sum(n for _, _, n in entries) / spec.sample_rate / 3600, 3)
    (root / "spec.json").write_text(json.dumps({
        "spec": asdict(spec), "espeak_ng": espeak_version(), "hours": hours,
        "utterances": {s: len(v) for s, v in rows.items()},
        "sentences_by_source": {src: sum(1 for s in sentences if s[2] == src) for src in dict.fromkeys(s[2] for s in sentences)},
        "voices": {"accents": list(ACCENTS), "seen_variants": voices["seen"], "unseen_variants": voices["unseen"]},
    }, indent=2))
    log.info("spoken English corpus: %s hours (train %.2f h)", hours, hours["train"])


def real_recordings_manifest(directory: Path) -> Path | None:
    """Cuts of the real recordings in :data:`REAL_RECORDINGS_DIR` (read in place), or None without them."""
    from lhotse import CutSet, Recording, SupervisionSegment

    out = directory / "real_recordings_cuts.jsonl.gz"
    if out.exists():
        return out
    cuts = []
    for sub, transcripts in (("librivox", "transcription"), ("cards", "cards.transcription")):
        path = REAL_RECORDINGS_DIR / sub / transcripts
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"^<s>(.*)</s>\s*\((\S+)\)\s*$", line.strip())
            wav = REAL_RECORDINGS_DIR / sub / f"{m.group(2)}.wav" if m else None
            if wav is None or not wav.is_file():
                continue
            rec = Recording.from_file(wav, recording_id=f"real-{sub}-{m.group(2)}")
            cut = rec.to_cut()
            cut.supervisions = [SupervisionSegment(id=rec.id, recording_id=rec.id, start=0.0, duration=rec.duration,
                                                   text=normalize_text(m.group(1)), language="en",
                                                   speaker=f"pocketsphinx-{sub}")]
            cuts.append(cut)
    if not cuts:
        return None
    _write_atomically(out, CutSet.from_cuts(cuts).to_file)
    return out


class _Progress:
    """One line of progress: rewritten in place on a terminal, a line every 30 s in a log."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.audio_s, self.t0, self.last = total, 0, 0.0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()
        log.info("%s: %d utterances", what, total)

    def step(self, audio_s: float) -> None:
        self.done += 1
        self.audio_s += audio_s
        now = time.monotonic()
        early = self.done < max(2, self.total // 100)  # too few done for an estimate of the rest
        if (early or now - self.last < (1.0 if self.tty else 30.0)) and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        left = elapsed / self.done * (self.total - self.done)
        line = (f"spoken English corpus: {self.done}/{self.total} utterances, {self.audio_s / 3600:.2f} h of audio, "
                f"{elapsed:.0f} s, ~{left:.0f} s left")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)
