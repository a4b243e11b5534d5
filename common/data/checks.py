"""What makes a data item bad, found the same way by ``python -m common.data check`` and by training.

Two kinds of checks:

* metadata checks (:func:`metadata_problem`): no transcript, empty or untokenizable text,
  zero/negative duration, a segment past the end of its recording, over the maximum duration.
  They need no audio, so in training every rank runs them identically on the global batch
  stream and drops the same items: step counts stay equal on all ranks by construction.
* audio checks (:func:`load_checked`): a missing file, audio that does not decode, audio shorter
  than the manifest says. Only the rank that reads the item sees these; it drops the item from
  its shard (and, if its whole shard is bad, trains that step on silence with zero loss weight,
  so every collective still runs on every rank).

Usage::

    problem = metadata_problem(cut, tokenizer, max_duration_s=30)   # None or a BadItem
    audio = load_checked(cut, sample_rate=16000)                      # raises BadItem
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

# Report order of the kinds of bad item.
KINDS = {
    "missing_file": "audio file missing",
    "unreadable_audio": "unreadable or corrupt audio",
    "bad_duration": "zero, negative or non-finite duration",
    "duration_mismatch": "duration longer than the audio",
    "no_transcript": "no single transcript (0 or several supervisions)",
    "empty_text": "empty text",
    "untokenizable_text": "untokenizable text",
    "too_long": "over the maximum duration",
}
ON_BAD_ITEM = ("skip", "error")


class BadItem(Exception):
    def __init__(self, kind: str, cut_id: str, path: str, detail: str):
        super().__init__(kind, cut_id, path, detail)  # args: picklable across DataLoader workers
        self.kind, self.cut_id, self.path, self.detail = kind, cut_id, path, detail

    def __str__(self) -> str:
        return f"bad data item {self.cut_id} ({self.path}): {KINDS[self.kind]}: {self.detail}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "cut_id": self.cut_id, "path": self.path, "detail": self.detail}


class BadItemError(RuntimeError):
    """Raised in ``data.on_bad_item: error`` mode; the message names the file."""


def audio_path(cut) -> str:
    """The file (or Shar/URL source) an item's audio comes from, for reports."""
    rec = getattr(cut, "recording", None)
    if rec is None:
        return "<no recording>"
    from .remote import redact

    for src in rec.sources:
        if src.type in ("file", "url", "command") or (src.type == "shar" and src.source):
            return redact(str(src.source))
    return f"<{rec.sources[0].type} audio of {rec.id}>" if rec.sources else f"<{rec.id}>"


def metadata_problem(cut, tokenizer=None, max_duration_s: float | None = None,
                     measure=None, max_measure: float | None = None) -> BadItem | None:
    """The first metadata problem of ``cut``, or None. ``measure``/``max_measure`` bound a custom
    length (e.g. LLM tokens) the way ``max_duration_s`` bounds seconds."""
    def bad(kind, detail):
        return BadItem(kind, cut.id, audio_path(cut), detail)

    if not (isinstance(cut.duration, (int, float)) and math.isfinite(cut.duration) and cut.duration > 0):
        return bad("bad_duration", f"duration {cut.duration}")
    rec = getattr(cut, "recording", None)
    if rec is not None and cut.start + cut.duration > rec.duration + 0.025:  # lhotse's own tolerance
        return bad("duration_mismatch", f"segment {cut.start:.3f}+{cut.duration:.3f} s ends past the recording's "
                                        f"{rec.duration:.3f} s")
    if len(cut.supervisions) != 1:
        return bad("no_transcript", f"{len(cut.supervisions)} supervisions")
    text = cut.supervisions[0].text or ""
    if not text.strip():
        return bad("empty_text", "text is empty")
    if tokenizer is not None:
        ids = tokenizer.encode(text)
        unk = getattr(tokenizer, "unk_id", None)
        if not ids or (unk is not None and unk in ids):
            return bad("untokenizable_text", f"text {text[:60]!r} has no encoding without <unk> "
                                             f"({len(ids)} tokens)")
    elif not re.search(r"\w", text):
        return bad("untokenizable_text", f"text {text[:60]!r} has no word characters")
    if max_duration_s is not None and cut.duration > max_duration_s:
        return bad("too_long", f"{cut.duration:.2f} s > {max_duration_s} s")
    if measure is not None and max_measure is not None and measure(cut) > max_measure:
        return bad("too_long", f"{measure(cut):.0f} tokens > {max_measure}")
    return None


def load_checked(cut, sample_rate: int) -> np.ndarray:
    """Mono audio of ``cut`` at ``sample_rate``, or :class:`BadItem` saying what is wrong with it."""
    from common.data.audio import load_mono

    path = audio_path(cut)
    rec = getattr(cut, "recording", None)
    if rec is not None and rec.sources and rec.sources[0].type == "file" and not os.path.exists(path):
        raise BadItem("missing_file", cut.id, path, "no such file")
    try:
        audio = load_mono(cut, sample_rate)
    except Exception as exc:  # noqa: BLE001 - every decoder error is this item's problem
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        kind = "duration_mismatch" if "duration" in message.lower() or "samples" in message.lower() else \
            "unreadable_audio"
        raise BadItem(kind, cut.id, path, message[:300]) from exc
    if audio.size == 0 or not np.isfinite(audio).all():
        raise BadItem("unreadable_audio", cut.id, path, "decoded to no samples or non-finite values")
    expected = round(cut.duration * sample_rate)
    if audio.shape[-1] < expected - 0.025 * sample_rate:
        raise BadItem("duration_mismatch", cut.id, path,
                      f"audio has {audio.shape[-1] / sample_rate:.3f} s, manifest says {cut.duration:.3f} s")
    return audio
