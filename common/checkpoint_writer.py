"""Checkpoints written in the background (``checkpoint.async_save``): the step loop stops only to
take a private copy of the state, a thread writes that copy while training goes on.

torchtitan's async checkpointing, in the shape of this repository's checkpoints (the same files
Lightning writes, so resume, ``make export`` and ``make transcribe`` read them unchanged):

* **staging**: in the step loop, every rank copies its state to host memory that training does not
  touch (torch's ``DefaultStager``: a storage-level deep copy; its buffers are kept and reused
  from one save to the next, so host memory stays flat over a long run; pinned under DDP on a GPU).
  The copy is what makes the write exact: the next optimizer step changes the live tensors.
* **writing**, in one background thread per rank: under ``ModelParallelStrategy`` the rank's
  shards with ``torch.distributed.checkpoint`` (its ranks coordinate through collectives, so
  over their own gloo process group: never interleaved with the training step's collectives on
  the default one), then ``meta.pt`` (rank 0, after the shards: a complete directory); under
  DDP rank 0 alone writes the one file with ``torch.save``, the other ranks stage nothing.

Publishing (the rename that makes ``step<N>.ckpt`` visible, ``last.ckpt``, ``keep_last``) stays with
:class:`common.checkpointing.RunCheckpoint`, in the step loop, once the write is done.

Usage (what ``RunCheckpoint`` does)::

    writer = CheckpointWriter(sharded=True)              # on every rank, after the process group exists
    future = writer.submit(checkpoint_dict, partial_dir, is_rank_zero=rank == 0)   # returns after staging
    ...                                                   # training goes on
    write_s = future.result()                             # raises what the write raised
    writer.close()
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from common.parallel.strategy import META_FILE


class CheckpointWriter:
    """Stages a checkpoint dict (as ``trainer._checkpoint_connector.dump_checkpoint`` makes it) and
    writes it in a background thread; one save at a time (the caller waits for the previous one).

    ``sharded``: a ``ModelParallelStrategy`` checkpoint (a DCP directory on every rank) rather than
    DDP's single file (rank 0). ``pin_memory``: page-locked staging buffers (DDP on a GPU, where
    the state is on the device and its storages are the same at every save)."""

    def __init__(self, sharded: bool, pin_memory: bool = False):
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.sharded = sharded
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=pin_memory, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=False))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._group = None
        if sharded and dist.is_available() and dist.is_initialized():
            # Every rank calls this at the same point (RunCheckpoint.setup): a collective itself.
            self._group = dist.new_group(backend="gloo")

    def submit(self, checkpoint: dict, path: Path, is_rank_zero: bool, before: Callable[[], None] | None = None,
               after: Callable[[], None] | None = None) -> Future | None:
        """Stage ``checkpoint`` (returns once the copy is taken), then write it to ``path`` in the
        background. The future's result is the write's seconds; ``None``: this rank writes nothing
        (DDP, rank > 0). ``before``/``after`` run in the writer around the write (fault-injection tests)."""
        path = Path(path)
        if not self.sharded and not is_rank_zero:
            return None
        (path if self.sharded else path.parent).mkdir(parents=True, exist_ok=True)
        staged = self._stager.stage(checkpoint)
        return self._executor.submit(self._write, staged, path, is_rank_zero, before, after)

    def _write(self, staged: dict, path: Path, is_rank_zero: bool, before, after) -> float:
        if before is not None:
            before()
        started = time.perf_counter()
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            # The layout Lightning's ModelParallelStrategy.save_checkpoint writes (and load_checkpoint reads).
            shards = {"state_dict": staged.pop("state_dict")}
            shards.update({f"optimizer_{i}": s for i, s in enumerate(staged.pop("optimizer_states", []))})
            dcp.save(shards, checkpoint_id=path, process_group=self._group)
            if is_rank_zero:
                torch.save(staged, path / META_FILE)
        else:
            with open(path, "wb") as f:  # straight to the file: no second copy of the state in memory
                try:
                    torch.save(staged, f)
                except RuntimeError as exc:  # torch reports a full disk as "unexpected pos": named here
                    free = shutil.disk_usage(path.parent).free
                    if free < 2**20:
                        raise OSError(errno.ENOSPC, f"No space left on device ({free} bytes free)", str(path)) from exc
                    raise
        if after is not None:
            after()
        return time.perf_counter() - started

    def close(self) -> None:
        """Frees the staging buffers; a write still running finishes in its thread (not waited for)."""
        self._executor.shutdown(wait=False)
        self._stager.close()

