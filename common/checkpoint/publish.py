"""Publishing: the moment a fully written checkpoint becomes visible, and pruning what keep_last drops.

Rank 0 alone renames and deletes (every rank has finished writing by then). A crash at any point
leaves either the previous state or the new one: the rename is atomic, ``last.ckpt`` is replaced
atomically, and a pruned checkpoint loses its complete name before its bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .files import PARTIAL_PREFIX, link_last, remove_path

log = logging.getLogger("common.train")


def publish(partial: Path, final: Path) -> None:
    """``partial`` (complete on disk) becomes ``final``, and ``last.ckpt`` names it."""
    remove_path(final)  # the same step saved before (a re-run of a step after a crash)
    os.replace(partial, final)  # the moment the checkpoint becomes visible, complete
    link_last(final)


def prune(final: Path) -> None:
    """A complete checkpoint, gone: renamed out of the complete names first, so that a crash while
    deleting leaves nothing that resume could pick."""
    if final.exists():
        doomed = final.with_name(PARTIAL_PREFIX + "old-" + final.name)
        os.replace(final, doomed)
        remove_path(doomed)


def remove_unfinished(directory: Path) -> None:
    """Partial checkpoints left by a writer of an earlier attempt that was killed before publishing."""
    if Path(directory).is_dir():
        for debris in Path(directory).glob(PARTIAL_PREFIX + "*"):
            log.info("removing %s: an unfinished checkpoint of an earlier attempt", debris)
            remove_path(debris)
