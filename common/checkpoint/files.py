"""What a run's ``checkpoints/`` directory holds, and how to tell a complete checkpoint.

    checkpoints/step000250.ckpt          complete (a file under DDP; a DCP directory under FSDP2/TP)
    checkpoints/.partial-step000500.ckpt  being written, or left by a writer that was stopped
    checkpoints/last.ckpt -> step000250.ckpt
    checkpoints/unreadable/               damaged ones resume moved aside, with the time

Only names matching ``step<N>.ckpt`` are ever resumed from; nothing else here decides anything.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import torch

from common.data.buckets import allow_older_sampler_states
from common.parallel.strategy import META_FILE
from common.rundir import replace_link

CHECKPOINT_NAME = re.compile(r"^step(\d+)\.ckpt$")
PARTIAL_PREFIX = ".partial-"
LAST_LINK = "last.ckpt"  # -> the newest complete checkpoint (make transcribe's default); resume reads names


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def partial_path(final: Path) -> Path:
    """Where the checkpoint that will be ``final`` is written until it is complete."""
    return Path(final).with_name(PARTIAL_PREFIX + Path(final).name)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None if it reads as complete.

    A file (DDP): every zip member's CRC-32 (torch.save writes them) and the pickled object.
    A sharded directory (DCP): ``meta.pt`` loads, ``.metadata`` loads, and every shard file
    it names exists and is long enough for the byte ranges it lists. Reads every byte of a file
    checkpoint (about a second per GB); a directory's shards are only sized.
    """
    allow_older_sampler_states()  # checkpoints of earlier versions read as complete, not damaged
    path = Path(path)
    try:
        if path.is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            if not (path / META_FILE).is_file():
                return f"no {META_FILE}"
            torch.load(path / META_FILE, map_location="cpu", weights_only=True)
            metadata = FileSystemReader(str(path)).read_metadata()
            need: dict[str, int] = {}
            for info in (metadata.storage_data or {}).values():
                need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
            for name, size in need.items():
                shard = path / name
                if not shard.is_file():
                    return f"shard {name} is missing"
                if shard.stat().st_size < size:
                    return f"shard {name} has {shard.stat().st_size} bytes, its index needs {size}"
            return None
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            return f"member {bad} fails its CRC-32 check"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means: not resumable
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return None


def checkpoint_run_config(path: Path) -> dict | None:
    """The resolved run config saved inside a checkpoint (``None``: not one of ours)."""
    allow_older_sampler_states()
    path = Path(path)
    meta = path / META_FILE if path.is_dir() else path
    try:
        ckpt = torch.load(meta, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    except Exception:  # noqa: BLE001
        return None
    return ckpt.get("run_config") if isinstance(ckpt, dict) else None


def link_last(target: Path) -> None:
    """``last.ckpt`` beside ``target`` names it, atomically: it always names a complete checkpoint."""
    link = Path(target).with_name(LAST_LINK)
    if link.is_dir() and not link.is_symlink():
        # A copy that Lightning's save_last wrote in a run directory of an earlier version: a
        # duplicate of a step checkpoint; a link cannot replace a directory.
        remove_path(link)
    replace_link(link, Path(target).name)


def remove_path(path: Path) -> None:
    """A checkpoint file or DCP directory, gone (nothing there: nothing to do)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
