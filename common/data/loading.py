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

import hashlib
import logging
import math
import signal
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler

from .checks import ON_BAD_ITEM, BadItem, BadItemError, load_checked, metadata_problem
from .features import FRAME_SHIFT_S, BatchFeatures, PaddedAudio, frames_of_duration, frames_of_samples

log = logging.getLogger(__name__)
VAL_NUM_BUCKETS = 4  # duration bins of validation batches (in order; training uses common.data.buckets)


@dataclass
class GlobalBatch:
    cuts: Any  # lhotse CutSet of the whole global batch
    dp_rank: int
    dp_size: int
    epoch: int = 0
    index: int = 0  # position in the epoch's sequence of global batches (for exact resume)

    def local_cuts(self) -> list:
        return shard_cuts(self.cuts, self.dp_size)[self.dp_rank]


def shard_cuts(cuts, dp_size: int) -> list[list]:
    """Split a global batch into ``dp_size`` shards balanced in count and duration (deterministic)."""
    ordered = sorted(cuts, key=lambda c: (-c.duration, c.id))
    return [ordered[r::dp_size] for r in range(dp_size)]


class DataParallelBatchSampler(Sampler):
    """Wraps a lhotse sampler (run identically on every rank) and tags each global batch with ``dp_rank``.

    A global batch with fewer cuts than ``dp_size`` (a bucket's ragged tail) leaves some ranks an
    empty shard; they take the step on silence with zero loss weight, so that global batches, and
    step counts, are the same for every layout and every item is trained on once per pass.

    Resumable: the state is (epoch, number of global batches already *trained on*), which the
    training loop reports through :meth:`mark_consumed`; :meth:`load_state_dict` makes the next
    iteration of that epoch replay the lhotse sampler (metadata only, no audio) past those
    batches, so a resumed run sees exactly the batches the uninterrupted run would have.
    The sampler's own position cannot be used: DataLoader workers prefetch batches ahead of training.
    """

    def __init__(self, sampler, dp_rank: int, dp_size: int, metadata_filter=None):
        super().__init__()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        self.sampler, self.dp_rank, self.dp_size = sampler, dp_rank, dp_size
        self.metadata_filter = metadata_filter  # counts the items that passed the checks (coverage)
        self.epoch = 0
        self.consumed = 0  # global batches of `epoch` trained on
        self._skip_on_next_iter = 0
        self.coverage: list[dict] = []  # per finished pass: items in batches / items that passed the checks

    def __iter__(self):
        skip, self._skip_on_next_iter = self._skip_on_next_iter, 0
        index = items = 0
        passed_before = self.metadata_filter.num_passed if self.metadata_filter is not None else None
        for cuts in self.sampler:
            items += len(cuts)
            if index >= skip:
                yield GlobalBatch(cuts, self.dp_rank, self.dp_size, epoch=self.epoch, index=index)
            index += 1
        if passed_before is not None:
            passed = self.metadata_filter.num_passed - passed_before  # the filter runs as each pass reads
            carried_in = len(getattr(self.sampler, "carried", ()))
            carried_out = len(getattr(self.sampler, "_carried_next", None) or ())
            used = items - carried_in + carried_out  # this pass's own items: trained now or first in the next
            self.coverage.append({"epoch": self.epoch, "items": items, "passed_checks": passed, "used": used,
                                  "carried_in": carried_in, "carried_out": carried_out})
            log.info("data pass %d: %d of the %d items that passed the checks are in its %d global batches or carried "
                     "to the start of the next pass (%.1f%%; %d carried in, %d carried out)", self.epoch, used, passed,
                     index, 100.0 * used / max(passed, 1), carried_in, carried_out)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def mark_consumed(self, epoch: int, index: int) -> None:
        self.epoch, self.consumed = epoch, index + 1

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "consumed": self.consumed}
        if hasattr(self.sampler, "carried"):  # CarryOverBucketSampler: the tails carried into this pass
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        if "sampler" in state and hasattr(self.sampler, "carried"):
            self.sampler.load_state_dict(state["sampler"])
        self.consumed = self._skip_on_next_iter = state["consumed"]


class TokenBudget:
    """Length of an utterance in LLM positions (for speech-LLM batches bounded by tokens):
    audio frames / ``audio_frames_per_token`` + transcript tokens + ``extra_tokens`` (prompt, eos).

    Usage::

        measure = TokenBudget(tokenizer, audio_frames_per_token=8, extra_tokens=2)
        DynamicBucketingSampler(cuts, constraint=measure.constraint(max_tokens=640), ...)
    """

    def __init__(self, tokenizer, audio_frames_per_token: int, extra_tokens: int = 2, frame_shift_s: float = 0.01):
        self.tokenizer, self.frames_per_token = tokenizer, audio_frames_per_token
        self.extra_tokens, self.frame_shift_s = extra_tokens, frame_shift_s

    def __call__(self, cut) -> int:
        audio = math.ceil(cut.duration / self.frame_shift_s / self.frames_per_token)
        return audio + len(self.tokenizer.encode(cut.supervisions[0].text or "")) + self.extra_tokens

    def constraint(self, max_tokens: int):
        from lhotse.dataset.sampling.base import TokenConstraint

        measure = self

        class LLMTokenConstraint(TokenConstraint):  # lhotse measures TextExamples; ours are cuts
            def measure_length(self, example) -> float:
                return measure(example)

        return LLMTokenConstraint(max_tokens=max_tokens)


def perturb_speed(batch: GlobalBatch, speed_factors: list[float], seed: int) -> GlobalBatch:
    """Speed perturbation (lhotse's, as ``sox speed``: tempo and pitch together): each cut of the
    global batch at a factor drawn from ``speed_factors`` by (``seed``, epoch, batch index, cut id).

    Every rank draws the same factors for the whole global batch from metadata alone, so the shards,
    the global token and frame counts and a resumed run all agree without a collective. The batch
    was planned on the original durations: a factor below 1 makes its audio up to 1/factor longer
    (0.9: 11%), which GPU batch sizes (data.bucket_profile) must leave room for.
    """
    cuts = []
    for cut in batch.cuts:
        digest = hashlib.sha256(f"{seed}/{batch.epoch}/{batch.index}/{cut.id}".encode()).digest()
        factor = speed_factors[int.from_bytes(digest[:8], "little") % len(speed_factors)]
        # affix_id=False: the item keeps its id (coverage, bad-item records and fingerprints name the source item)
        cuts.append(cut if factor == 1.0 else cut.perturb_speed(factor, affix_id=False))
    return replace(batch, cuts=cuts)


class SpeechTextDataset(torch.utils.data.Dataset):
    """Turns a ``GlobalBatch`` into this rank's tensors: padded waveforms + target token ids.

    DataLoader workers only decode, resample, downmix and pad audio (``audio``: a
    :class:`~common.data.features.PaddedAudio`, fp32 samples and lengths); log-mel, normalisation and SpecAugment run batched on the training device at
    the start of the step (:class:`common.data.features.BatchFeatures`, applied by the training
    module; ``augment_key`` seeds its masks). Each batch also carries figures about the *global*
    batch (answer tokens, utterances, audio seconds), computed from the cut metadata every rank
    already has, so the loss can be normalised over the global batch and throughput counted
    without a collective, and this shard's own counts as plain ints (no host sync in the step).
    """

    def __init__(self, tokenizer, sample_rate: int = 16000, token_alignment: bool = False, on_bad_item: str = "skip",
                 token_budget: TokenBudget | None = None, pad_to_edges_s: list[float] | None = None,
                 speed_factors: list[float] | None = None, seed: int = 0):
        if on_bad_item not in ON_BAD_ITEM:
            raise ValueError(f"data.on_bad_item must be one of {ON_BAD_ITEM}, got {on_bad_item!r}")
        self.speed_factors = [float(f) for f in speed_factors] if speed_factors else None
        self.seed = seed
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.on_bad_item = on_bad_item
        self.token_alignment = token_alignment
        self.token_budget = token_budget  # speech-LLMs: count the global batch's LLM positions (tokens/s)
        # Padded lengths (seconds) a batch's audio is rounded up to (torch.compile: few distinct shapes).
        self.pad_to_samples = sorted(math.ceil(e * sample_rate) for e in pad_to_edges_s) if pad_to_edges_s else None

    def num_frames(self, duration_s: float) -> int:
        return frames_of_duration(duration_s, self.sample_rate)

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
            f0, f1 = self.num_frames(start), self.num_frames(end)
            ids += pieces
            ends += [round(f0 + (f1 - f0) * (k + 1) / len(pieces)) for k in range(len(pieces))]
        return ends if ids == list(target_ids) else None

    def at_speed(self, batch: GlobalBatch) -> GlobalBatch:
        return perturb_speed(batch, self.speed_factors, self.seed)

    def __getitem__(self, batch: GlobalBatch) -> dict:
        if self.speed_factors:
            batch = self.at_speed(batch)
        all_targets = {c.id: self.targets(c) for c in batch.cuts}
        planned = batch.local_cuts()
        local, waves, bad_items = [], [], []
        for cut in planned:
            try:
                audio = load_checked(cut, self.sample_rate)
            except BadItem as bad:
                if self.on_bad_item == "error":
                    raise BadItemError(f"{bad} (data.on_bad_item=error; 'skip' skips and counts such items)") from bad
                bad_items.append(bad.to_dict())
                continue
            local.append(cut)
            waves.append(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)))
        substitute = not local
        if substitute:
            # This rank's whole shard is unreadable, or empty (a global batch with fewer cuts than
            # dp ranks). It still takes the step (every collective must run on every rank): silence
            # of the first item's length, with zero loss weight.
            local = planned[:1] or list(batch.cuts)[:1]  # batch.cuts: the same order on every rank
            waves = [torch.zeros(max(1, round(local[0].duration * self.sample_rate)))]
        targets = [torch.tensor(all_targets[c.id], dtype=torch.long) for c in local]
        audio_lens = torch.tensor([len(w) for w in waves])
        width = longest = int(audio_lens.max())
        if self.pad_to_samples:
            width = next((e for e in self.pad_to_samples if e >= longest), longest)
        audio = torch.zeros(len(waves), width)
        for i, wave in enumerate(waves):  # one copy per utterance into one buffer, in the worker
            audio[i, : len(wave)] = wave
        shift = round(self.sample_rate * FRAME_SHIFT_S)
        return {
            "audio": PaddedAudio(audio, audio_lens),
            "augment_key": (batch.epoch, batch.index, batch.dp_rank),  # seeds SpecAugment (exact resume)
            "target_ids": torch.nn.utils.rnn.pad_sequence(
                targets, batch_first=True, padding_value=self.tokenizer.pad_id
            ),
            "target_lens": torch.tensor([len(t) for t in targets]),
            "num_target_tokens": sum(len(t) for t in targets),  # this shard's, as ints: no host sync in the step
            "num_frames": int(frames_of_samples(audio_lens, shift).sum()),
            "texts": [c.supervisions[0].text for c in local],
            "ids": [] if substitute else [c.id for c in local],  # the items this rank trains on
            "global_num_target_tokens": sum(len(t) for t in all_targets.values()),
            "global_num_frames": sum(self.num_frames(c.duration) for c in batch.cuts),
            **self._alignment(local, all_targets),
            "global_num_utterances": len(batch.cuts),
            "global_audio_s": float(sum(c.duration for c in batch.cuts)),
            # Per utterance of the global batch (feature frames, target tokens): its model FLOPs (MFU).
            "global_lengths": [(self.num_frames(c.duration), len(all_targets[c.id])) for c in batch.cuts],
            **({"global_num_llm_tokens": sum(self.token_budget(c) for c in batch.cuts)} if self.token_budget else {}),
            "padding_efficiency": self.padding_efficiency(batch),
            "batch_fingerprint": hashlib.sha1(" ".join(sorted(c.id for c in batch.cuts)).encode()).hexdigest()[:12],
            "data_position": (batch.epoch, batch.index),
            "bad_items": bad_items,
            "num_planned": len(planned),  # this rank's items that passed the metadata checks
            "substitute": substitute,
            "empty_shard": not planned,
        }

    def padding_efficiency(self, batch: GlobalBatch) -> float:
        """Real feature frames / padded frames over the global batch's dp shards (from metadata)."""
        real = padded = 0
        for shard in shard_cuts(batch.cuts, batch.dp_size):
            frames = [self.num_frames(c.duration) for c in shard]
            real, padded = real + sum(frames), padded + len(frames) * max(frames, default=0)
        return real / padded if padded else 1.0

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


class MetadataFilter:
    """Drops bad items (see :mod:`common.data.checks`) from the cut stream before batching.

    Runs in the main process of every rank on the same stream, so every rank drops the same
    items. Each bad item is counted once (by id) in ``bad_items`` and logged with its path;
    in ``error`` mode the first one stops the run with :class:`BadItemError`.
    """

    def __init__(self, tokenizer, max_duration_s=None, measure=None, max_measure=None, on_bad_item="skip"):
        self.tokenizer, self.max_duration_s, self.on_bad_item = tokenizer, max_duration_s, on_bad_item
        self.measure, self.max_measure = measure, max_measure
        self.bad_items: dict[str, dict] = {}
        self.num_passed = self.num_rejected = 0  # items met (every pass), for coverage and the bad share

    def __call__(self, cut) -> bool:
        bad = metadata_problem(cut, self.tokenizer, self.max_duration_s, self.measure, self.max_measure)
        if bad is None:
            self.num_passed += 1
            return True
        self.num_rejected += 1
        if self.on_bad_item == "error":
            raise BadItemError(f"{bad} (data.on_bad_item=error; 'skip' skips and counts such items)")
        if bad.cut_id not in self.bad_items:
            self.bad_items[bad.cut_id] = {**bad.to_dict(), "times": 0}
            log.warning("skipping %s", bad)
        self.bad_items[bad.cut_id]["times"] += 1  # a mixed (repeated) source meets the same item again
        return False


def _worker_init(worker_id: int) -> None:
    # torchrun delivers SIGTERM (and a Ctrl-C's SIGINT) to a rank's whole process group, DataLoader
    # workers included. A worker dying of it would fail the rank mid-step; it keeps working
    # instead, and exits with its rank (which saves a checkpoint first, see common.checkpoint). Workers draw
    # no random numbers (SpecAugment runs in the step, seeded per batch), so their seeds need no setting.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class LoaderConfig:
    """What one split's loader is made of: the ``data`` settings as training (``shuffle``) or validation
    reads them (:meth:`of_split`). Units in the names; every field is documented at its setting in
    ``common/conf/base.yaml``."""

    max_duration_s: float                  # padded audio seconds per global batch
    shuffle: bool                          # training: 2-D buckets, shuffled, augmented; else validation order
    seed: int = 0                          # sampler order and every augmentation draw (exact resume)
    num_buckets: int = 6
    num_token_buckets: int = 1
    num_workers: int = 0
    num_mel_bins: int = 64
    sample_rate: int = 16000
    spec_augment: dict | None = None       # training, on the device (lhotse's settings)
    noise: dict | None = None              # training, on the device (NoiseConfig)
    speed_perturb: tuple | None = None     # training, in the workers (factors)
    normalize_features: bool = True
    token_alignment: bool = False
    on_bad_item: str = "skip"
    max_utterance_s: float | None = None   # longer items are skipped and counted (None: max_duration_s)
    max_tokens: int | None = None          # with a TokenBudget: LLM positions per global batch instead of seconds
    buffer_size: int = 20000
    check_tokens: bool = True              # also drop text that encodes to <unk> (training targets)
    pad_to_bucket_edges: bool = False      # torch.compile: few distinct audio lengths
    sampler: str = "buckets_2d"            # training: buckets_2d | lhotse_1d

    @classmethod
    def of_split(cls, data, train: bool, seed: int, pad_to_bucket_edges: bool = False) -> LoaderConfig:
        """From the ``data`` section of a run's config: training reads its augmentation and token
        bound, validation neither."""
        def plain(value):
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

        return cls(
            max_duration_s=data.max_duration_s if train else data.val_max_duration_s, shuffle=train, seed=seed,
            num_buckets=data.num_buckets, num_token_buckets=data.num_token_buckets, num_workers=data.num_workers,
            num_mel_bins=data.num_mel_bins, sample_rate=data.sample_rate,
            spec_augment=plain(data.get("spec_augment")) if train else None,
            noise=plain(data.get("noise")) if train else None,
            speed_perturb=tuple(data.speed_perturb) if train and data.get("speed_perturb") else None,
            normalize_features=data.feature_normalization == "utterance", token_alignment=bool(data.token_alignment),
            on_bad_item=data.on_bad_item, max_utterance_s=data.get("max_utterance_s"),
            max_tokens=data.get("max_tokens") if train else None, buffer_size=data.bucket_buffer_size,
            check_tokens=train, pad_to_bucket_edges=pad_to_bucket_edges, sampler=data.sampler)


def make_loader(cuts, tokenizer, config: LoaderConfig, *, dp_rank: int, dp_size: int,
                token_budget: TokenBudget | None = None, bucket_grid=None) -> DataLoader:
    """A DataLoader of this rank's shards of bucketed global batches, bad items filtered out.

    Training (``config.shuffle``) batches come from 2-D buckets (duration x target tokens, estimated from
    the first ``buffer_size`` items, or ``bucket_grid``: a profile's grid with global batch sizes) with a
    batch size per bucket: padded audio within ``max_duration_s``, or padded LLM positions within
    ``max_tokens`` (with ``token_budget``); ragged tails are carried into the next pass
    (:mod:`common.data.buckets`). Validation uses lhotse's duration buckets, in order.
    The filter (``loader.metadata_filter``) holds the items it dropped. Training augmentation is
    drawn per global batch from ``seed``, so a resumed run repeats it exactly. Batches hold padded
    waveforms; ``loader.features`` (a :class:`BatchFeatures`) turns one into log-mel features
    (+ noise, SpecAugment) on the device it is on::

        loader = make_loader(cuts, tokenizer,
                             LoaderConfig(max_duration_s=30, shuffle=True),
                             dp_rank=0, dp_size=2)
        batch = loader.features(batch.to(device), training=True)
    """
    from lhotse import CutSet
    from lhotse.lazy import LazyFilter

    c = config
    by_tokens = token_budget is not None and c.max_tokens is not None
    keep = MetadataFilter(tokenizer if c.check_tokens else None, c.max_utterance_s or c.max_duration_s,
                          token_budget if by_tokens else None, c.max_tokens if by_tokens else None, c.on_bad_item)
    # Lazily, for eager manifests too: the checks run as each pass reads the items, so the
    # filter's counts are per pass (coverage, the bad-item share); the order is unchanged.
    checked = CutSet(LazyFilter(cuts, predicate=keep))
    base = _global_sampler(cuts, checked, tokenizer, c, token_budget if by_tokens else None, bucket_grid)
    edges = None
    if c.pad_to_bucket_edges:
        # torch.compile: every batch's audio is padded to its bucket's upper edge, so the encoder sees
        # at most num_buckets + 1 lengths (a bounded number of compiled graphs, see common.parallel).
        longest = float(c.max_utterance_s or c.max_duration_s)
        bins = [b for b in base.duration_bins if b < longest]
        edges = bins + [longest] if bins else length_ladder(longest)
    loader = DataLoader(
        SpeechTextDataset(tokenizer, c.sample_rate, token_alignment=c.token_alignment, on_bad_item=c.on_bad_item,
                          token_budget=token_budget, pad_to_edges_s=edges,
                          speed_factors=list(c.speed_perturb) if c.speed_perturb else None, seed=c.seed),
        sampler=DataParallelBatchSampler(base, dp_rank, dp_size, metadata_filter=keep if c.shuffle else None),
        batch_size=None,
        num_workers=c.num_workers,
        worker_init_fn=_worker_init if c.num_workers > 0 else None,
        # Worker base seeds come from this generator, not the process's RNG, so that starting a
        # DataLoader iterator (at the start of a run or of an epoch) never moves the training RNG.
        generator=torch.Generator().manual_seed(c.seed),
        persistent_workers=c.num_workers > 0,
        pin_memory=c.num_workers > 0 and torch.cuda.is_available(),  # asynchronous host-to-device copies
    )
    loader.metadata_filter = keep
    loader.pad_edges_s = edges
    loader.features = BatchFeatures(c.num_mel_bins, c.sample_rate, normalize=c.normalize_features,
                                    spec_augment=c.spec_augment, noise=c.noise, seed=c.seed)
    return loader


def _global_sampler(raw, checked, tokenizer, c: LoaderConfig, token_budget: TokenBudget | None, grid):
    """The sampler of global batches (every rank draws the same ones, module docstring)."""
    from lhotse.dataset import DynamicBucketingSampler

    if c.shuffle and c.sampler == "lhotse_1d":  # lhotse's duration buckets (the SALM recipes, see salm.yaml)
        return DynamicBucketingSampler(
            checked,
            **({"constraint": token_budget.constraint(c.max_tokens)} if token_budget else
               {"max_duration": c.max_duration_s}),
            num_buckets=c.num_buckets, shuffle=True, drop_last=False, seed=c.seed, buffer_size=c.buffer_size,
            world_size=1, rank=0)
    if c.shuffle:
        return _bucket_sampler(raw, checked, tokenizer, max_duration_s=c.max_duration_s, num_buckets=c.num_buckets,
                               num_token_buckets=c.num_token_buckets, seed=c.seed, buffer_size=c.buffer_size,
                               longest_s=float(c.max_utterance_s or c.max_duration_s), token_budget=token_budget,
                               max_tokens=c.max_tokens, grid=grid)
    return DynamicBucketingSampler(
        # few bins: validation sets are small (lhotse needs a cut per bin) and mostly one global batch
        checked, max_duration=c.max_duration_s, num_buckets=min(c.num_buckets, VAL_NUM_BUCKETS), shuffle=False,
        drop_last=False,  # every item is validated
        world_size=1, rank=0)


def _bucket_sampler(raw, checked, tokenizer, *, max_duration_s, num_buckets, num_token_buckets, seed, buffer_size,
                    longest_s, token_budget, max_tokens, grid):
    """The training sampler: 2-D buckets estimated from the first ``buffer_size`` items (metadata only)."""
    from functools import lru_cache

    from .buckets import BucketGrid, BudgetBatchSize, CarryOverBucketSampler

    @lru_cache(maxsize=1 << 16)
    def tokens_of(text: str) -> int:
        return len(tokenizer.encode(text))

    def target_length(cut) -> int:
        return tokens_of(cut.supervisions[0].text or "")

    if grid is None:
        lengths = []
        for cut in raw:
            if cut.duration <= longest_s and cut.supervisions:
                lengths.append((cut.duration, target_length(cut)))
            if len(lengths) >= buffer_size:
                break
        if token_budget is not None:
            fpt, extra = token_budget.frames_per_token, token_budget.extra_tokens
            size = BudgetBatchSize(max_tokens=max_tokens,
                                   positions=lambda d, t: math.ceil(d / token_budget.frame_shift_s / fpt) + t + extra)
        else:
            size = BudgetBatchSize(max_duration_s=max_duration_s)
        grid = BucketGrid.estimate(lengths, num_buckets, num_token_buckets, batch_size=size, max_duration_s=longest_s)
    log.info("training batches from %r: %s utterances per global batch", grid,
             sorted({b for row in grid.batch_sizes for b in row}))
    return CarryOverBucketSampler(checked, grid, target_length=target_length, seed=seed, buffer_size=buffer_size)


def check_batch_budget(cuts, *, max_duration_s: float, max_utterance_s: float | None = None, token_budget=None,
                       max_tokens: int | None = None, sample_size: int = 20000) -> None:
    """ConfigError if none of the first ``sample_size`` training utterances fits the batch budget
    (its duration bound, or for speech-LLMs its LLM positions), naming the setting, its value and the
    shortest utterance: a run must not validate, then stop with nothing to train on. Metadata only."""
    from common.errors import ConfigError

    longest_s = float(max_utterance_s or max_duration_s)
    setting = "data.max_utterance_s" if max_utterance_s else "data.max_duration_s"
    shortest_s, fewest, seen = math.inf, math.inf, 0
    for cut in cuts:
        seen += 1
        if not cut.supervisions:
            continue
        fits_s = cut.duration <= longest_s
        positions = token_budget(cut) if token_budget is not None and max_tokens is not None else None
        if fits_s and (positions is None or positions <= max_tokens):
            return
        shortest_s = min(shortest_s, cut.duration)
        if positions is not None:
            fewest = min(fewest, positions)
        if seen >= sample_size:
            break
    if not seen:
        return  # no items at all: the data checks say so
    if shortest_s > longest_s:
        raise ConfigError(f"{setting} is {longest_s:g} s (the longest utterance a batch may hold), but the shortest of "
                          f"the first {seen} training utterances lasts {shortest_s:.2f} s: no utterance fits; raise "
                          f"{setting}" + (" (on GPU presets: data.max_duration_s_per_gpu)" if not max_utterance_s else ""))
    raise ConfigError(f"data.max_tokens is {max_tokens} LLM positions per global batch, but the shortest of the first "
                      f"{seen} training utterances needs {fewest:.0f} (audio frames per LLM position + text tokens): no "
                      "utterance fits; raise data.max_tokens (on GPU presets: data.max_tokens_per_gpu)")


def length_ladder(longest_s: float, shortest_s: float = 1.0, steps_per_octave: int = 2) -> list[float]:
    """Padded lengths when no bucket edges are known (token-bounded batches): ``shortest_s`` x
    2^(k / steps_per_octave) up to ``longest_s``::

        >>> length_ladder(4.0)
        [1.0, 1.414, 2.0, 2.828, 4.0]
    """
    out, k = [], 0
    while (edge := round(shortest_s * 2 ** (k / steps_per_octave), 3)) < longest_s:
        out.append(edge)
        k += 1
    return out + [float(longest_s)]


def featurized(loader, training: bool = False):
    """The batches of a :func:`make_loader` loader with their features, as a training step sees them
    (tests, benchmarks, tools)::

        batch = next(featurized(make_loader(cuts, tok,
                                            LoaderConfig(max_duration_s=30, shuffle=False),
                                            dp_rank=0, dp_size=1)))
    """
    for batch in loader:
        yield loader.features(batch, training=training)
