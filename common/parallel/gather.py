"""Every rank's small Python object, in rank order: one helper for the run's end-of-run reports.

Usage (every rank calls it: a collective)::

    per_rank = gather_objects({"rank": rank, "peak_memory_bytes": n})   # [rank 0's, rank 1's, ...]

Without a process group (one process) it is ``[obj]``.
"""

from __future__ import annotations

import torch


def gather_objects(obj) -> list:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
