"""lhotse data loading shared by all recipes: global batches, sharded by data-parallel rank.

Every rank runs the same lhotse sampler with the same seed, so every rank sees the same
sequence of *global* batches (bounded by ``max_duration_s`` of audio in total). Each
data-parallel rank then keeps its own shard of each global batch, and all ranks of a
tensor-parallel group (same ``dp_rank``) get the same shard. Two properties follow by
construction, with no collective:

* all ranks take the same number of steps (no deadlock at the end of an epoch);
* the global batch of step N does not depend on the parallel layout, which is what makes
  losses comparable between 1 process, FSDP2, TP and TP x FSDP2.

Usage::

    sampler = DataParallelBatchSampler(DynamicBucketingSampler(cuts, max_duration=48, seed=0),
                                       dp_rank=1, dp_size=2)
    loader = DataLoader(SpeechTextDataset(tokenizer), sampler=sampler, batch_size=None)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)


@dataclass
class GlobalBatch:
    cuts: Any  # lhotse CutSet of the whole global batch
    dp_rank: int
    dp_size: int

    def local_cuts(self) -> list:
        return shard_cuts(self.cuts, self.dp_size)[self.dp_rank]


def shard_cuts(cuts, dp_size: int) -> list[list]:
    """Split a global batch into ``dp_size`` shards balanced in count and duration (deterministic)."""
    ordered = sorted(cuts, key=lambda c: (-c.duration, c.id))
    return [ordered[r::dp_size] for r in range(dp_size)]


class DataParallelBatchSampler(Sampler):
    """Wraps a lhotse sampler (run identically on every rank) and tags each global batch with ``dp_rank``.

    A global batch with fewer cuts than ``dp_size`` cannot give every rank a shard; it is skipped on
    every rank alike (so step counts stay equal) and counted in ``num_skipped_batches``.
    """

    def __init__(self, sampler, dp_rank: int, dp_size: int):
        super().__init__()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        self.sampler, self.dp_rank, self.dp_size = sampler, dp_rank, dp_size
        self.num_skipped_batches = 0

    def __iter__(self):
        for cuts in self.sampler:
            if len(cuts) < self.dp_size:
                self.num_skipped_batches += 1
                log.warning("skipping a global batch of %d cut(s) < data_parallel_size %d", len(cuts), self.dp_size)
                continue
            yield GlobalBatch(cuts, self.dp_rank, self.dp_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "num_skipped_batches": self.num_skipped_batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.num_skipped_batches = state["num_skipped_batches"]


class LogMel:
    """Log-mel filterbank features (lhotse's Kaldi-compatible Fbank), 10 ms frames.

    ``normalize=True`` (recognizers) standardizes each bin per utterance; ``False`` (TTS targets)
    keeps the raw log energies, which a vocoder can invert.
    """

    FRAME_SHIFT_S = 0.01

    def __init__(self, num_mel_bins: int = 64, sample_rate: int = 16000, normalize: bool = True):
        from lhotse import Fbank, FbankConfig

        self.sample_rate, self.normalize = sample_rate, normalize
        self.extractor = Fbank(FbankConfig(num_mel_bins=num_mel_bins, sampling_rate=sample_rate,
                                           frame_shift=self.FRAME_SHIFT_S))

    def num_frames(self, duration_s: float) -> int:
        from lhotse.utils import compute_num_frames

        return compute_num_frames(duration_s, self.FRAME_SHIFT_S, self.sample_rate)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        feats = self.extractor.extract(samples, self.sample_rate)
        if not self.normalize:
            return feats
        return (feats - feats.mean(0, keepdims=True)) / (feats.std(0, keepdims=True) + 1e-5)


def load_mono(cut, sample_rate: int) -> np.ndarray:
    """Audio of a cut at ``sample_rate`` (resampled if needed), multi-channel downmixed to mono."""
    if cut.sampling_rate != sample_rate:
        cut = cut.resample(sample_rate)
    audio = cut.load_audio()
    return audio.mean(axis=0) if audio.ndim == 2 else audio


class SpeechTextDataset(torch.utils.data.Dataset):
    """Turns a ``GlobalBatch`` into this rank's tensors: log-mel features + target token ids.

    Each batch also carries figures about the *global* batch (answer tokens, utterances, audio
    seconds), computed from the cut metadata every rank already has, so the loss can be normalised
    over the global batch and throughput counted without a collective.
    """

    def __init__(self, tokenizer, num_mel_bins: int = 64, sample_rate: int = 16000, spec_augment: dict | None = None,
                 normalize_features: bool = True, token_alignment: bool = False):
        self.tokenizer = tokenizer
        self.token_alignment = token_alignment
        self.features = LogMel(num_mel_bins, sample_rate, normalize=normalize_features)
        self.spec_augment = None
        if spec_augment:
            from lhotse.dataset import SpecAugment

            self.spec_augment = SpecAugment(**spec_augment)

    def targets(self, cut) -> list[int]:
        """Token ids of the transcript, plus ``<eos>`` for tokenizers that have one (not CTC's)."""
        ids = self.tokenizer.encode(cut.supervisions[0].text)
        return ids if self.tokenizer.eos_id is None else ids + [self.tokenizer.eos_id]

    def token_end_frames(self, cut, target_ids: list[int]) -> list[int] | None:
        """Frame where each target token's audio ends, from the supervision's word alignment.

        A word spans from its start to the next word's start (the first from frame 0, the last to
        the end); a word of several tokens is split evenly. None when the cut has no word
        alignment or its words do not tokenize to exactly ``target_ids``.
        """
        sup = cut.supervisions[0]
        words = (sup.alignment or {}).get("word")
        if not words:
            return None
        ids, ends = [], []
        for i, item in enumerate(words):
            pieces = self.tokenizer.encode(item.symbol)
            start = 0.0 if i == 0 else item.start
            end = words[i + 1].start if i + 1 < len(words) else cut.duration
            f0, f1 = self.features.num_frames(start), self.features.num_frames(end)
            ids += pieces
            ends += [round(f0 + (f1 - f0) * (k + 1) / len(pieces)) for k in range(len(pieces))]
        return ends if ids == list(target_ids) else None

    def __getitem__(self, batch: GlobalBatch) -> dict:
        all_targets = {c.id: self.targets(c) for c in batch.cuts}
        local = batch.local_cuts()
        feats = [torch.from_numpy(self.features(load_mono(c, self.features.sample_rate))) for c in local]
        targets = [torch.tensor(all_targets[c.id], dtype=torch.long) for c in local]
        num_frames = torch.tensor([f.shape[0] for f in feats])
        features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).float()
        if self.spec_augment is not None:
            # Time warp stays inside each utterance (segment = its unpadded frames).
            segments = torch.stack([torch.arange(len(feats)), torch.zeros_like(num_frames), num_frames], dim=1)
            features = self.spec_augment(features, supervision_segments=segments)
        return {
            "input_features": features,
            "feature_mask": torch.arange(features.shape[1])[None, :] < num_frames[:, None],
            "target_ids": torch.nn.utils.rnn.pad_sequence(
                targets, batch_first=True, padding_value=self.tokenizer.pad_id
            ),
            "target_lens": torch.tensor([len(t) for t in targets]),
            "texts": [c.supervisions[0].text for c in local],
            "ids": [c.id for c in local],
            "global_num_target_tokens": sum(len(t) for t in all_targets.values()),
            "global_num_frames": sum(self.features.num_frames(c.duration) for c in batch.cuts),
            **self._alignment(local, all_targets),
            "global_num_utterances": len(batch.cuts),
            "global_audio_s": float(sum(c.duration for c in batch.cuts)),
        }


    def _alignment(self, local, all_targets) -> dict:
        if not self.token_alignment:
            return {}
        ends = [self.token_end_frames(c, all_targets[c.id]) for c in local]
        if any(e is None for e in ends):
            return {}
        big = 10**9  # padding: "ends after everything", never inside a real span
        padded = torch.full((len(ends), max(len(e) for e in ends)), big, dtype=torch.long)
        for i, e in enumerate(ends):
            padded[i, : len(e)] = torch.tensor(e)
        return {"token_end_frames": padded}


def make_loader(
    cuts,
    tokenizer,
    *,
    dp_rank: int,
    dp_size: int,
    max_duration_s: float,
    shuffle: bool,
    seed: int,
    num_buckets: int = 6,
    num_workers: int = 0,
    num_mel_bins: int = 64,
    sample_rate: int = 16000,
    spec_augment: dict | None = None,
    normalize_features: bool = True,
    token_alignment: bool = False,
) -> DataLoader:
    """A DataLoader of this rank's shards of duration-bucketed global batches."""
    from lhotse.dataset import DynamicBucketingSampler

    base = DynamicBucketingSampler(
        cuts,
        max_duration=max_duration_s,
        num_buckets=num_buckets,
        shuffle=shuffle,
        drop_last=shuffle,  # training drops the ragged tail; validation keeps every cut
        seed=seed,
        world_size=1,  # deliberately: every rank draws the same global batches (see module docstring)
        rank=0,
    )
    return DataLoader(
        SpeechTextDataset(tokenizer, num_mel_bins, sample_rate, spec_augment=spec_augment,
                          normalize_features=normalize_features, token_alignment=token_alignment),
        sampler=DataParallelBatchSampler(base, dp_rank, dp_size),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
