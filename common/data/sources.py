"""Where training data comes from: lhotse manifests, Lhotse Shar, NeMo manifests, weighted mixes.

A *source* is one dataset. In the Hydra config, ``data.train`` and ``data.val`` each take a
path, a list of paths, or a list of mappings (an empty list means the generated tone corpus)::

    data:
      train:
        - {path: /data/libri/librispeech_cuts_train-clean-100.jsonl.gz, weight: 3}
        - {recordings: /data/libri/librispeech_recordings_train-other-500.jsonl.gz,
           supervisions: /data/libri/librispeech_supervisions_train-other-500.jsonl.gz}
        - {path: /data/shar/commonvoice, weight: 1}        # a Lhotse Shar directory
        - {path: /data/nemo/train_manifest.json}            # NeMo JSON lines
        - {path: s3://corpus/shar/librispeech}              # Shar on object storage
      val: https://data.example.org/dev_cuts.jsonl.gz

Paths may be local, ``s3://`` (credentials from the environment, see :mod:`common.data.remote`),
``http(s)://`` or lhotse ``pipe:`` commands (``pipe:aws s3 cp s3://b/cuts.jsonl.gz -``; manifests
only: a Shar directory's items are read by byte range, :mod:`common.data.shar`).

``format`` is detected (``cuts``, ``recordings+supervisions``, ``shar``, ``nemo``) and may be
given explicitly. Every source becomes a lhotse ``CutSet`` with one supervision per cut
(long recordings are cut to their supervisions; NeMo ``offset``/``duration`` select a segment
of the referenced audio file, which is read in place, never copied).

Several training sources are mixed by ``weight``: each is repeated endlessly and
``CutSet.mux`` draws from source *i* with probability ``weight_i / sum(weights)``, with a fixed
seed so that every rank draws the same stream. Training is then bounded by
``trainer.max_steps``. Validation sources are concatenated, never weighted.

Usage::

    specs = parse_sources(cfg.data.train, setting="data.train")
    cuts = open_sources(specs, seed=0, mix=True)
    texts = iter_texts(specs)            # for tokenizers: metadata only, no audio read
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .remote import RemoteError, exists, is_pipe, is_remote, open_text, redact
from .shar import SharError, SharIndex, shards

log = logging.getLogger(__name__)

FORMATS = ("cuts", "recordings+supervisions", "shar", "nemo")


class SourceError(ValueError):
    """A data source that cannot be used; the message names the setting and the file."""


@dataclass(frozen=True)
class SourceSpec:
    path: str | None = None
    format: str | None = None
    weight: float = 1.0
    recordings: str | None = None
    supervisions: str | None = None
    setting: str = "data"  # where it came from, for error messages

    @property
    def name(self) -> str:
        return self.path or self.recordings or "?"


def parse_sources(value, setting: str) -> list[SourceSpec]:
    """``data.train`` / ``data.val`` (a path, a list of paths or of mappings) as checked specs."""
    if value is None or value == "" or value == []:
        return []
    items = list(value) if isinstance(value, (list, tuple)) or _is_listconfig(value) else [value]
    specs = []
    for i, item in enumerate(items):
        where = f"{setting}[{i}]"
        if isinstance(item, (str, Path)):
            item = {"path": str(item)}
        item = dict(item)
        unknown = set(item) - {"path", "format", "weight", "recordings", "supervisions"}
        if unknown:
            raise SourceError(f"{where}: unknown key(s) {sorted(unknown)} (known: path, format, weight, "
                              "recordings, supervisions)")
        spec = SourceSpec(setting=where, **{k: (str(v) if k != "weight" and v is not None else v)
                                            for k, v in item.items()})
        specs.append(_resolve_format(spec))
    return specs


def _is_listconfig(value) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


def _resolve_format(spec: SourceSpec) -> SourceSpec:
    if spec.weight is None or float(spec.weight) <= 0:
        raise SourceError(f"{spec.setting}: weight must be > 0, got {spec.weight}")
    fmt = spec.format
    if spec.recordings or spec.supervisions:
        if not (spec.recordings and spec.supervisions) or spec.path:
            raise SourceError(f"{spec.setting}: give both 'recordings' and 'supervisions' (lhotse recipe "
                              "manifests), or 'path' alone")
        for key in ("recordings", "supervisions"):
            if not _exists(getattr(spec, key), f"{spec.setting}.{key}"):
                raise SourceError(f"{spec.setting}.{key}: no such file: {redact(getattr(spec, key))}")
        fmt = fmt or "recordings+supervisions"
    elif not spec.path:
        raise SourceError(f"{spec.setting}: needs 'path' (or 'recordings' + 'supervisions')")
    else:
        directory = is_remote(spec.path) and not _looks_like_manifest(spec.path)  # listed/probed by shards()
        if not directory and not _exists(spec.path, spec.setting):
            raise SourceError(f"{spec.setting}: no such file or directory: {redact(spec.path)}")
        fmt = fmt or _detect_format(spec.path, spec.setting)
    if fmt not in FORMATS:
        raise SourceError(f"{spec.setting}: format {fmt!r} is not known (known: {', '.join(FORMATS)})")
    if fmt == "shar":
        try:
            shards(spec.path)  # every shard complete, indexed where it is remote: said now, not mid-run
        except (SharError, RemoteError) as exc:
            raise SourceError(f"{spec.setting}: {exc}") from None
    return SourceSpec(**{**spec.__dict__, "format": fmt, "weight": float(spec.weight)})


def _exists(path: str, setting: str) -> bool:
    try:
        return exists(path)
    except RemoteError as exc:
        raise SourceError(f"{setting}: {exc}") from None


def _looks_like_manifest(path: str) -> bool:
    return is_pipe(path) or bool(re.search(r"\.(json|jsonl)(\.gz)?$", path))


def _detect_format(path: str, setting: str) -> str:
    if (Path(path).is_dir() if not is_remote(path) else not _looks_like_manifest(path)):
        try:
            shards(path)
            return "shar"
        except (SharError, RemoteError) as exc:
            raise SourceError(f"{setting}: {exc}") from None
    first = _first_record(path, setting)
    if "audio_filepath" in first:
        return "nemo"
    if first.get("type", "").endswith("Cut") or "recording" in first:
        return "cuts"
    if "sources" in first:
        raise SourceError(f"{setting}: {path} is a lhotse RecordingSet; give it as 'recordings' together with "
                          "its 'supervisions' manifest")
    raise SourceError(f"{setting}: cannot tell the format of {path} (first record has keys {sorted(first)}); "
                      f"set 'format' to one of {', '.join(FORMATS)}")


def _first_record(path: str, setting: str) -> dict:
    try:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except RemoteError as exc:
        raise SourceError(f"{setting}: {exc}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise SourceError(f"{setting}: cannot read {redact(path)} as JSON lines: {exc}") from exc
    raise SourceError(f"{setting}: {redact(path)} is empty")


def open_source(spec: SourceSpec):
    """One source as a lhotse CutSet (lazy where the format allows), one supervision per cut."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    if spec.format == "cuts":
        cuts = CutSet.from_file(spec.path)
    elif spec.format == "shar":
        cuts = CutSet(SharIndex(spec.path))  # metadata only; each item's audio is fetched by the rank that trains it
    elif spec.format == "nemo":
        cuts = nemo_to_cuts(spec.path)
    else:  # recordings+supervisions, as `lhotse prepare <corpus>` writes them
        cuts = CutSet.from_manifests(recordings=RecordingSet.from_file(spec.recordings),
                                     supervisions=SupervisionSet.from_file(spec.supervisions))
    if spec.format in ("cuts", "recordings+supervisions") and any(not _covered(c) for c in cuts):
        # Long recordings with several segments (e.g. a lecture and its sentences): one cut per
        # supervision. Only then, so that ready-made cuts keep their ids.
        cuts = cuts.trim_to_supervisions(keep_overlapping=False)
    return cuts


def _covered(cut) -> bool:
    """One supervision spanning the whole cut (what the recipes' datasets expect)."""
    return len(cut.supervisions) == 1 and abs(cut.supervisions[0].start) < 1e-3 and abs(
        cut.supervisions[0].duration - cut.duration) < 1e-2


def open_sources(specs: list[SourceSpec], *, seed: int, mix: bool):
    """All sources as one CutSet: weighted endless mix (``mix=True``, >1 source) or concatenation."""
    from lhotse import CutSet

    cutsets = [open_source(s) for s in specs]
    if len(cutsets) == 1:
        return cutsets[0]
    if mix:
        log.info("mixing %d sources with weights %s", len(specs), [s.weight for s in specs])
        # preserve_id: a repeated item keeps its id, so a bad one is reported once, not once per pass.
        return CutSet.mux(*[c.repeat(preserve_id=True) for c in cutsets], weights=[s.weight for s in specs], seed=seed)
    return CutSet.from_cuts(c for cs in cutsets for c in cs)


def iter_texts(specs: list[SourceSpec]) -> Iterator[str]:
    """Every transcript of the sources, from metadata only (no audio is read or decoded)."""
    from lhotse import CutSet, SupervisionSet

    for spec in specs:
        if spec.format == "nemo":
            for _, rec in _nemo_records(spec.path):
                yield str(rec.get("text", ""))
        elif spec.format == "recordings+supervisions":
            yield from (s.text or "" for s in SupervisionSet.from_file(spec.supervisions))
        else:
            cuts = SharIndex(spec.path) if spec.format == "shar" else CutSet.from_file(spec.path)
            yield from (s.text or "" for c in cuts for s in c.supervisions)


# --- NeMo manifests -------------------------------------------------------------------------------

def _nemo_records(path: str) -> Iterator[tuple[int, dict]]:
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{line_no}: not a JSON object: {exc}") from exc


def nemo_to_cuts(path: str | Path):
    """A NeMo JSON-lines manifest (``audio_filepath``, ``duration``, ``text``, optional ``offset``)
    as a CutSet over the same audio files (relative paths resolve against the manifest's folder).

    Each file's header is read once (sampling rate, channels, length); a line whose file is
    missing or unreadable becomes a cut whose audio fails to load, so it is reported by
    ``python -m common.data check`` and skipped in training like any other bad item.
    """
    from lhotse import AudioSource, CutSet, Recording, SupervisionSegment
    from lhotse.cut import MonoCut, MultiCut

    base = None if is_remote(str(path)) else Path(path).resolve().parent
    recordings: dict[str, Recording] = {}
    cuts = []
    for line_no, rec in _nemo_records(str(path)):
        if "audio_filepath" not in rec or "duration" not in rec:
            raise SourceError(f"{path}:{line_no}: a NeMo manifest line needs 'audio_filepath' and 'duration' "
                              f"(has {sorted(rec)})")
        audio = Path(rec["audio_filepath"])
        if not audio.is_absolute() and base is None:
            raise SourceError(f"{redact(str(path))}:{line_no}: a relative audio_filepath ({audio}) in a manifest read "
                              "from object storage or a pipe has no folder to resolve against; give absolute paths "
                              "(a shared file system), or export the corpus to Shar (make to-shar)")
        audio = audio if audio.is_absolute() else base / audio
        key = str(audio)
        if key not in recordings:
            try:
                recordings[key] = Recording.from_file(audio, recording_id=f"{audio.stem}-{len(recordings):06d}")
            except Exception:  # noqa: BLE001 - a missing/corrupt file is a bad item, not a crash
                # A placeholder with the manifest's claims; loading it fails with the file's own error.
                recordings[key] = Recording(
                    id=f"{audio.stem}-{len(recordings):06d}", sources=[AudioSource("file", [0], key)],
                    sampling_rate=16000, num_samples=int(float(rec.get("offset", 0) + rec["duration"]) * 16000),
                    duration=float(rec.get("offset", 0)) + float(rec["duration"]),
                )
        recording = recordings[key]
        offset, duration = float(rec.get("offset", 0.0)), float(rec["duration"])
        cut_id = f"{recording.id}-{line_no:07d}"
        # Not truncate(): a duration the audio cannot cover must fail to load (reported as a bad
        # item), not be shortened silently. Multi-channel files keep every channel (downmixed later).
        channel = recording.channel_ids if recording.num_channels > 1 else recording.channel_ids[0]
        cut_type = MultiCut if recording.num_channels > 1 else MonoCut
        cuts.append(cut_type(
            id=cut_id, start=offset, duration=duration, channel=channel, recording=recording,
            supervisions=[SupervisionSegment(id=cut_id, recording_id=recording.id, start=0.0, duration=duration,
                                             channel=channel, text=str(rec.get("text", "")))],
        ))
    return CutSet.from_cuts(cuts)

