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
:class:`common.checkpoint.RunCheckpoint` (:mod:`common.checkpoint.publish`), in the step loop, once the
write is done.

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

from .files import remove_path


class CheckpointWriter:
    """Stages a checkpoint dict (as :func:`common.checkpoint.lightning_api.dump_checkpoint` makes it) and
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

    @classmethod
    def for_strategy(cls, strategy) -> CheckpointWriter:
        """The writer for a Lightning strategy: sharded under ModelParallelStrategy, pinned under DDP on a GPU."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        sharded = isinstance(strategy, ModelParallelStrategy)
        return cls(sharded=sharded, pin_memory=not sharded and strategy.root_device.type == "cuda")

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



class InFlight:
    """A checkpoint whose staged copy is being written in the background."""

    def __init__(self, partial: Path, final: Path, future: Future | None, record: dict):
        self.partial, self.final, self.future = partial, final, future
        self.record = record  # this save's row of RunCheckpoint.saves (write_s is filled in on completion)
        self.removals: list[Path] = []  # checkpoints keep_last drops once this one is complete

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self, remove_on_failure: bool) -> None:
        """Until written; the write's seconds go into the record. A failed write raises a RuntimeError
        naming the checkpoint, and (``remove_on_failure``: rank 0) its partial files are removed: a full
        disk gets the space back, and the previous checkpoint stays ``last``."""
        if self.future is None:
            return  # this rank wrote nothing (DDP, rank > 0)
        try:
            self.record["write_s"] = round(self.future.result(), 3)
        except BaseException as exc:
            if remove_on_failure:
                remove_path(self.partial)
            raise RuntimeError(f"checkpoint {self.final} could not be written: {type(exc).__name__}: {exc}") from exc
