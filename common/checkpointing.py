"""Checkpoints that survive faults: atomic, auto-resumed, exact, and written on preemption.

A run's checkpoints live in ``<run_dir>/checkpoints/step<NNNNNN>.ckpt``: a file under DDP, a
torch.distributed.checkpoint directory (one shard per rank + ``meta.pt``) under
ModelParallelStrategy. Each holds the model, optimizer, LR scheduler, loop progress (step), the
data sampler's position and every rank's RNG states.

* Atomic: a checkpoint is written as ``.partial-step<N>.ckpt`` and renamed by rank 0 once every
  rank has finished writing; a name matching ``step<N>.ckpt`` is always complete, and resume
  never looks at anything else. ``last.ckpt`` links to the newest.
* Every ``checkpoint.every_n_steps`` steps and at the last step, keeping the newest
  ``checkpoint.keep_last``.
* Auto-resume: starting a run with the same ``run.name`` continues from its newest complete
  checkpoint (``run.resume=false`` starts afresh; ``run.resume_from=<ckpt>`` picks one).
* Preemption: on SIGTERM (or Ctrl-C, SIGINT) every rank saves at the next step boundary and the run exits 0 (within
  ``checkpoint.preemption_grace_s``, else it exits 1 and the last complete checkpoint stands).
* Asynchronous (``checkpoint.async_save``, on with a GPU): the step loop stops only while every rank
  copies its state to host memory; a thread writes the copy (:mod:`common.checkpoint_writer`) and
  the checkpoint is published (renamed, linked, older ones pruned) at the first step boundary after
  the write is done. The next save waits for the previous one; the last step's and a signal's save
  are synchronous. A run that fails or is killed while a write is in flight keeps the previous
  checkpoint as ``last``; the unfinished one keeps its partial name and is removed by the next attempt.

Usage (what ``common/train.py`` does)::

    ckpt_path, resume_step = resolve_resume(cfg, run_dir)
    callbacks = [recorder, ExactResume(), RunCheckpoint(run_dir / "checkpoints", every_n_steps=250,
                                                        keep_last=2, preemption_grace_s=60)]
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted:
        ...  # checkpoint written: exit 0, the restarted job resumes from it
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from common.data.buckets import allow_older_sampler_states
from common.parallel.gather import gather_objects
from common.parallel.strategy import META_FILE

log = logging.getLogger("common.train")

CHECKPOINT_NAME = re.compile(r"^step(\d+)\.ckpt$")
PARTIAL_PREFIX = ".partial-"
LAST_LINK = "last.ckpt"  # -> the newest complete checkpoint (make transcribe's default); resume reads names
# Fault injection for tests (never set in a real run): rank 0 writes the checkpoint of this step
# in full, logs HELD_MESSAGE and waits there, before the rename that makes it complete, so a
# test kills the job at the one moment an atomic write must survive, without racing the write.
HOLD_STEP_ENV = "SPEECH_RECIPES_HOLD_CHECKPOINT_AT_STEP"
HELD_MESSAGE = "held before its rename"
# Tests only: an asynchronous save's writer waits this many seconds before it writes, so that the
# steps after the save change the live tensors first (the staged copy is what must be written).
WRITE_DELAY_ENV = "SPEECH_RECIPES_CHECKPOINT_WRITE_DELAY_S"


class Preempted(Exception):
    """Raised on every rank after the checkpoint of a SIGTERM (``status`` preempted) or a Ctrl-C
    (SIGINT, ``status`` interrupted) is written."""

    def __init__(self, message: str, status: str = "preempted"):
        super().__init__(message)
        self.status = status


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


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None if it reads as complete.

    A file (DDP): every zip member's CRC-32 (torch.save writes them) and the pickled object.
    A sharded directory (DCP): ``meta.pt`` loads, ``.metadata`` loads, and every shard file
    it names exists and is long enough for the byte ranges it lists. Reads every byte of a file
    checkpoint (about a second per GB); a directory's shards are only sized.
    """
    allow_older_sampler_states()  # checkpoints of earlier versions read as complete, not damaged
    import zipfile

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


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _with_legacy(run_config: dict) -> dict:
    """A stored run config with the settings its model family added since filled in as it was trained."""
    from omegaconf import OmegaConf

    from common.models import with_legacy_settings

    try:
        return OmegaConf.to_container(with_legacy_settings(OmegaConf.create(run_config)))
    except Exception:  # noqa: BLE001 - a model this version no longer registers: compare as stored
        return run_config


def refuse_other_model(path: Path, cfg, run_dir: Path | None = None) -> None:
    """:class:`ConfigError` if the checkpoint at ``path`` was written for another model or tokenizer
    (``model.*``) than this launch's: the differing settings, as the overrides that give the
    checkpoint's back. Called before anything in the run directory changes."""
    from common.errors import ConfigError

    # The recipe alone may differ: salm_fsdp2 and salm_tp_fsdp2 train the same model in two layouts, and
    # DCP reshards a checkpoint of one for the other. Another recipe's model differs in its settings.
    where = f"run directory {run_dir} holds checkpoints" if run_dir else f"checkpoint {path} was written"
    changed = model_settings_changed(path, cfg)
    if changed:
        shown = " ".join(changed[:12]) + (f" (and {len(changed) - 12} more)" if len(changed) > 12 else "")
        raise ConfigError(f"{where} of another model than this launch's ({Path(path).name}); to resume it, "
                          f"launch with its settings: {shown}; for a new run choose another run.name (RUN_NAME). "
                          "Nothing was changed")


def check_relaunch(cfg, run_dir: Path) -> None:
    """Before any rank starts (``common.tools.launch``): what :func:`resolve_resume` would refuse for
    another model, from the newest checkpoint's stored config alone (read-only, no shard is read)."""
    explicit = cfg.run.get("resume_from")
    if explicit:
        if Path(explicit).exists():
            refuse_other_model(Path(explicit), cfg)
        return
    if not cfg.run.resume:
        return
    for _, path in reversed(complete_checkpoints(Path(run_dir) / "checkpoints")):
        if checkpoint_run_config(path) is not None:
            refuse_other_model(path, cfg, run_dir)
            return


def model_settings_changed(path: Path, cfg) -> list[str]:
    """``model.<key>=<the checkpoint's value>`` for every model setting of this run that differs from
    the one ``path`` was written with (``model.about``, documentation only, left out): the overrides
    that give the checkpoint's model back, e.g. after a default changed."""
    from omegaconf import OmegaConf

    run_config = checkpoint_run_config(path)
    if not run_config or not isinstance(run_config.get("model"), dict):
        return []
    theirs = _flat(_with_legacy(run_config)["model"])
    ours = _flat(OmegaConf.to_container(cfg.model, resolve=True))
    unset = object()
    changed = []
    for key in sorted(set(theirs) | set(ours)):
        if key.split(".")[0] != "about" and theirs.get(key, unset) != ours.get(key, unset):
            value = theirs.get(key, unset)
            changed.append(f"model.{key}={'null' if value is None else value}" if value is not unset
                           else f"~model.{key}")
    return changed


def check_resume_from(explicit: str, cfg) -> None:
    """``run.resume_from`` must name a complete, readable checkpoint of this run's model that its
    strategy can load; a ConfigError says which of these it is not."""
    from common.errors import ConfigError
    from common.rundir import is_run_directory

    path = Path(explicit)
    if not path.exists():
        raise ConfigError(f"run.resume_from={explicit}: no such checkpoint")
    if path.name.startswith(PARTIAL_PREFIX):
        raise ConfigError(f"run.resume_from={explicit} is an incomplete checkpoint (its writer was stopped); "
                          "use a step<N>.ckpt one")
    if is_run_directory(path):
        raise ConfigError(f"run.resume_from={explicit} is a run directory; give one of its checkpoints, "
                          f"e.g. {path / 'checkpoints' / LAST_LINK}")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"run.resume_from={explicit} cannot be read: {problem}")
    run_config = checkpoint_run_config(path)
    if run_config is None:
        raise ConfigError(f"run.resume_from={explicit} holds no run_config: not a checkpoint written by "
                          "common.train")
    theirs, ours = run_config.get("model", {}).get("name"), cfg.model.name
    if theirs != ours:
        raise ConfigError(f"run.resume_from={explicit} is a {theirs!r} checkpoint (recipe "
                          f"{run_config.get('recipe')!r}); this run trains {ours!r} (recipe {cfg.recipe!r})")
    refuse_other_model(path, cfg)
    if path.is_dir() and "DDPStrategy" in str(cfg.trainer.strategy.get("_target_")):
        raise ConfigError(f"run.resume_from={explicit} is a sharded (FSDP2/TP) checkpoint directory; "
                          f"recipe {cfg.recipe!r} uses DDPStrategy, which reads only single-file checkpoints "
                          "(make export gives consolidated weights)")


def resolve_resume(cfg, run_dir: Path, rank: int = 0) -> tuple[str | None, int]:
    """The checkpoint this run continues from (``None``: from scratch) and its step.

    ``run.resume_from`` if set (it must be a complete checkpoint of the same model); else, with
    ``run.resume`` (default true), the newest complete checkpoint of this run directory that can
    be read: a newer one that cannot (cut short by a full disk, damaged) is moved aside into
    ``checkpoints/unreadable/`` by rank 0, with the reason logged, and the next older one is used.
    A fresh start (``run.resume=false``) moves an earlier attempt's checkpoints aside (rank 0),
    so that they are neither resumed nor pruned as ours.
    """
    allow_older_sampler_states()  # the checkpoint Lightning loads next may be of an earlier version
    ckpt_dir = Path(run_dir) / "checkpoints"
    explicit = cfg.run.get("resume_from")
    if explicit:
        check_resume_from(explicit, cfg)
        return str(Path(explicit)), checkpoint_step(Path(explicit)) or 0
    found = complete_checkpoints(ckpt_dir)
    if cfg.run.resume:
        for step, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                refuse_other_model(path, cfg, run_dir)  # before anything in the run directory changes
                log.info("resuming %s from its latest complete checkpoint %s (step %d)", cfg.run.name, path, step)
                if rank == 0 and path != found[-1][1]:
                    _link(path, ckpt_dir / LAST_LINK)
                return str(path), step
            log.warning("checkpoint %s cannot be read (%s): %s", path, problem,
                        "moved to checkpoints/unreadable/, trying the one before" if rank == 0 else "skipped")
            if rank == 0:
                aside = ckpt_dir / "unreadable"
                aside.mkdir(exist_ok=True)
                os.replace(path, aside / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        return None, 0
    if rank == 0 and ckpt_dir.exists():
        aside = ckpt_dir.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(aside)
        log.info("run.resume=false: starting afresh; the earlier checkpoints are kept in %s", aside)
    return None, 0


class InFlight:
    """A checkpoint whose staged copy is being written in the background."""

    def __init__(self, partial: Path, final: Path, future, record: dict):
        self.partial, self.final, self.future = partial, final, future
        self.record = record  # this save's row of RunCheckpoint.saves (write_s is filled in on completion)
        self.removals: list[str] = []  # checkpoints keep_last drops once this one is complete

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> float | None:
        """The write's seconds (``None``: this rank wrote nothing); raises what the write raised."""
        return None if self.future is None else self.future.result()


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint, atomic; also saves at the last step and on SIGTERM (then raises ``Preempted``);
    ``async_save``: stage in the step loop, write in the background (:mod:`common.checkpoint_writer`)."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int, preemption_grace_s: float = 60.0,
                 check_stop_every_n_steps: int = 1, at_end: bool = True, async_save: bool = False):
        super().__init__(dirpath=dirpath, filename="step{step:06d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=keep_last, monitor="step", mode="max",
                         save_last=False)
        self.preemption_grace_s = preemption_grace_s
        self._sigterm_at: float | None = None
        self.stop_signal: str | None = None  # "SIGTERM" | "SIGINT" once one arrived
        # Ranks agree on a signal at log steps only (trainer.log_every_n_steps): an agreement is a
        # collective and a host sync, which a step should not wait for. The grace period must
        # cover that many steps.
        self.check_stop_every = max(1, int(check_stop_every_n_steps))
        self.at_end = at_end  # False: the end of max_steps saves nothing (benchmarks); a signal still saves
        self._hold_at_step = int(os.environ.get(HOLD_STEP_ENV) or -1)  # tests only (HOLD_STEP_ENV)
        self.on_published = None  # called on rank 0 once a checkpoint is complete (common.train: `latest`)
        self.saves: list[dict] = []  # {"step", "mode", "stall_s", "write_s"} of each save of this attempt
        self.async_save = async_save
        self._writer = None  # common.checkpoint_writer.CheckpointWriter, when saving asynchronously
        self._in_flight: InFlight | None = None
        self._sync_next = False  # the last step's and a signal's save: written before the loop goes on

    @property
    def latest_path(self) -> str | None:
        """The checkpoint written last by this run (``None``: none yet)."""
        return self._last_checkpoint_saved or None

    # --- asynchronous saves ----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.async_save and self._writer is None and stage == "fit":
            from lightning.pytorch.strategies import ModelParallelStrategy

            from common.checkpoint_writer import CheckpointWriter

            sharded = isinstance(trainer.strategy, ModelParallelStrategy)
            self._writer = CheckpointWriter(sharded=sharded,
                                            pin_memory=not sharded and trainer.strategy.root_device.type == "cuda")
        if trainer.is_global_zero and Path(self.dirpath).is_dir():
            for debris in Path(self.dirpath).glob(PARTIAL_PREFIX + "*"):
                # Left by a writer of an earlier attempt that was killed (or failed) before publishing.
                log.info("removing %s: an unfinished checkpoint of an earlier attempt", debris)
                _remove(debris)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _collect(self, trainer, wait: bool) -> None:
        """The in-flight save, once written (``wait``: wait for it): published by rank 0."""
        job = self._in_flight
        if job is None or not (wait or job.done()):
            return
        self._in_flight = None
        try:
            write_s = job.wait()
        except BaseException as exc:
            if trainer.is_global_zero:
                _remove(job.partial)  # a full disk gets the space back; the previous checkpoint stays `last`
            raise RuntimeError(f"checkpoint {job.final} could not be written: {type(exc).__name__}: {exc}") from exc
        if write_s is not None:
            job.record["write_s"] = round(write_s, 3)
        self._publish(trainer, job.partial, job.final, job.removals)

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
                        "complete one is %s)", job.final.name, self._last_checkpoint_saved or "none")

    # --- preemption and interrupts ---------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler (registered just before), which broadcasts from
        # inside the handler, i.e. at an arbitrary point of a collective on whichever rank got the
        # signal. Ours only sets a flag; ranks agree on it at the next step boundary. Ctrl-C
        # (SIGINT, which torchrun forwards to every rank) is handled the same way; a second
        # Ctrl-C stops at once (KeyboardInterrupt), keeping the last complete checkpoint.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._sigterm_at is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._sigterm_at = time.monotonic()
        self.stop_signal = signal.Signals(signum).name
        print(f"{self.stop_signal}: saving a checkpoint at the next step boundary, then exiting "
              f"(grace {self.preemption_grace_s:g}s)", file=sys.stderr, flush=True)
        timer = threading.Timer(self.preemption_grace_s, _grace_expired, args=(self.preemption_grace_s,))
        timer.daemon = True
        timer.start()

    def _stop_requested(self, trainer) -> int:
        """On every rank: 0 (go on), 1 (some rank got SIGTERM) or 2 (some rank got SIGINT); one tiny
        all-reduce per check."""
        mine = 0.0 if self._sigterm_at is None else (2.0 if self.stop_signal == "SIGINT" else 1.0)
        flag = torch.tensor([mine], device=trainer.strategy.root_device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect(trainer, wait=False)  # publish a background write that has finished
        step = trainer.global_step
        last = step >= trainer.max_steps > 0
        stop = self._stop_requested(trainer) if last or step % self.check_stop_every == 0 else 0
        if stop or trainer.global_step >= trainer.max_steps > 0:
            if (stop or self.at_end) and self._last_global_step_saved != trainer.global_step:
                self._sync_next = True  # the process exits after this save: nothing may be left in flight
                try:
                    self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
                finally:
                    self._sync_next = False
            if stop:
                name = "SIGINT (Ctrl-C)" if stop == 2 else "SIGTERM"
                raise Preempted(f"stopped by {name} after step {trainer.global_step}; checkpoint "
                                f"{self._last_checkpoint_saved}; the same command resumes",
                                status="interrupted" if stop == 2 else "preempted")
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # --- atomic writes --------------------------------------------------------------------------
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._collect(trainer, wait=True)  # one save at a time: the previous one is complete first
        started = time.perf_counter()
        final = Path(filepath)
        partial = final.with_name(PARTIAL_PREFIX + final.name)
        if trainer.is_global_zero:
            _remove(partial)  # left by a writer that was killed
        trainer.strategy.barrier("checkpoint.clean")
        hold = trainer.global_step == self._hold_at_step and trainer.is_global_zero
        if self._writer is not None and not self._sync_next:
            # Every rank: callbacks' states and the model's (sharded) state dict, as trainer.save_checkpoint
            # makes them (collectives included), then a private copy; the write goes on in the background.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            delay_s = float(os.environ.get(WRITE_DELAY_ENV) or 0)  # tests only (WRITE_DELAY_ENV)
            future = self._writer.submit(checkpoint, partial, trainer.is_global_zero,
                                         before=(lambda: time.sleep(delay_s)) if delay_s else None,
                                         after=(lambda: self._hold(partial)) if hold else None)
            record = {"step": trainer.global_step, "mode": "async",
                      "stall_s": round(time.perf_counter() - started, 3), "write_s": None}
            self.saves.append(record)  # the step loop waited this long: summary.json "checkpoint_saves"
            self._in_flight = InFlight(partial, final, future, record)
            self._last_global_step_saved = trainer.global_step
            return
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)  # every rank; returns after a barrier
        except BaseException:
            if trainer.is_global_zero:  # a full disk gets the space back, for the run's record
                _remove(partial)
            raise
        write_s = time.perf_counter() - started
        if hold:
            self._hold(partial)
        self._publish(trainer, partial, final)
        trainer.strategy.barrier("checkpoint.publish")
        self._last_global_step_saved = trainer.global_step
        # The step loop waited this long (every rank: the save ends with a barrier): summary.json "checkpoint_saves".
        self.saves.append({"step": trainer.global_step, "mode": "sync",
                           "stall_s": round(time.perf_counter() - started, 3), "write_s": round(write_s, 3)})

    def _hold(self, partial: Path) -> None:
        log.warning("checkpoint %s written, %s (%s=%d): waiting to be killed", partial, HELD_MESSAGE,
                    HOLD_STEP_ENV, self._hold_at_step)
        while True:
            time.sleep(1)

    def _publish(self, trainer, partial: Path, final: Path, removals: list[str] = ()) -> None:
        """Rank 0 renames a fully written checkpoint to its complete name, links ``last.ckpt`` to it
        and prunes what ``keep_last`` dropped meanwhile; every rank records it as its newest."""
        if trainer.is_global_zero:
            _remove(final)  # the same step saved before (a re-run of a step after a crash)
            os.replace(partial, final)  # the moment the checkpoint becomes visible, complete
            _link(final, final.with_name(LAST_LINK))
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            if self.on_published is not None:
                self.on_published()
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
            for doomed in removals:
                self._remove_checkpoint(trainer, doomed)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self._in_flight is not None:
            # keep_last counts the checkpoint being written: the one it replaces goes once it is complete.
            self._in_flight.removals.append(filepath)
            return
        # Renamed out of the complete names first: a crash while deleting leaves no half checkpoint
        # that resume could pick.
        if trainer.is_global_zero and Path(filepath).exists():
            doomed = Path(filepath).with_name(PARTIAL_PREFIX + "old-" + Path(filepath).name)
            os.replace(filepath, doomed)
            _remove(doomed)


def _link(target: Path, link: Path) -> None:
    from common.rundir import replace_link

    if link.is_dir() and not link.is_symlink():
        # A copy that Lightning's save_last wrote in a run directory of an earlier version: a
        # duplicate of a step checkpoint; a link cannot replace a directory.
        _remove(link)
    replace_link(link, target.name)  # atomic: last.ckpt always names a complete checkpoint


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _grace_expired(grace_s: float) -> None:
    print(f"error: no checkpoint within checkpoint.preemption_grace_s={grace_s:g}s of SIGTERM; exiting "
          "(the last complete checkpoint is kept)", file=sys.stderr, flush=True)
    os._exit(1)


class ExactResume(Callback):
    """Every rank's python/numpy/torch RNG states in the checkpoint, put back at the first resumed step.

    Together with the data sampler's position (common.data.datamodule) and per-batch seeded
    augmentation (common.data.features.seeded_generator) a resumed run repeats the uninterrupted run's
    losses exactly (CPU, fp32). States are plain tensors/lists, loadable with ``weights_only=True``.
    States of another world size (a resharded resume) are not applied.
    """

    def __init__(self):
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = gather_objects(rng_states())  # every rank is saving: a collective is safe

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states and len(states) == trainer.world_size:
            self._pending = states[trainer.global_rank]
        elif states:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: not restored (losses will not "
                        "repeat bit for bit)", len(states), trainer.world_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Applied here, not at load time: between loading and the first step Lightning runs the
        # sanity check and starts the DataLoader, which the uninterrupted run did not do at this point.
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def rng_states() -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
