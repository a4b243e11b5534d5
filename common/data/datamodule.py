"""LightningDataModule over lhotse manifests; data sharded by data-parallel rank (never by TP rank).

Usage::

    dm = SpeechDataModule(cfg.data, tokenizer, manifests={"train": ..., "val": ...}, seed=0)
    trainer.fit(module, dm)   # with use_distributed_sampler=False: sharding is done here
"""

from __future__ import annotations

import lightning as L

from common.parallel import data_parallel_rank_size

from .loading import make_loader


class SpeechDataModule(L.LightningDataModule):
    def __init__(self, cfg, tokenizer, manifests: dict, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.manifests, self.seed = cfg, tokenizer, manifests, seed

    def _loader(self, split: str, train: bool):
        from lhotse import CutSet

        dp_rank, dp_size = data_parallel_rank_size(self.trainer)
        cuts = CutSet.from_file(self.manifests[split])
        return make_loader(
            cuts,
            self.tokenizer,
            dp_rank=dp_rank,
            dp_size=dp_size,
            max_duration_s=self.cfg.max_duration_s if train else self.cfg.val_max_duration_s,
            shuffle=train,
            seed=self.seed,
            num_buckets=self.cfg.num_buckets,
            num_workers=self.cfg.num_workers,
            num_mel_bins=self.cfg.num_mel_bins,
            sample_rate=self.cfg.sample_rate,
            # Training only; plain dict (lhotse's SpecAugment kwargs) so DataLoader workers can pickle it.
            spec_augment=_to_dict(self.cfg.get("spec_augment")) if train else None,
            normalize_features=self.cfg.get("feature_normalization", "utterance") == "utterance",
            token_alignment=bool(self.cfg.get("token_alignment", False)),
        )

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)


def _to_dict(cfg) -> dict | None:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
