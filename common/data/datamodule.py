"""LightningDataModule over the configured sources; data sharded by data-parallel rank (never by TP rank).

Usage::

    dm = SpeechDataModule(cfg.data, tokenizer, sources={"train": [...], "val": [...]}, seed=0)
    trainer.fit(module, dm)   # with use_distributed_sampler=False: sharding is done here

Besides the batches it keeps what a run must report and resume:

* ``bad_items``: every item skipped on this rank (metadata problems found identically on all
  ranks, audio problems found by this rank), by cut id, each logged with its path, and
  ``substituted_batches``: steps whose whole local shard was unreadable (trained on silence
  with zero loss weight);
* ``state_dict()``: the training sampler's position (epoch, global batches trained on), saved in
  every checkpoint by Lightning, so that a resumed run continues the same data order.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from common.parallel import data_parallel_rank_size

from .loading import LoaderConfig, TokenBudget, check_batch_budget, make_loader
from .sources import open_sources

log = logging.getLogger(__name__)


class SpeechDataModule(L.LightningDataModule):
    def __init__(self, cfg, tokenizer, sources: dict, seed: int, audio_frames_per_token: int | None = None,
                 pad_to_bucket_edges: bool = False):
        super().__init__()
        self.pad_to_bucket_edges = pad_to_bucket_edges  # torch.compile: a bounded set of audio lengths
        self.cfg, self.tokenizer, self.sources, self.seed = cfg, tokenizer, sources, seed
        self.audio_frames_per_token = audio_frames_per_token
        self.bad_items: dict[str, dict] = {}
        # [unreadable, planned] items of this rank (training: whole run; val: the latest validation),
        # and each split's metadata filter: what common.data.guard.DataGuard judges the run by.
        self.counts = {"train": [0, 0], "val": [0, 0]}
        self.filters: dict = {}
        self.features: dict = {}  # split -> BatchFeatures: log-mel (+ SpecAugment) on the device, in the step
        self.substituted_batches = 0  # steps this rank trained on silence (its whole shard unreadable)
        self._train_sampler = None
        self._resume_state: dict | None = None
        self.batch_ready_at: float | None = None  # perf_counter() when the loader handed over the last batch

    def _loader(self, split: str, train: bool):
        dp_rank, dp_size = data_parallel_rank_size(self.trainer)
        cfg = self.cfg
        max_tokens = cfg.get("max_tokens") if train else None
        budget = None
        if max_tokens or self.audio_frames_per_token:  # also counts a speech-LLM's tokens/s
            budget = TokenBudget(self.tokenizer, audio_frames_per_token=self.audio_frames_per_token or 1)
        config = LoaderConfig.of_split(cfg, train, self.seed, pad_to_bucket_edges=self.pad_to_bucket_edges)
        loader = make_loader(open_sources(self.sources[split], seed=self.seed, mix=train), self.tokenizer, config,
                             dp_rank=dp_rank, dp_size=dp_size, token_budget=budget,
                             bucket_grid=self._profiled_grid() if train else None)
        self.filters[split] = loader.metadata_filter
        self.features[split] = loader.features
        self.bad_items.update(loader.metadata_filter.bad_items)
        loader.metadata_filter.bad_items = self.bad_items  # later finds (lazy sources) land here too
        if train:
            self._train_sampler = loader.sampler
            if self._resume_state is not None:
                loader.sampler.load_state_dict(self._resume_state)
                log.info("resuming the data order at epoch %d after %d global batches",
                         self._resume_state["epoch"], self._resume_state["consumed"])
                self._resume_state = None
        return loader

    def _profiled_grid(self):
        """``data.bucket_profile``: the measured per-GPU batch sizes x the world size, or None."""
        if not self.cfg.get("bucket_profile"):
            return None
        from .buckets import load_bucket_profile

        grid, _ = load_bucket_profile(self.cfg.bucket_profile)
        world = self.trainer.world_size if self.trainer is not None else 1
        return grid.with_batch_sizes_scaled(world)

    def setup(self, stage: str) -> None:
        # Before the sanity validation (Lightning calls setup first): a budget nothing fits is named now.
        if stage == "fit" and self.sources.get("train"):
            cfg = self.cfg
            max_tokens = cfg.get("max_tokens")
            budget = TokenBudget(self.tokenizer, audio_frames_per_token=self.audio_frames_per_token or 1) \
                if max_tokens else None
            check_batch_budget(open_sources(self.sources["train"], seed=self.seed, mix=True),
                               max_duration_s=cfg.max_duration_s, max_utterance_s=cfg.get("max_utterance_s"),
                               token_budget=budget, max_tokens=max_tokens, sample_size=cfg.bucket_buffer_size)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # The loader has handed the batch over: from here on the step's time is compute (transfer,
        # features on the device, forward, backward), not data wait (common.recording).
        self.batch_ready_at = time.perf_counter()
        training = self.trainer is not None and self.trainer.training
        counts = self.counts["train" if training else "val"]
        counts[0] += len(batch.get("bad_items", ()))
        counts[1] += batch.pop("num_planned", 0)
        for item in batch.pop("bad_items", ()):
            if item["cut_id"] not in self.bad_items:
                self.bad_items[item["cut_id"]] = {**item, "times": 0}
                log.warning("skipped bad data item %s (%s): %s", item["cut_id"], item["path"], item["detail"])
            self.bad_items[item["cut_id"]]["times"] += 1
        if batch.pop("empty_shard", False):
            pass  # a global batch smaller than the dp size: expected at a bucket's tail, not a data problem
        elif batch.get("substitute"):
            self.substituted_batches += 1
            log.warning("every item of this rank's shard was unreadable: this step trains on silence with "
                        "zero loss weight (so all ranks take the same steps)")
        position = batch.pop("data_position", None)
        if position is not None and training and self._train_sampler:
            self._train_sampler.mark_consumed(*position)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Features of the whole batch at once, on the training device (workers only padded waveforms).
        training = self.trainer is not None and self.trainer.training
        batch = self.features["train" if training else "val"](batch, training=training)
        # Lightning cast the batch for the precision before the transfer (bf16-true: bf16); the
        # features are made here, after it, and get the same cast.
        return self.trainer.precision_plugin.convert_input(batch) if self.trainer is not None else batch

    @property
    def coverage(self) -> list[dict]:
        """Per finished pass over the training data: items in its batches, items that passed the checks."""
        return list(self._train_sampler.coverage) if self._train_sampler else []

    def state_dict(self) -> dict:
        return {"train_sampler": self._train_sampler.state_dict()} if self._train_sampler else {}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores checkpoints before it builds the dataloaders: applied in _loader().
        self._resume_state = state.get("train_sampler")
