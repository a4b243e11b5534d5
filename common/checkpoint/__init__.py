"""Checkpoints that survive faults: atomic, auto-resumed, exact, and written on preemption.

The contract (what a run directory's user and every other module may rely on):

* A run's checkpoints live in ``<run_dir>/checkpoints/step<NNNNNN>.ckpt``: a file under DDP, a
  torch.distributed.checkpoint directory (one shard per rank + ``meta.pt``) under
  ModelParallelStrategy. Each holds the model, optimizer, LR scheduler, loop progress (step), the
  data sampler's position, every rank's RNG states and the resolved run config.
* **Atomic**: a name matching ``step<N>.ckpt`` is always complete; resume never looks at anything
  else. ``last.ckpt`` links to the newest.
* Saved every ``checkpoint.every_n_steps`` steps and at the last step, keeping the newest
  ``checkpoint.keep_last``.
* **Auto-resume**: a launch with the same ``run.name`` continues from its newest complete, readable
  checkpoint (``run.resume=false`` starts afresh; ``run.resume_from=<ckpt>`` picks one).
* **Preemption**: on SIGTERM (or Ctrl-C) every rank saves at the same step boundary and the run
  stops with status ``preempted`` (``interrupted``), within ``checkpoint.preemption_grace_s``.
* **Asynchronous** (``checkpoint.async_save``, on with a GPU): the step loop stops only while every
  rank copies its state to host memory; a thread writes the copy; it is published at the first step
  boundary after the write. A run killed while a write is in flight keeps the previous checkpoint.
* **Exact**: a resumed run repeats the uninterrupted run's losses (CPU, fp32).

One concern per file:

    files.py          names, what is complete, reading a checkpoint's health and stored config
    resume.py         which checkpoint a launch continues from; what a relaunch must refuse
    publish.py        partial -> complete (rename), last.ckpt, pruning what keep_last drops
    preemption.py     signals noted on a rank, agreed across ranks at a step boundary
    writer.py         staging and background writes (asynchronous saves)
    exact_resume.py   every rank's RNG states
    lightning_api.py  every call into Lightning's private API (the version it was checked against)
    callback.py       RunCheckpoint: the Lightning callback that puts these together

Usage (what ``common/train.py`` does)::

    ckpt_path, resume_step = resolve_resume(cfg, run_dir, rank)
    checkpoint = RunCheckpoint(run_dir / "checkpoints", every_n_steps=250, keep_last=2,
                               preemption_grace_s=60, faults=FaultHooks.from_env(os.environ))
    trainer = L.Trainer(callbacks=[ExactResume(), checkpoint], ...)
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted:
        ...  # checkpoint written: the restarted job resumes from it
"""

from .callback import HELD_MESSAGE, HOLD_STEP_ENV, WRITE_DELAY_ENV, FaultHooks, RunCheckpoint
from .exact_resume import ExactResume
from .files import (
                    LAST_LINK,
                    PARTIAL_PREFIX,
                    checkpoint_problem,
                    checkpoint_run_config,
                    checkpoint_step,
                    complete_checkpoints,
)
from .preemption import Preempted
from .resume import check_relaunch, check_resume_from, model_settings_changed, resolve_resume

__all__ = ["HELD_MESSAGE", "HOLD_STEP_ENV", "LAST_LINK", "PARTIAL_PREFIX", "WRITE_DELAY_ENV", "ExactResume",
           "FaultHooks", "Preempted", "RunCheckpoint", "check_relaunch", "check_resume_from", "checkpoint_problem",
           "checkpoint_run_config", "checkpoint_step", "complete_checkpoints", "model_settings_changed",
           "resolve_resume"]
