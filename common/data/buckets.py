"""2-D bucketing: global batches of similar audio length *and* output length, sized per bucket,
with every utterance trained once per pass (ragged tails are carried into the next pass).

Bins are estimated from the data (as lhotse and NeMo's 2-D bucketing do): duration quantiles,
then, inside each duration bin, quantiles of the target length (tokens). Each bucket has its
own global batch size: what fits the run's budget at the bucket's upper edges (``max_duration_s``
of padded audio, or ``max_tokens`` padded LLM positions), or what a measured bucket profile says
(``data.bucket_profile``, written by ``make profile-batches``).

A bucket emits a global batch when it holds its batch size. What is left in the buckets at the
end of a pass is *carried* into the next pass (it starts there, first in its buckets), instead of
being dropped or trained as small batches; so a pass trains about as many items as the data holds
(the tails it carries out replace those it carried in). A bucket too sparse to fill within
``max_wait_passes`` passes is trained as a smaller batch then. Everything depends only on
(seed, epoch, the carried items), never on the rank or the layout: every rank draws the same
global batches. The state (epoch + the items carried into it) resumes a pass exactly.

Usage::

    grid = BucketGrid.estimate(lengths, num_duration_buckets=24, num_token_buckets=2,
                               batch_size=BudgetBatchSize(max_duration_s=600))
    sampler = CarryOverBucketSampler(cuts, grid, target_length=lambda c: len(tok.encode(c.supervisions[0].text)),
                                     seed=0)
    for cuts in sampler: ...            # lhotse CutSets, one per global batch
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FRAME_S = 0.01
PROFILE_FORMAT = "speech-recipes-bucket-profile/1"  # what common.tools.profile_batches writes


@dataclass(frozen=True)
class BudgetBatchSize:
    """Utterances per global batch of a bucket, padded to its longest item: within ``max_duration_s``
    of audio, or (speech-LLMs) ``max_tokens`` LLM positions with ``positions(duration_s, tokens)``.
    The longest is the longest of the bucket in the sample the bins come from (as lhotse closes a
    batch by its longest item so far), so a later, longer item can overshoot by little;
    ``make profile-batches`` sizes buckets by measured memory at their upper edges instead."""

    max_duration_s: float | None = None
    max_tokens: int | None = None
    positions: Callable[[float, int], int] | None = None

    def __call__(self, max_duration_s: float, max_tokens: int) -> int:
        if self.max_tokens is not None and self.positions is not None:
            return max(1, self.max_tokens // max(1, self.positions(max_duration_s, max_tokens)))
        return max(1, math.floor(self.max_duration_s / max_duration_s + 1e-9))


def _quantile_edges(values: list[float], num_bins: int) -> list[float]:
    """Upper edges of ``num_bins`` bins holding about equally many of ``values`` (duplicates merged)."""
    ordered = sorted(values)
    edges = []
    for k in range(1, num_bins + 1):
        edge = ordered[min(len(ordered) - 1, math.ceil(k * len(ordered) / num_bins) - 1)]
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return edges


class BucketGrid:
    """Duration bins x target-length bins and a global batch size per bucket.

    ``duration_edges[i]``: upper edge (s) of duration bin i (the last is the longest allowed
    utterance); ``token_edges[i][j]``: upper edge of target-length bin j inside it (the last is
    the longest seen; longer targets go to it); ``batch_sizes[i][j]``: utterances per global batch.
    """

    def __init__(self, duration_edges: list[float], token_edges: list[list[int]], batch_sizes: list[list[int]]):
        if not duration_edges or len(token_edges) != len(duration_edges) or len(batch_sizes) != len(duration_edges):
            raise ValueError("bucket grid: one token-edge list and one batch-size list per duration bin")
        for i, (tokens, sizes) in enumerate(zip(token_edges, batch_sizes)):
            if not tokens or len(tokens) != len(sizes) or any(s < 1 for s in sizes):
                raise ValueError(f"bucket grid: duration bin {i} needs token edges and batch sizes >= 1, "
                                 f"got {tokens} / {sizes}")
        self.duration_edges = [float(e) for e in duration_edges]
        self.token_edges = [[int(t) for t in row] for row in token_edges]
        self.batch_sizes = [[int(b) for b in row] for row in batch_sizes]

    @classmethod
    def estimate(cls, lengths: Iterable[tuple[float, int]], num_duration_buckets: int, num_token_buckets: int,
                 batch_size: Callable[[float, int], int], max_duration_s: float | None = None,
                 min_batches_per_bucket: int = 2) -> BucketGrid:
        """Bins from a sample of ``(duration_s, target_tokens)``: duration quantiles, then target-length
        quantiles inside each. Where the sample is too small for a bucket to fill ``min_batches_per_bucket``
        batches per pass (short utterances make big batches), it is merged with its neighbour, and a
        duration bin gets fewer token bins (0: as many bins as asked, for bucket profiles)."""
        lengths = list(lengths)
        if not lengths:
            raise ValueError("bucket grid: no utterances to estimate bins from")
        top = max(float(max_duration_s or 0.0), max(d for d, _ in lengths))

        def fill(cell) -> float:  # batches this bucket fills per pass (the sample standing for a pass)
            return len(cell) / batch_size(max(d for d, _ in cell), max(t for _, t in cell))

        def cells(edges, key, items):
            out, lo = [], -math.inf
            for edge in edges:
                out.append([x for x in items if lo < key(x) <= edge])
                lo = edge
            return out

        edges = _quantile_edges([d for d, _ in lengths], max(1, num_duration_buckets))
        edges[-1] = top  # anything up to the longest allowed utterance fits the last bin
        while min_batches_per_bucket and len(edges) > 1:
            fills = [fill(c) if c else 0.0 for c in cells(edges, lambda x: x[0], lengths)]
            i = min(range(len(edges)), key=fills.__getitem__)
            if fills[i] >= min_batches_per_bucket:
                break
            # merge bin i into its emptier neighbour (drop the edge between them)
            j = i - 1 if i == len(edges) - 1 or (i > 0 and fills[i - 1] < fills[i + 1]) else i
            del edges[j]
        token_edges, sizes = [], []
        for inside in cells(edges, lambda x: x[0], lengths):
            inside = inside or [(edges[len(token_edges)], max(t for _, t in lengths))]
            for n_tok in range(max(1, num_token_buckets), 0, -1):
                row = _quantile_edges([t for _, t in inside], n_tok)
                parts = [c or inside for c in cells(row, lambda x: x[1], inside)]
                if not min_batches_per_bucket or n_tok == 1 or min(map(fill, parts)) >= min_batches_per_bucket:
                    break
            token_edges.append(row)
            sizes.append([batch_size(max(d for d, _ in c), max(t for _, t in c)) for c in parts])
        return cls(edges, token_edges, sizes)

    def index(self, duration_s: float, tokens: int) -> tuple[int, int]:
        i = min(bisect.bisect_left(self.duration_edges, duration_s - 1e-9), len(self.duration_edges) - 1)
        row = self.token_edges[i]
        return i, min(bisect.bisect_left(row, tokens), len(row) - 1)

    def batch_size(self, key: tuple[int, int]) -> int:
        return self.batch_sizes[key[0]][key[1]]

    def keys(self) -> list[tuple[int, int]]:
        return [(i, j) for i, row in enumerate(self.token_edges) for j in range(len(row))]

    def with_batch_sizes(self, batch_size: Callable[[float, int], int]) -> BucketGrid:
        return BucketGrid(self.duration_edges, self.token_edges,
                          [[batch_size(d, t) for t in row] for d, row in zip(self.duration_edges, self.token_edges)])

    def with_batch_sizes_scaled(self, factor: int) -> BucketGrid:
        """Per-GPU batch sizes (a bucket profile) -> global ones for ``factor`` GPUs."""
        return BucketGrid(self.duration_edges, self.token_edges, [[b * factor for b in row] for row in self.batch_sizes])

    def state_dict(self) -> dict:
        return {"duration_edges": self.duration_edges, "token_edges": self.token_edges,
                "batch_sizes": self.batch_sizes}

    @classmethod
    def from_state_dict(cls, state: dict) -> BucketGrid:
        return cls(state["duration_edges"], state["token_edges"], state["batch_sizes"])

    def __repr__(self) -> str:
        n = sum(len(r) for r in self.token_edges)
        return f"BucketGrid({len(self.duration_edges)} duration x up to {max(map(len, self.token_edges))} token bins = {n})"



def allow_older_sampler_states() -> None:
    """Let ``weights_only`` loading read checkpoints written before :meth:`CarryOverBucketSampler.state_dict`
    went through JSON: their carried cuts hold lhotse ``AlignmentItem`` tuples (a symbol and two
    floats, no code). Without this, such a run could not resume and its checkpoints read as damaged."""
    import torch
    from lhotse.supervision import AlignmentItem

    torch.serialization.add_safe_globals([AlignmentItem])


class CarryOverBucketSampler:
    """Global batches (lhotse ``CutSet``s) from a :class:`BucketGrid`; tails carried to the next pass.

    ``target_length(cut)``: the cut's output length in tokens. The stream is shuffled with a buffer
    of ``buffer_size`` cuts (seeded by ``seed`` and the epoch). ``carried`` holds the cuts carried
    into the current pass; ``state_dict()`` saves them (as cut manifests), so a resumed pass starts
    from exactly the same buckets.
    """

    def __init__(self, cuts, grid: BucketGrid, target_length: Callable, seed: int = 0, buffer_size: int = 20000,
                 max_wait_passes: int = 1):
        self.cuts, self.grid, self.target_length = cuts, grid, target_length
        self.seed, self.buffer_size, self.max_wait_passes = seed, buffer_size, max_wait_passes
        self.epoch = 0
        self.carried: list = []  # cuts carried into `epoch`
        self.first_pass: dict[str, int] = {}  # carried cut id -> the pass that first left it over
        self._first_next: dict[str, int] = {}
        self._carried_next: list | None = None
        self.duration_bins = grid.duration_edges[:-1]  # lhotse's name: bucket edges for padding (torch.compile)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch + 1 and self._carried_next is not None:
            self.carried, self.first_pass = self._carried_next, self._first_next
        elif epoch != self.epoch:
            self.carried, self.first_pass = [], {}  # jumping passes (a resume loads the state instead)
        self._carried_next, self.epoch = None, epoch

    def _shuffled(self, rng: random.Random):
        buffer = []
        for cut in self.cuts:
            buffer.append(cut)
            if len(buffer) >= self.buffer_size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        from lhotse import CutSet

        rng = random.Random(f"{self.seed}:{self.epoch}")
        buckets: dict[tuple[int, int], list] = {key: [] for key in self.grid.keys()}
        for cut in self.carried:  # first in their buckets: the next batch of that bucket takes them
            buckets[self._key(cut)].append(cut)
        for key in self.grid.keys():  # a carried bucket may already be full
            yield from self._full(buckets, key, CutSet)
        for cut in self._shuffled(rng):
            key = self._key(cut)
            buckets[key].append(cut)
            yield from self._full(buckets, key, CutSet)
        carry = []
        for key in self.grid.keys():
            left = buckets[key]
            waited = [c for c in left if self.first_pass.get(c.id, self.epoch) < self.epoch - self.max_wait_passes + 1]
            if waited:  # a bucket too sparse to fill: its items went unused for max_wait_passes passes
                yield CutSet.from_cuts(left)
            else:
                carry += left
        # (the DataLoader may finish this iteration before the pass is trained: the next pass's
        # carry is kept aside until set_epoch moves to it)
        self._first_next = {c.id: self.first_pass.get(c.id, self.epoch) for c in carry}
        self._carried_next = carry

    def _full(self, buckets, key, cutset):
        size = self.grid.batch_size(key)
        while len(buckets[key]) >= size:
            batch, buckets[key] = buckets[key][:size], buckets[key][size:]
            yield cutset.from_cuts(batch)

    def _key(self, cut) -> tuple[int, int]:
        return self.grid.index(cut.duration, self.target_length(cut))

    def state_dict(self) -> dict:
        # Plain types only (see _plain): ``to_dict`` keeps objects such as word alignments'
        # AlignmentItem tuples, which a weights_only checkpoint load refuses, and Shar cuts hold
        # their audio in memory (bytes), which JSON cannot carry.
        return {"epoch": self.epoch, "carried": [_plain(c.to_dict()) for c in self.carried],
                "first_pass": {c.id: self.first_pass[c.id] for c in self.carried}}

    def load_state_dict(self, state: dict) -> None:
        from lhotse.serialization import deserialize_item

        self.epoch = state["epoch"]
        self.carried = [deserialize_item(d) for d in state.get("carried", [])]
        self.first_pass = dict(state.get("first_pass", {}))
        self._carried_next = None


def _plain(value):
    """A cut's ``to_dict()`` as the types a ``weights_only`` checkpoint load accepts: dicts, lists,
    strings, numbers, None and bytes. A Shar cut's audio is in memory (``AudioSource`` type
    ``memory``): its bytes stay, so a carried Shar cut resumes without its shard; named tuples
    (lhotse ``AlignmentItem``) become lists and paths strings, as in a JSON manifest."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"a carried cut holds a {type(value).__name__} ({value!r:.80}), which a checkpoint cannot "
                    "store as plain data")


def load_bucket_profile(path, recipe: str | None = None) -> tuple[BucketGrid, dict]:
    """(grid of *per-GPU* batch sizes, the profile) from a ``make profile-batches`` file
    (``data.bucket_profile``); errors name the file and what is wrong with it."""
    import json
    from pathlib import Path

    from common.errors import ConfigError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"data.bucket_profile {path}: no such file (make profile-batches writes one)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.bucket_profile {path}: not a bucket profile ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"data.bucket_profile {path}: format {data.get('format') if isinstance(data, dict) else None!r}, "
                          f"expected {PROFILE_FORMAT!r}")
    if recipe is not None and data.get("recipe") != recipe:
        raise ConfigError(f"data.bucket_profile {path} was measured for recipe {data.get('recipe')!r}, not {recipe!r}")
    try:
        return BucketGrid.from_state_dict(data["grid"]), data
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"data.bucket_profile {path}: bad grid ({exc})") from None
