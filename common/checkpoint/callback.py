"""RunCheckpoint: the Lightning callback that puts the checkpoint package together.

A save at every ``checkpoint.every_n_steps``, at the last step and on a signal; written under a
partial name (:mod:`.files`), synchronously or staged and written in the background (:mod:`.writer`),
then published (:mod:`.publish`); signals agreed across ranks (:mod:`.preemption`). Lightning's
private API only through :mod:`.lightning_api`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .files import partial_path, remove_path
from .lightning_api import CheckpointHooks, dump_checkpoint
from .preemption import GO_ON, StopSignal
from .publish import prune, publish, remove_unfinished
from .writer import CheckpointWriter, InFlight

log = logging.getLogger("common.train")

# Fault injection for tests (never set in a real run; read by common.train, passed in as FaultHooks).
HOLD_STEP_ENV = "SPEECH_RECIPES_HOLD_CHECKPOINT_AT_STEP"
HELD_MESSAGE = "held before its rename"
WRITE_DELAY_ENV = "SPEECH_RECIPES_CHECKPOINT_WRITE_DELAY_S"


@dataclass(frozen=True)
class FaultHooks:
    """Test-only faults. ``hold_at_step``: rank 0 writes that step's checkpoint in full, logs
    HELD_MESSAGE and waits, before the rename that makes it complete, so that a test kills the job at
    the one moment an atomic write must survive. ``write_delay_s``: an asynchronous save's writer
    waits before writing, so that the steps after the save change the live tensors first (the staged
    copy is what must be written)."""

    hold_at_step: int = -1
    write_delay_s: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultHooks:
        return cls(hold_at_step=int(environ.get(HOLD_STEP_ENV) or -1),
                   write_delay_s=float(environ.get(WRITE_DELAY_ENV) or 0))


class RunCheckpoint(CheckpointHooks):
    """Atomic checkpoints every ``every_n_steps``, at the end (``at_end``) and on SIGTERM/SIGINT (then
    raises :class:`.preemption.Preempted`); ``async_save``: stage in the step loop, write in the
    background. ``check_stop_every_n_steps``: ranks agree on a signal at log steps only (a collective
    and a host sync, which a step should not wait for; the grace period must cover that many steps)."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int, preemption_grace_s: float = 60.0,
                 check_stop_every_n_steps: int = 1, at_end: bool = True, async_save: bool = False,
                 faults: FaultHooks | None = None):
        super().__init__(dirpath=dirpath, filename="step{step:06d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=keep_last, monitor="step", mode="max",
                         save_last=False)
        self.every_n_steps = every_n_steps
        self.stop = StopSignal(preemption_grace_s)
        self.check_stop_every = max(1, int(check_stop_every_n_steps))
        self.at_end = at_end  # False: no extra save at the last step (benchmarks); the schedule's and a signal's still save
        self.async_save = async_save
        self.faults = faults or FaultHooks()
        self.on_published = None  # called on rank 0 once a checkpoint is complete (common.train: `latest`)
        self.saves: list[dict] = []  # {"step", "mode", "stall_s", "write_s"} of each save of this attempt
        self._writer: CheckpointWriter | None = None
        self._in_flight: InFlight | None = None
        self._sync_next = False  # the last step's and a signal's save: written before the loop goes on

    @property
    def latest_path(self) -> str | None:
        """The checkpoint written last by this run (``None``: none yet)."""
        return self.newest or None

    @property
    def stop_signal(self) -> str | None:
        return self.stop.name

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.async_save and self._writer is None and stage == "fit":
            self._writer = CheckpointWriter.for_strategy(trainer.strategy)
        if trainer.is_global_zero:
            remove_unfinished(Path(self.dirpath))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.stop.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect(trainer, wait=False)  # publish a background write that has finished
        step = trainer.global_step
        last = step >= trainer.max_steps > 0
        stop = self.stop.agreed(trainer.strategy.root_device) if last or step % self.check_stop_every == 0 else GO_ON
        if stop != GO_ON or last:
            if (stop != GO_ON or self.at_end or step % self.every_n_steps == 0) and self.saved_step != step:
                self._sync_next = True  # the process exits after this save: nothing may be left in flight
                try:
                    self.save_now(trainer)
                finally:
                    self._sync_next = False
            if stop != GO_ON:
                raise StopSignal.preempted(stop, step, self.newest)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        self._collect(trainer, wait=True)  # a save still in flight (checkpoint.at_end=false) completes

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A failing run is not waited for: a write in flight keeps its partial name (the next attempt
        # removes it) and `last` names the previous checkpoint. One already written is published.
        job = self._in_flight
        if job is not None and job.done():
            try:
                self._collect(trainer, wait=False)
            except Exception as exc:  # noqa: BLE001 - the run's own error is the one to report
                log.warning("%s", exc)
        elif job is not None:
            log.warning("checkpoint %s was being written when the run failed: not published (the newest "
                        "complete one is %s)", job.final.name, self.newest or "none")

    def write(self, trainer, final: Path) -> None:
        self._collect(trainer, wait=True)  # one save at a time: the previous one is complete first
        started = time.perf_counter()
        partial = partial_path(final)
        if trainer.is_global_zero:
            remove_path(partial)  # left by a writer that was killed
        trainer.strategy.barrier("checkpoint.clean")
        hold = trainer.global_step == self.faults.hold_at_step and trainer.is_global_zero
        if self._writer is not None and not self._sync_next:
            # Every rank: the checkpoint dict (collectives included), then a private copy; the write
            # goes on in the background.
            delay_s = self.faults.write_delay_s
            future = self._writer.submit(dump_checkpoint(trainer, self.save_weights_only), partial,
                                         trainer.is_global_zero,
                                         before=(lambda: time.sleep(delay_s)) if delay_s else None,
                                         after=(lambda: _hold(partial, self.faults)) if hold else None)
            record = {"step": trainer.global_step, "mode": "async",
                      "stall_s": round(time.perf_counter() - started, 3), "write_s": None}
            self.saves.append(record)  # the step loop waited this long: summary.json "checkpoint_saves"
            self._in_flight = InFlight(partial, final, future, record)
            self.saved_step = trainer.global_step
            return
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)  # every rank; returns after a barrier
        except BaseException:
            if trainer.is_global_zero:  # a full disk gets the space back, for the run's record
                remove_path(partial)
            raise
        write_s = time.perf_counter() - started
        if hold:
            _hold(partial, self.faults)
        self._published(trainer, partial, final)
        trainer.strategy.barrier("checkpoint.publish")
        self.saved_step = trainer.global_step
        # The step loop waited this long (every rank: the save ends with a barrier): summary.json "checkpoint_saves".
        self.saves.append({"step": trainer.global_step, "mode": "sync",
                           "stall_s": round(time.perf_counter() - started, 3), "write_s": round(write_s, 3)})

    def prune(self, trainer, final: Path) -> None:
        if self._in_flight is not None:
            # keep_last counts the checkpoint being written: the one it replaces goes once it is complete.
            self._in_flight.removals.append(final)
        elif trainer.is_global_zero:
            prune(final)

    def _collect(self, trainer, wait: bool) -> None:
        """The in-flight save, once written (``wait``: wait for it): published by rank 0."""
        job = self._in_flight
        if job is None or not (wait or job.done()):
            return
        self._in_flight = None
        job.wait(remove_on_failure=trainer.is_global_zero)  # raises what the write raised, named
        self._published(trainer, job.partial, job.final, job.removals)

    def _published(self, trainer, partial: Path, final: Path, removals: list[Path] = ()) -> None:
        """Rank 0 publishes and prunes what keep_last dropped meanwhile; every rank records it as its newest."""
        if trainer.is_global_zero:
            publish(partial, final)
        self.newest = str(final)
        if trainer.is_global_zero:
            if self.on_published is not None:
                self.on_published()
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
            for doomed in removals:
                prune(doomed)


def _hold(partial: Path, faults: FaultHooks) -> None:
    log.warning("checkpoint %s written, %s (%s=%d): waiting to be killed", partial, HELD_MESSAGE, HOLD_STEP_ENV,
                faults.hold_at_step)
    while True:
        time.sleep(1)
