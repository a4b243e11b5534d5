"""Test corpora in the formats users bring, written by the tests from the generated tone corpus.

Every function writes real audio files and real manifests under a directory it is given:
a LibriSpeech-shaped tree (for lhotse's own ``prepare_librispeech``), NeMo JSON lines with
other sample rates, stereo and offsets into long recordings, and a corpus of bad items.
"""

from __future__ import annotations

import json
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf


def tone_cuts(manifest, n: int):
    from lhotse import CutSet

    return list(CutSet.from_file(manifest))[:n]


def resample(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = gcd(src, dst)
    return resample_poly(audio, dst // g, src // g).astype(np.float32)


def write_librispeech_tree(root: Path, cuts, part: str = "dev-clean") -> Path:
    """``root/LibriSpeech/<part>/<spk>/<chapter>/`` with FLAC files and a ``.trans.txt``, as distributed."""
    chapter = root / "LibriSpeech" / part / "19" / "198"
    chapter.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, cut in enumerate(cuts):
        utt = f"19-198-{i:04d}"
        sf.write(chapter / f"{utt}.flac", cut.load_audio()[0], cut.sampling_rate)
        lines.append(f"{utt} {cut.supervisions[0].text.upper()}")
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


def write_nemo_corpus(root: Path, cuts, name: str = "nemo") -> tuple[Path, list[dict]]:
    """A NeMo manifest over audio in other formats: 44.1 kHz stereo FLAC, 8 kHz WAV, 22.05 kHz
    WAV, and one long 16 kHz recording that holds several utterances addressed by ``offset``.

    Relative ``audio_filepath`` values (resolved against the manifest's folder). Returns the
    manifest and the expected items (text, duration, kind).
    """
    audio_dir = root / name
    audio_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    long_parts, long_offset = [], 0.0
    for i, cut in enumerate(cuts):
        audio, sr, text = cut.load_audio()[0], cut.sampling_rate, cut.supervisions[0].text
        kind = ("stereo44k", "mono8k", "mono22k", "long")[i % 4]
        if kind == "stereo44k":
            path = audio_dir / f"utt{i}.flac"
            x = resample(audio, sr, 44100)
            sf.write(path, np.stack([x, 0.5 * x], axis=1), 44100)
        elif kind == "mono8k":
            path = audio_dir / f"utt{i}.wav"
            sf.write(path, resample(audio, sr, 8000), 8000, subtype="PCM_16")
        elif kind == "mono22k":
            path = audio_dir / f"utt{i}.wav"
            sf.write(path, resample(audio, sr, 22050), 22050, subtype="FLOAT")
        else:
            long_parts.append(audio)
            entries.append({"audio_filepath": f"{name}/long.wav", "offset": round(long_offset, 6),
                            "duration": cut.duration, "text": text, "kind": kind})
            long_offset += len(audio) / sr
            continue
        entries.append({"audio_filepath": f"{name}/{path.name}", "duration": cut.duration, "text": text, "kind": kind})
    if long_parts:
        sf.write(audio_dir / "long.wav", np.concatenate(long_parts), cuts[0].sampling_rate, subtype="FLOAT")
    manifest = root / f"{name}_manifest.json"
    manifest.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "kind"}) + "\n" for e in entries))
    return manifest, entries


# One item per kind of problem that `python -m common.data check` reports (see common.data.checks.KINDS).
BAD_KINDS = ("missing_file", "unreadable_audio", "bad_duration", "duration_mismatch", "empty_text",
             "untokenizable_text", "too_long")


def write_bad_items(root: Path, good_cut, name: str = "bad") -> tuple[Path, dict[str, str]]:
    """A NeMo manifest with one bad item of each kind in ``BAD_KINDS``; returns it and kind -> file path."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    audio, sr, text = good_cut.load_audio()[0], good_cut.sampling_rate, good_cut.supervisions[0].text
    ok = d / "ok.wav"
    sf.write(ok, audio, sr)
    corrupt = d / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 8)
    long = d / "long.wav"
    sf.write(long, np.tile(audio, int(np.ceil(45 * sr / len(audio))))[: 45 * sr], sr)
    dur = good_cut.duration
    items = {
        "missing_file": {"audio_filepath": str(d / "missing.wav"), "duration": dur, "text": text},
        "unreadable_audio": {"audio_filepath": str(corrupt), "duration": dur, "text": text},
        "bad_duration": {"audio_filepath": str(ok), "duration": 0.0, "text": text},
        "duration_mismatch": {"audio_filepath": str(ok), "duration": dur + 5.0, "text": text},
        "empty_text": {"audio_filepath": str(ok), "duration": dur, "text": "  "},
        "untokenizable_text": {"audio_filepath": str(ok), "duration": dur, "text": "?! ..."},
        "too_long": {"audio_filepath": str(long), "duration": 45.0, "text": text},
    }
    manifest = root / f"{name}_manifest.json"
    manifest.write_text("".join(json.dumps(items[k]) + "\n" for k in BAD_KINDS))
    return manifest, {k: v["audio_filepath"] for k, v in items.items()}
