import pytest
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

from common.data.loading import DataParallelBatchSampler, LoaderConfig, TokenBudget, make_loader, shard_cuts
from common.data.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def cuts(tiny_corpus):
    return CutSet.from_file(tiny_corpus["train"])


@pytest.fixture(scope="module")
def tok(cuts):
    return WordTokenizer.build((c.supervisions[0].text for c in cuts), extra_words=["transcribe"])


def test_shards_partition_the_global_batch(cuts):
    batch = list(cuts)[:11]
    shards = shard_cuts(batch, 3)
    ids = [c.id for s in shards for c in s]
    assert sorted(ids) == sorted(c.id for c in batch) and len(set(ids)) == 11
    assert [len(s) for s in shards] == [4, 4, 3]


def test_dp_ranks_get_disjoint_shards_of_the_same_global_batches(cuts, tok):
    per_rank = []
    for rank in range(2):
        loader = make_loader(cuts, tok,
                             LoaderConfig(max_duration_s=20, shuffle=True, seed=7),
                             dp_rank=rank, dp_size=2)
        per_rank.append(list(loader))
    assert len(per_rank[0]) == len(per_rank[1]) > 3  # equal step counts: no deadlock at epoch end
    for b0, b1 in zip(*per_rank):
        assert not set(b0["ids"]) & set(b1["ids"])
        assert b0["global_num_utterances"] == b1["global_num_utterances"] == len(b0["ids"]) + len(b1["ids"])
        if b1["empty_shard"]:  # a one-utterance global batch (the longest bucket): rank 1 steps on silence
            assert b0["global_num_utterances"] == 1 and b1["substitute"] and not b1["ids"]
            continue
        assert b0["global_num_target_tokens"] == int(b0["target_lens"].sum() + b1["target_lens"].sum())
    # The dataset's targets end with <eos> and match the text.
    b = per_rank[0][0]
    n = int(b["target_lens"][0])
    assert int(b["target_ids"][0, n - 1]) == tok.eos_id and tok.decode(b["target_ids"][0, :n].tolist()) == b["texts"][0]
    b = per_rank[0][0] = make_loader(cuts, tok,
                                     LoaderConfig(max_duration_s=20, shuffle=True, seed=7),
                                     dp_rank=0, dp_size=2).features(b)
    assert b["input_features"].shape[0] == len(b["ids"]) and b["feature_mask"].any(1).all()


def test_global_batches_do_not_depend_on_dp_size(cuts, tok):
    def global_ids(dp):
        loaders = [make_loader(cuts, tok,
                               LoaderConfig(max_duration_s=20, shuffle=True, seed=1),
                               dp_rank=r, dp_size=dp)
                   for r in range(dp)]
        return [sorted(i for b in step for i in b["ids"]) for step in zip(*loaders)]

    assert global_ids(1) == global_ids(2) == global_ids(4)


def test_a_global_batch_smaller_than_dp_size_is_kept_on_every_rank(cuts, tok):
    """A bucket's ragged tail with fewer cuts than ranks: every rank takes the step (an empty shard
    runs silence with zero loss weight), so steps and global batches do not depend on dp_size."""
    from common.data.loading import SpeechTextDataset

    small = cuts.subset(first=3)
    samplers = [DataParallelBatchSampler(SimpleCutSampler(small, max_cuts=1), dp_rank=r, dp_size=2) for r in range(2)]
    batches = [list(s) for s in samplers]
    assert [len(b) for b in batches] == [3, 3]
    ds = SpeechTextDataset(tok)
    first, second = ds[batches[0][0]], ds[batches[1][0]]
    assert (first["substitute"], first["empty_shard"]) == (False, False) and first["num_planned"] == 1
    assert (second["substitute"], second["empty_shard"]) == (True, True) and second["num_planned"] == 0
    assert second["global_num_utterances"] == first["global_num_utterances"] == 1
    assert float(second["audio"].samples.abs().sum()) == 0.0  # silence


def test_every_item_is_trained_once_per_pass(cuts, tok):
    """Nothing dropped: an item is in a batch of its pass, or carried to the start of the next (logged)."""
    many = cuts.subset(first=100)
    loader = make_loader(many, tok,
                         LoaderConfig(max_duration_s=30, shuffle=True, seed=0),
                         dp_rank=0, dp_size=2)
    first = [c.id for b in loader.sampler for c in b.cuts]
    carried = [c.id for c in loader.sampler.sampler._carried_next]
    assert len(first) == len(set(first)) and sorted(first + carried) == sorted(c.id for c in many)
    assert loader.sampler.coverage == [{"epoch": 0, "items": len(first), "passed_checks": 100, "used": 100,
                                        "carried_in": 0, "carried_out": len(carried)}]
    loader.sampler.set_epoch(1)
    second = [c.id for b in loader.sampler for c in b.cuts]
    assert set(carried) <= set(second)


def test_lhotse_1d_groups_items_anew_each_pass_and_replays_a_pass_exactly(cuts, tok):
    """data.sampler=lhotse_1d (lhotse's duration buckets): each pass is its own shuffle with every
    item once (no carried tails), and iterating a pass again (a resume replays it) gives the same
    batches."""
    many = cuts.subset(first=100)
    loader = make_loader(many, tok,
                         LoaderConfig(max_duration_s=8, shuffle=True, seed=0, sampler="lhotse_1d"),
                         dp_rank=0, dp_size=2)

    def groups(epoch):
        loader.sampler.set_epoch(epoch)
        return [frozenset(c.id for c in b.cuts) for b in loader.sampler]

    first, second = groups(0), groups(1)
    for one_pass in (first, second):
        ids = [i for g in one_pass for i in g]
        assert len(ids) == len(set(ids)) == 100  # every item once per pass, no carried tails
    assert len(set(first) & set(second)) < len(first) // 4, "the same batches again in the next pass"
    assert groups(1) == second and groups(0) == first


def test_sampler_state_round_trip_resumes_the_same_order(cuts):
    def sampler():
        return DataParallelBatchSampler(
            DynamicBucketingSampler(cuts, max_duration=15, num_buckets=2, shuffle=True, seed=5), 0, 1)

    def ids(batches):
        return [[c.id for c in b.cuts] for b in batches]

    s = sampler()
    s.set_epoch(1)  # a later epoch: its own shuffle
    full = ids(s)
    assert full != ids(sampler())
    it = iter(s)
    for _ in range(3):
        # The training loop marks what it trained on; the DataLoader may have prefetched more.
        batch = next(it)
        s.mark_consumed(batch.epoch, batch.index)
    next(it)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == 3
    resumed = sampler()
    resumed.load_state_dict(state)
    assert ids(resumed) == full[3:]
    assert ids(resumed) == full  # only the first iteration after a resume skips


def test_speech_llm_batches_are_bounded_by_tokens(cuts, tok):
    budget = TokenBudget(tok, audio_frames_per_token=8, extra_tokens=2)
    cut = next(iter(cuts))
    assert budget(cut) == -(-round(cut.duration * 100) // 8) + len(cut.supervisions[0].text.split()) + 2
    loader = make_loader(cuts, tok,
                         LoaderConfig(max_duration_s=30, shuffle=True, seed=0, max_tokens=120),
                         dp_rank=0, dp_size=1, token_budget=budget)
    sizes = [len(b.cuts) * max(budget(c) for c in b.cuts) for b in loader.sampler]  # padded LLM positions
    # lhotse closes a batch when one more item as long as the longest so far would exceed the budget;
    # a last item longer than the rest (same bucket) may overshoot by that bucket's spread.
    assert sizes and max(sizes) <= 1.15 * 120 and sum(sizes) / len(sizes) <= 120
    assert sum(len(b.cuts) for b in loader.sampler) > 0.9 * len(cuts)  # drop_last loses at most a tail
    by_duration = make_loader(cuts, tok,
                              LoaderConfig(max_duration_s=30, shuffle=True, seed=0),
                              dp_rank=0, dp_size=1)
    assert len(list(by_duration.sampler)) != len(sizes)


def test_bucketing_pads_less_than_random_batches(cuts, tok):
    from common.data.loading import SpeechTextDataset

    ds = SpeechTextDataset(tok)
    bucketed = make_loader(cuts, tok,
                           LoaderConfig(max_duration_s=20, shuffle=True, seed=0),
                           dp_rank=0, dp_size=1)
    plain = DataParallelBatchSampler(SimpleCutSampler(cuts, max_duration=20, shuffle=True, seed=0), 0, 1)

    def mean_efficiency(sampler):
        values = [ds.padding_efficiency(b) for b in sampler]
        return sum(values) / len(values)

    assert mean_efficiency(bucketed.sampler) > mean_efficiency(plain) + 0.05


def test_padding_to_bucket_edges_gives_few_lengths_and_the_same_features(cuts, tok):
    """torch.compile's bounded set of shapes: every batch's audio is padded to a bucket edge; the
    features of the real frames do not change."""
    import math
    from dataclasses import replace

    import torch

    from common.data.loading import featurized

    config = LoaderConfig(max_duration_s=20, shuffle=True, seed=3, num_buckets=3)
    plain = make_loader(cuts, tok, config, dp_rank=0, dp_size=1)
    padded = make_loader(cuts, tok, replace(config, pad_to_bucket_edges=True), dp_rank=0, dp_size=1)
    assert plain.pad_edges_s is None and len(padded.pad_edges_s) <= 10  # bucket edges, or a sqrt(2) ladder
    edges = {math.ceil(e * 16000) for e in padded.pad_edges_s}
    widths = set()
    for a, b in zip(featurized(plain), featurized(padded)):
        widths.add(b["feature_mask"].shape[1])
        n = a["feature_mask"].shape[1]
        assert torch.equal(b["feature_mask"][:, :n], a["feature_mask"]) and not b["feature_mask"][:, n:].any()
        assert torch.allclose(b["input_features"][:, :n], a["input_features"], atol=1e-5)
    assert len(widths) <= len(edges) <= 10


def test_speed_perturbation_is_drawn_per_batch_and_item_and_changes_the_audio(cuts, tok):
    """Each item of a global batch at a factor drawn from (seed, epoch, batch, id): the same on every
    rank and on a resumed run, another in another pass; the audio is lhotse's speed-changed audio,
    as long as the planned (perturbed) duration says, and the global counts agree across ranks."""
    from common.data.loading import GlobalBatch, SpeechTextDataset

    factors = [0.8, 1.0, 1.25]
    first = list(cuts)[:12]
    ds = SpeechTextDataset(tok, speed_factors=factors, seed=3)
    batch = GlobalBatch(CutSet.from_cuts(first), dp_rank=0, dp_size=2, epoch=0, index=5)
    sped = ds.at_speed(batch)
    ratios = [round(c.duration / s.duration, 2) for c, s in zip(first, sped.cuts)]
    assert set(ratios) == set(factors) and [s.id for s in sped.cuts] == [c.id for c in first]  # ids kept
    assert [s.duration for s in ds.at_speed(batch).cuts] == [s.duration for s in sped.cuts]  # a resumed run
    later = ds.at_speed(GlobalBatch(CutSet.from_cuts(first), dp_rank=0, dp_size=2, epoch=1, index=5))
    assert [s.duration for s in later.cuts] != [s.duration for s in sped.cuts]  # another pass, other factors

    out = [SpeechTextDataset(tok, speed_factors=factors, seed=3)[GlobalBatch(CutSet.from_cuts(first), r, 2, 0, 5)]
           for r in range(2)]
    plain = SpeechTextDataset(tok)[GlobalBatch(CutSet.from_cuts(first), 0, 2, 0, 5)]
    assert out[0]["global_audio_s"] == out[1]["global_audio_s"] == pytest.approx(sum(s.duration for s in sped.cuts))
    assert out[0]["global_audio_s"] != pytest.approx(plain["global_audio_s"])
    by_id = {s.id: s for s in sped.cuts}
    for shard in out:
        for i, cut_id in enumerate(shard["ids"]):
            assert int(shard["audio"].lengths[i]) == pytest.approx(by_id[cut_id].duration * 16000, abs=2)
