"""2-D buckets with per-bucket batch sizes and carried tails (common/data/buckets.py)."""

import random

import pytest
from lhotse import CutSet
from lhotse.testing.dummies import dummy_cut, dummy_supervision

from common.data.buckets import BucketGrid, BudgetBatchSize, CarryOverBucketSampler

WORDS_PER_S = 2.5


def corpus(n: int, seed: int = 0, mixed: bool = False) -> CutSet:
    """Utterances of 1-8 s (``mixed``: also 10-30 s ones) with ~2.5 words per second."""
    rng = random.Random(seed)
    cuts = []
    for i in range(n):
        d = round(rng.uniform(10, 30) if mixed and rng.random() < 0.3 else rng.uniform(1, 8), 2)
        words = max(1, round(d * WORDS_PER_S * rng.uniform(0.6, 1.4)))
        cuts.append(dummy_cut(i, duration=d, supervisions=[dummy_supervision(i, duration=d, text="w " * words)]))
    return CutSet.from_cuts(cuts)


def words(cut) -> int:
    return len(cut.supervisions[0].text.split())


def sampler_for(cuts, seed=0, max_duration_s=120.0, buckets=(16, 2), longest=30.0):
    grid = BucketGrid.estimate([(c.duration, words(c)) for c in cuts], *buckets,
                               batch_size=BudgetBatchSize(max_duration_s=max_duration_s), max_duration_s=longest)
    return CarryOverBucketSampler(cuts, grid, target_length=words, seed=seed, buffer_size=500)


def padding_efficiency(batches) -> float:
    real = sum(c.duration for b in batches for c in b)
    padded = sum(len(b) * max(c.duration for c in b) for b in batches)
    return real / padded


def test_every_item_is_trained_once_per_pass_and_tails_are_carried():
    from collections import Counter

    cuts = corpus(3000)
    everything = {c.id for c in cuts}
    sampler = sampler_for(cuts)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        carried_in = Counter(c.id for c in sampler.carried)
        batches = list(sampler)
        for b in batches:  # padded to its longest item, a batch holds at most the 120 s budget
            assert len(b) * max(c.duration for c in b) <= 120.0 + 1e-6
        trained = Counter(c.id for b in batches for c in b)
        assert carried_in <= trained  # what the previous pass carried is trained in this one
        own = trained - carried_in  # this pass's own items: each once
        assert max(own.values()) == 1
        carried_out = {c.id for c in sampler._carried_next}
        assert set(own) | carried_out == everything and not set(own) & carried_out  # trained now or carried
        if epoch:  # in the first pass the tails only go out; then about as many come in as go out
            assert sum(trained.values()) >= 0.9 * len(everything)
        assert not carried_out & set(carried_in)  # carried at most once: trained by the end of the next pass


@pytest.mark.parametrize("mixed", [False, True])
def test_padding_efficiency_reaches_095_with_every_item(mixed):
    cuts = corpus(4000, mixed=mixed)
    sampler = sampler_for(cuts, buckets=(30, 1), max_duration_s=120.0)
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(1)
    carried_in = len(sampler.carried)
    batches = list(sampler)  # a steady-state pass: carried tails in, new tails out
    assert padding_efficiency(batches) >= 0.95
    # every item of the pass is trained in it or carried to the next (nothing dropped): 100% used
    own = sum(len(b) for b in batches) - carried_in
    assert own + len(sampler._carried_next) == len(cuts)


def test_same_global_batches_for_every_rank_and_layout():
    cuts = corpus(800)
    a, b = sampler_for(cuts, seed=3), sampler_for(cuts, seed=3)
    assert [[c.id for c in x] for x in a] == [[c.id for c in x] for x in b]
    other = sampler_for(cuts, seed=4)
    assert [[c.id for c in x] for x in a] != [[c.id for c in x] for x in other]


def test_state_round_trip_resumes_the_pass_exactly():
    cuts = corpus(1500)
    ref = sampler_for(cuts)
    ref.set_epoch(0)
    list(ref)
    ref.set_epoch(1)
    state = ref.state_dict()
    want = [[c.id for c in x] for x in ref]
    resumed = sampler_for(cuts)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and [c.id for c in resumed.carried] == [c.id for c in ref.carried]
    assert [[c.id for c in x] for x in resumed] == want
    fresh = sampler_for(cuts)  # without the carried tails the pass would differ
    fresh.set_epoch(1)
    assert [[c.id for c in x] for x in fresh] != want


def test_two_d_bins_split_long_and_short_targets_of_one_duration():
    cuts = corpus(3000)
    grid = sampler_for(cuts, buckets=(4, 3)).grid
    assert len(grid.duration_edges) == 4 and all(len(row) == 3 for row in grid.token_edges)
    for row in grid.token_edges:
        assert row == sorted(row) and row[0] < row[-1]
    assert grid.duration_edges[-1] == 30.0  # the last bin takes anything up to the longest allowed utterance
    # per-bucket batch sizes: long buckets hold fewer utterances
    assert grid.batch_sizes[0][0] > grid.batch_sizes[-1][0]
    assert BucketGrid.from_state_dict(grid.state_dict()).batch_sizes == grid.batch_sizes


def test_small_corpora_get_fewer_buckets_so_every_pass_trains():
    cuts = corpus(60)
    sampler = sampler_for(cuts, max_duration_s=20.0, buckets=(24, 2))
    assert len(sampler.grid.keys()) <= 60 / 4
    sampler.set_epoch(0)
    assert list(sampler), "a pass without a single batch"


def test_state_with_word_alignments_loads_as_a_weights_only_checkpoint(tmp_path):
    # Carried cuts travel in the checkpoint; a corpus with word alignments (the generated one, any
    # forced-aligned corpus) once put lhotse AlignmentItem objects there, which torch.load refuses.
    import torch
    from lhotse.supervision import AlignmentItem

    cuts = corpus(1500)
    for cut in cuts:
        sup = cut.supervisions[0]
        sup.alignment = {"word": [AlignmentItem(symbol="w", start=0.0, duration=round(sup.duration, 2))]}
    ref = sampler_for(cuts)
    ref.set_epoch(0)
    list(ref)
    ref.set_epoch(1)
    assert ref.carried, "the test needs carried tails"
    torch.save({"sampler": ref.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["sampler"]
    resumed = sampler_for(cuts)
    resumed.load_state_dict(state)
    assert [c.supervisions[0].alignment for c in resumed.carried] == [c.supervisions[0].alignment for c in ref.carried]
    assert [[c.id for c in x] for x in resumed] == [[c.id for c in x] for x in ref]


@pytest.mark.slow  # make test-fast leaves it out
def test_checkpoints_of_earlier_versions_with_alignment_items_still_load(tmp_path):
    # Written before the state went through JSON: AlignmentItem tuples inside. Reading the checkpoint
    # through common.inference (or the resume path in common.checkpoint) allows exactly that type.
    import subprocess
    import sys

    import torch
    from lhotse.supervision import AlignmentItem

    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "loops": {"carried": [{"alignment": {"word": [AlignmentItem("w", 0.0, 1.0)]}}]}},
               path)
    code = ("import sys, torch; from pathlib import Path; {imp}; "
            "c = torch.load(sys.argv[1], weights_only=True); print(c['loops']['carried'][0]['alignment']['word'][0].symbol)")
    for imp in ("pass", "import common.inference, common.checkpoint"):  # importing changes nothing
        plain = subprocess.run([sys.executable, "-c", code.format(imp=imp), str(path)], capture_output=True, text=True)
        assert plain.returncode != 0 and "AlignmentItem" in plain.stderr  # what torch alone says
    # The readers of checkpoints allow exactly that type: make transcribe / export, and the resume checks.
    for reader in ("from common.inference import read_checkpoint; read_checkpoint(Path(sys.argv[1]))",
                   "from common.checkpoint import checkpoint_problem; assert checkpoint_problem(Path(sys.argv[1])) is None"):
        proc = subprocess.run([sys.executable, "-c", code.format(imp=reader), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "w", proc.stderr[-2000:]


@pytest.mark.parametrize("audio", ["on_disk", "in_memory"])
def test_state_with_real_audio_round_trips_through_a_weights_only_checkpoint(audio, tiny_corpus, tmp_path):
    """Carried cuts with real audio: files named by a cut manifest, and Shar's in-memory audio
    (bytes, which crashed a Shar run at its first checkpoint after a pass). The resumed tails
    hold the same samples and the resumed pass draws the same batches."""
    import numpy as np
    import torch

    from common.data.__main__ import main as data_cli

    cuts = CutSet.from_file(tiny_corpus["train"])
    if audio == "in_memory":
        assert data_cli(["to-shar", str(tiny_corpus["train"]), str(tmp_path / "shar"), "--shard-size", "40"]) == 0
        cuts = CutSet.from_shar(in_dir=tmp_path / "shar")
        assert next(iter(cuts)).recording.sources[0].type == "memory"

    def sampler():
        lengths = [(c.duration, words(c)) for c in cuts]
        grid = BucketGrid.estimate(lengths, 4, 2, batch_size=BudgetBatchSize(max_duration_s=40.0), max_duration_s=12.0)
        return CarryOverBucketSampler(cuts, grid, target_length=words, seed=0, buffer_size=50)

    ref = sampler()
    ref.set_epoch(0)
    list(ref)
    ref.set_epoch(1)
    assert ref.carried, "the test needs carried tails"
    torch.save({"sampler": ref.state_dict()}, tmp_path / "state.pt")
    resumed = sampler()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["sampler"])
    assert [c.id for c in resumed.carried] == [c.id for c in ref.carried]
    for a, b in zip(ref.carried, resumed.carried):
        x, y = a.load_audio(), b.load_audio()
        assert x.shape == y.shape and x.size > 0 and np.array_equal(x, y), a.id
    assert [[c.id for c in x] for x in resumed] == [[c.id for c in x] for x in ref]
