"""Every call into Lightning's private checkpoint API, in one place (checked against lightning 2.6.6).

``ModelCheckpoint`` keeps the schedule (``every_n_train_steps``) and the ``keep_last`` bookkeeping
(``save_top_k`` on the step), which we want; but it writes and deletes in place, and a checkpoint of
ours must be written under a partial name, published by a rename, possibly in the background. So:

* ``_save_checkpoint`` / ``_remove_checkpoint``, which ModelCheckpoint calls to write and to prune,
  are overridden to call :meth:`CheckpointHooks.write` / :meth:`CheckpointHooks.prune`;
* ``_save_topk_checkpoint(trainer, _monitor_candidates(trainer))`` saves now, outside the schedule
  (the last step, a signal), through the same keep_last bookkeeping: :meth:`save_now`;
* ``_last_global_step_saved`` / ``_last_checkpoint_saved`` are what ModelCheckpoint reads to skip a
  step already saved and what it reports as the newest: :attr:`saved_step`, :attr:`newest`;
* ``trainer._checkpoint_connector.dump_checkpoint`` is the dict ``trainer.save_checkpoint`` would
  write (callbacks' states and the strategy's state dict, collectives included), for a background
  write: :func:`dump_checkpoint`.

``tests/unit/test_checkpoint_package.py`` fails on a Lightning without these names.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

CHECKED_AGAINST = "2.6.6"
PRIVATE_NAMES = ("_save_checkpoint", "_remove_checkpoint", "_save_topk_checkpoint", "_monitor_candidates")


class CheckpointHooks(ModelCheckpoint):
    """ModelCheckpoint whose writes and deletions go to :meth:`write` and :meth:`prune`."""

    def write(self, trainer, final: Path) -> None:
        raise NotImplementedError

    def prune(self, trainer, final: Path) -> None:
        raise NotImplementedError

    def save_now(self, trainer) -> None:
        """A save at this step, outside the schedule, counted by keep_last like a scheduled one."""
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def saved_step(self) -> int:
        return self._last_global_step_saved

    @saved_step.setter
    def saved_step(self, step: int) -> None:
        self._last_global_step_saved = step

    @property
    def newest(self) -> str:
        """The checkpoint published last ("" before the first)."""
        return self._last_checkpoint_saved

    @newest.setter
    def newest(self, path: str) -> None:
        self._last_checkpoint_saved = path

    # --- Lightning calls these ---
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self.write(trainer, Path(filepath))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        self.prune(trainer, Path(filepath))


def dump_checkpoint(trainer, weights_only: bool) -> dict:
    """What ``trainer.save_checkpoint`` would write, on every rank (it runs collectives)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)
