"""Lhotse Shar read by index: every rank reads all shards' metadata, and the audio of its own items only.

A Shar directory (``make to-shar``, or lhotse's ``CutSet.to_shar``) holds, per shard ``NNNNNN``,
``cuts.NNNNNN.jsonl.gz`` (metadata: ids, durations, transcripts) and ``recording.NNNNNN.tar``
(each item's encoded audio). lhotse's reader streams both together, so a rank that plans global
batches reads every tar whole. Here the two are split:

* planning (bucket bins, the 2-D grid, global batches, resume replay) iterates the cuts files
  only; each cut's recording says where its bytes are: an ``AudioSource`` of type ``shar`` whose
  source is ``<tar>@<offset>+<size>``;
* a DataLoader worker, about to decode an item of its rank's shard, fetches exactly those bytes
  (:func:`materialize`: one ranged read, local or ``s3://``/``http(s)://``).

The offsets come from ``recording_index.NNNNNN.jsonl.gz`` beside each tar (one line per cut, in the
cuts file's order: ``{"cut_id": ..., "recording_index": {"offset": ..., "size": ...}}``, a valid
Shar field, so lhotse's own reader still opens the directory). ``make to-shar`` writes it;
``python -m common.data shar-index DIR`` adds it to a Shar directory written elsewhere. A local
directory without it is indexed on the fly from the tar headers (no audio is read); a remote one
needs it (its tars would otherwise have to be read whole).

Usage::

    cuts = CutSet(SharIndex("s3://corpus/shar/train"))   # lazy, metadata only
    audio = materialize(cut).load_audio()                  # this item's bytes, one ranged read
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
from pathlib import Path

from .remote import RemoteError, exists, is_pipe, is_remote, join, list_names, open_text, read_range, redact

INDEX_FIELD = "recording_index"
_CUTS = re.compile(r"^cuts\.(\d{6})\.jsonl(\.gz)?$")


class SharError(ValueError):
    """A Shar directory that cannot be read by index; the message names the directory or shard."""


def shards(directory: str) -> list[dict]:
    """Per shard: ``{"cuts": url, "recording": url, "index": url or None}``, in shard order.

    Local folders and ``s3://`` prefixes are listed; over ``http(s)://`` shards are found by
    number (``cuts.000000.jsonl.gz``, ``cuts.000001...``) until one is missing.
    """
    if is_pipe(directory):
        raise SharError(f"{directory}: a Shar directory cannot be a pipe: command (its items are read by byte range); "
                        "give its s3:// or http(s):// location, or use pipe: for a cuts or NeMo manifest")
    if directory.startswith(("http://", "https://")):
        return _probe_http(directory)
    try:
        names = set(list_names(directory))
    except (FileNotFoundError, NotADirectoryError):
        raise SharError(f"{redact(directory)}: no such directory") from None
    found = []
    for name in sorted(names):
        match = _CUTS.match(name)
        if not match:
            continue
        number = match.group(1)
        recording = f"recording.{number}.tar"
        if recording not in names:
            raise SharError(f"{redact(directory)}: shard {number} has {name} but no {recording}")
        index = next((f"{INDEX_FIELD}.{number}{ext}" for ext in (".jsonl.gz", ".jsonl")
                      if f"{INDEX_FIELD}.{number}{ext}" in names), None)
        found.append({"cuts": join(directory, name), "recording": join(directory, recording),
                      "index": join(directory, index) if index else None})
    if not found:
        raise SharError(f"{redact(directory)} holds no Lhotse Shar shards (cuts.NNNNNN.jsonl.gz)")
    remote_without_index = [s["recording"] for s in found if s["index"] is None and is_remote(directory)]
    if remote_without_index:
        raise SharError(f"{redact(remote_without_index[0])} has no {INDEX_FIELD} file beside it: run "
                        "`python -m common.data shar-index <local copy>` and upload the recording_index.*.jsonl.gz "
                        "files it writes (make to-shar writes them)")
    return found


def _probe_http(directory: str) -> list[dict]:
    found, number = [], 0
    suffix = next((s for s in (".jsonl.gz", ".jsonl") if exists(join(directory, f"cuts.000000{s}"))), None)
    if suffix is None:
        raise SharError(f"{redact(directory)}: no cuts.000000.jsonl.gz (or .jsonl) there: not a Shar directory")
    while exists(cuts := join(directory, f"cuts.{number:06d}{suffix}")):
        recording, index = (join(directory, f"recording.{number:06d}.tar"),
                            join(directory, f"{INDEX_FIELD}.{number:06d}.jsonl.gz"))
        for needed in (recording, index):
            if not exists(needed):
                raise SharError(f"{redact(needed)} is missing (shard {number:06d} of {redact(directory)}"
                                f"{'; make to-shar writes the index' if needed == index else ''})")
        found.append({"cuts": cuts, "recording": recording, "index": index})
        number += 1
    return found


def index_tar(path: str | Path) -> dict[str, tuple[int, int]]:
    """cut id -> (offset, size) of its audio in a local Shar tar, from the tar headers alone."""
    offsets = {}
    try:
        with tarfile.open(path, "r:") as tar:  # seekable: tarfile skips over the data
            for member in tar:
                name = Path(member.name)
                if name.suffix in (".json", ".nometa"):
                    continue
                offsets[str(name.parent / name.stem)] = (member.offset_data, member.size if name.suffix != ".nodata"
                                                         else 0)
    except (tarfile.TarError, OSError) as exc:
        raise SharError(f"{path}: not a readable uncompressed tar ({exc})") from None
    return offsets


def write_index(directory: str | Path) -> int:
    """Writes ``recording_index.NNNNNN.jsonl.gz`` beside each tar of a local Shar directory; returns
    the number of shards indexed. Rewrites nothing that exists."""
    written = 0
    for shard in shards(str(directory)):
        if shard["index"] is not None:
            continue
        target = Path(shard["recording"]).with_name(Path(shard["recording"]).name.replace("recording.", f"{INDEX_FIELD}.")
                                                    .replace(".tar", ".jsonl.gz"))
        offsets = index_tar(shard["recording"])
        tmp = target.with_name(target.name + ".tmp")
        with gzip.open(tmp, "wt") as f:
            for cut_id in _cut_ids(shard["cuts"]):
                if cut_id not in offsets:
                    raise SharError(f"{shard['recording']} has no audio for cut {cut_id} of {shard['cuts']}")
                offset, size = offsets[cut_id]
                f.write(json.dumps({"cut_id": cut_id, INDEX_FIELD: {"offset": offset, "size": size}}) + "\n")
        tmp.rename(target)
        written += 1
    return written


def _cut_ids(cuts_path: str):
    with open_text(cuts_path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["id"]


class SharIndex:
    """The cuts of a Shar directory, lazily, each with a ``shar`` source saying where its audio is.

    Iterating reads the cuts files and offset indexes only (about 1 KB per item); no audio.
    Picklable (DataLoader workers), re-iterable (one pass per iteration).
    """

    def __init__(self, directory: str):
        self.directory = str(directory)
        self.shards = shards(self.directory)

    def __iter__(self):
        from lhotse.serialization import deserialize_item

        for shard in self.shards:
            offsets = self._offsets(shard)
            with open_text(shard["cuts"]) as f:
                for line in f:
                    if not line.strip():
                        continue
                    cut = deserialize_item(json.loads(line))
                    offset, size = offsets.get(cut.id, (0, 0))  # (0, 0): no audio (a .nodata member)
                    if cut.has_recording and size > 0:
                        cut.recording.sources[0].source = f"{shard['recording']}@{offset}+{size}"
                    yield cut

    @staticmethod
    def _offsets(shard) -> dict[str, tuple[int, int]]:
        """cut id -> (offset, size) of one shard (a few hundred KB per 10,000 items): its index file,
        or, for a local shard not indexed yet, its tar headers."""
        if shard["index"] is None:
            return index_tar(shard["recording"])
        with open_text(shard["index"]) as f:
            return {(e := json.loads(line))["cut_id"]: (e[INDEX_FIELD]["offset"], e[INDEX_FIELD]["size"])
                    for line in f if line.strip()}

    def __len__(self) -> int:
        return sum(1 for cuts in self.shards for _ in _cut_ids(cuts["cuts"]))


def location(cut) -> tuple[str, int, int] | None:
    """(tar, offset, size) of a cut planned from :class:`SharIndex`, else None."""
    rec = getattr(cut, "recording", None)
    if rec is None or not rec.sources or rec.sources[0].type != "shar" or "@" not in str(rec.sources[0].source):
        return None
    tar, span = str(rec.sources[0].source).rsplit("@", 1)
    offset, size = span.split("+")
    return tar, int(offset), int(size)


def materialize(cut):
    """``cut`` with its audio bytes in memory, fetched by one ranged read (other cuts as they are).

    Raises :class:`~common.data.remote.RemoteError` naming the tar when the bytes cannot be read.
    """
    where = location(cut)
    if where is None:
        return cut
    from lhotse.utils import fastcopy

    data = read_range(*where)
    source = fastcopy(cut.recording.sources[0], type="memory", source=data)
    return fastcopy(cut, recording=fastcopy(cut.recording, sources=[source]))


__all__ = ["INDEX_FIELD", "RemoteError", "SharError", "SharIndex", "index_tar", "location", "materialize", "shards",
           "write_index"]
