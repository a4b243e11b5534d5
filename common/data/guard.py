"""No success for nothing: a run stops, ``failed``, when too much of its data cannot be used.

Bad items are skipped and counted (:mod:`common.data.checks`), so a few broken files never stop
a long run. But a run whose training items are mostly unreadable learns from what is left, or
from nothing (every step on silence, loss 0), and a validation set with no readable item
scores nothing; neither may end ``completed``. :class:`DataGuard` checks, on every rank alike:

* every ``check_every_n_steps`` steps (once ``min_items`` items were met) and at the last
  step: the share of training items skipped, metadata problems (found alike by every rank)
  and unreadable audio (found by the rank that reads the item; summed over ranks with one
  small all-reduce), against ``data.max_bad_item_fraction`` (default 0.5);
* after each validation (the step-0 one included): at least one readable validation item.

Either failure raises :class:`DataQualityError` on every rank at the same step, naming the
share and the first skipped items; ``summary.json`` says ``failed`` with that message.

Usage (``common/train.py``)::

    callbacks = [..., DataGuard(datamodule, max_bad_item_fraction=cfg.data.max_bad_item_fraction)]
"""

from __future__ import annotations

import lightning as L
import torch

from .checks import KINDS, BadItemError


class DataQualityError(BadItemError):
    """Too much of the data was unusable for the run's results to mean anything."""


class DataGuard(L.Callback):
    def __init__(self, datamodule, max_bad_item_fraction: float = 0.5, check_every_n_steps: int = 10,
                 min_items: int = 100):
        self.dm, self.max_fraction = datamodule, max_bad_item_fraction
        self.every, self.min_items = check_every_n_steps, min_items
        self.last_share: float | None = None
        self._val_rejected_before = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = trainer.global_step >= trainer.max_steps > 0
        if last or trainer.global_step % self.every == 0:
            self.check_training(trainer, final=last)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.dm.counts["val"] = [0, 0]
        meta = self.dm.filters.get("val")
        self._val_rejected_before = meta.num_rejected if meta is not None else 0

    def on_validation_end(self, trainer, pl_module) -> None:
        unreadable, planned = _sum_over_ranks(self.dm.counts["val"], trainer)
        meta = self.dm.filters.get("val")
        rejected = meta.num_rejected - self._val_rejected_before if meta is not None else 0  # this validation's
        if planned - unreadable <= 0:
            total = planned + rejected
            raise DataQualityError(
                f"the validation set has no readable item: {unreadable + rejected} of {total} skipped "
                f"({self._examples()}); fix or replace data.val (python -m common.data check <manifest> lists them)")

    def check_training(self, trainer, final: bool) -> None:
        unreadable, planned = _sum_over_ranks(self.dm.counts["train"], trainer)
        meta = self.dm.filters.get("train")
        passed, rejected = (meta.num_passed, meta.num_rejected) if meta is not None else (0, 0)
        met = passed + rejected
        if not final and met < self.min_items:
            return
        metadata_share = rejected / met if met else 0.0
        audio_share = unreadable / planned if planned else 0.0
        share = 1 - (1 - metadata_share) * (1 - audio_share)
        self.last_share = share
        if share > self.max_fraction:
            raise DataQualityError(
                f"{share:.0%} of the training items met so far could not be used ({rejected} of {met} failed the "
                f"metadata checks, {audio_share:.0%} of the rest had unreadable audio), more than "
                f"data.max_bad_item_fraction={self.max_fraction:g}: {self._examples()}; see skipped_items.jsonl, or "
                "python -m common.data check <manifest>")

    def _examples(self, n: int = 3) -> str:
        items = list(self.dm.bad_items.values())[:n]
        if not items:
            return "no item recorded on this rank"
        return "e.g. " + "; ".join(f"{i['cut_id']} ({i['path']}): {KINDS.get(i['kind'], i['kind'])}" for i in items)


def _sum_over_ranks(counts: list[int], trainer) -> tuple[int, int]:
    """(unreadable, planned) summed over every rank. Ranks of a tensor-parallel group read the
    same items, which scales both sums alike: their ratio, and whether one is zero, hold."""
    t = torch.tensor([float(c) for c in counts], device=trainer.strategy.root_device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return int(t[0].item()), int(t[1].item())
