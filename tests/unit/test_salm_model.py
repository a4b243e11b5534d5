"""The SALM model on one process: loss over answer tokens only, batch-composition independence, decoding."""

import pytest
import torch
from lhotse import CutSet

from common.data.loading import LoaderConfig, featurized, make_loader
from common.data.tokenizer import WordTokenizer
from common.models.encoder import ChannelLayerNorm
from common.models.salm import SALM


@pytest.fixture(scope="module")
def setup(tiny_corpus, salm_cfg):
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = WordTokenizer.build((c.supervisions[0].text for c in cuts), extra_words=["transcribe"])
    torch.manual_seed(0)
    model = SALM(salm_cfg.model, tok).eval()
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=12, shuffle=False, seed=0),
                                        dp_rank=0, dp_size=1)))
    return model, tok, batch


def _take(batch, idx):
    out = {k: v for k, v in batch.items() if k != "num_target_tokens"}
    for key in ("input_features", "feature_mask", "target_ids", "target_lens"):
        out[key] = batch[key][idx]
    n = int(out["feature_mask"].sum(1).max())
    out["input_features"], out["feature_mask"] = out["input_features"][:, :n], out["feature_mask"][:, :n]
    m = int(out["target_lens"].max())
    out["target_ids"] = out["target_ids"][:, :m]
    return out


def test_loss_counts_only_answer_tokens(setup):
    model, _, batch = setup
    loss_sum, num_tokens, _ = model(batch)
    assert num_tokens == int(batch["target_lens"].sum())  # transcript words + <eos>, nothing from the prompt
    assert torch.isfinite(loss_sum) and loss_sum > 0


def test_loss_does_not_depend_on_what_an_utterance_is_batched_with(setup):
    """The property that makes losses equal across data-parallel layouts (and why BatchNorm is replaced)."""
    model, _, batch = setup
    n = batch["input_features"].shape[0]
    assert n >= 3
    with torch.no_grad():
        whole = model(batch).loss_sum
        parts = sum(model(_take(batch, torch.tensor([i])))[0] for i in range(n))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert any(isinstance(m, ChannelLayerNorm) for m in model.modules())


def test_greedy_decoding_runs_fixed_steps_and_stops_at_eos(setup):
    model, tok, batch = setup
    hyps = model.generate(batch["input_features"], batch["feature_mask"], max_new_tokens=4)
    assert len(hyps) == batch["input_features"].shape[0]
    assert all(len(h) <= 4 and tok.eos_id not in h for h in hyps)


def _row_by_row(model, audio, audio_lens, targets, target_lens):
    """The per-utterance construction the batched one replaced: ids, labels, audio positions."""
    rows = []
    for i in range(audio.shape[0]):
        n, t = int(audio_lens[i]), targets[i, : int(target_lens[i])].tolist()
        ids = [model.bos_id] + [model.pad_id] * n + model.prompt_ids + t
        start = 1 + n + len(model.prompt_ids)
        labels = [-100] * (start - 1) + t + [-100]
        rows.append((ids, labels, n))
    return rows


def test_batched_sequence_equals_the_row_by_row_construction(setup):
    model, _, batch = setup
    targets, target_lens = batch["target_ids"], batch["target_lens"]
    with torch.no_grad():
        audio, audio_lens, _ = model.encode_audio(batch["input_features"], batch["feature_mask"])
        width = int((1 + audio_lens + len(model.prompt_ids) + target_lens).max()) + 3
        embeds, ids, in_answer = model._sequence(audio, audio_lens, targets, target_lens, width)
        table = model.llm.get_input_embeddings()
        for i, (row_ids, row_labels, n) in enumerate(_row_by_row(model, audio, audio_lens, targets, target_lens)):
            k = len(row_ids)
            assert ids[i, :k].tolist() == row_ids and (ids[i, k:] == model.pad_id).all()
            labels = torch.where(in_answer[i, 1:], ids[i, 1:], -100).tolist() + [-100]
            assert labels[:k] == row_labels and set(labels[k:]) <= {-100}
            assert torch.equal(embeds[i, 1 : 1 + n], audio[i, :n])  # the projected frames, in order
            assert torch.equal(embeds[i, 1 + n : k], table(torch.tensor(row_ids[1 + n :])))
            assert torch.equal(embeds[i, 0], table.weight[model.bos_id])


def _greedy_without_cache(model, features, mask, steps):
    """Reference greedy decoding: the whole sequence again for every new token."""
    audio, audio_lens, _ = model.encode_audio(features, mask)
    out = torch.zeros(audio.shape[0], 0, dtype=torch.long)
    for _ in range(steps):
        lens = 1 + audio_lens + len(model.prompt_ids) + out.shape[1]
        embeds, _, _ = model._sequence(audio, audio_lens, out, torch.full_like(audio_lens, out.shape[1]),
                                       int(lens.max()))
        logits = model._logits(embeds)
        nxt = logits[torch.arange(len(lens)), lens - 1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out.tolist()


@pytest.mark.parametrize("seq_len_multiple", [1, 2, 4])
def test_cached_generate_equals_recomputing_the_sequence(setup, seq_len_multiple):
    """KV-cache greedy decoding (left-padded prefixes; under sequence parallelism a step feeds
    ``tp`` positions and crops the cache) picks exactly the tokens full recomputation picks."""
    model, tok, batch = setup
    with torch.no_grad():
        reference = _greedy_without_cache(model, batch["input_features"], batch["feature_mask"], 6)
        model.parallel_hooks.seq_len_multiple = seq_len_multiple
        try:
            cached = model.generate(batch["input_features"], batch["feature_mask"], max_new_tokens=6)
        finally:
            model.parallel_hooks.seq_len_multiple = 1
    eos = tok.eos_id
    assert len({tuple(r) for r in reference}) > 1  # not a degenerate constant output
    assert cached == [seq[: seq.index(eos)] if eos in seq else seq for seq in reference]


def test_freeze_by_pattern(tiny_corpus, salm_cfg):
    tok = WordTokenizer.build(["alpha"], extra_words=["transcribe"])
    cfg = salm_cfg.model.copy()
    cfg.freeze = ["encoder.*"]
    model = SALM(cfg, tok)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("encoder."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("llm."))
    cfg.freeze = ["nothing.here"]
    with pytest.raises(ValueError, match="'nothing.here' matches no parameter"):
        SALM(cfg, tok)


def test_ctc_compression_averages_each_run_of_a_label_and_drops_blanks():
    from common.models.salm import ctc_compress

    frames = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1).repeat(1, 1, 3)
    blank = 0
    labels = torch.tensor([[5, 5, 0, 7, 7, 0, 0, 5],   # runs: (0, 1) (3, 4) (7)
                           [0, 6, 6, 6, 0, 9, 9, 9]])  # runs: (1, 2, 3); frames 5.. are past its end
    out, counts = ctc_compress(frames, torch.tensor([8, 5]), labels, blank)
    assert counts.tolist() == [3, 1] and out.shape == (2, 3, 3)
    assert out[0, :, 0].tolist() == [0.5, 3.5, 7.0]
    assert out[1, 0, 0].item() == 10.0 and out[1, 1:].abs().sum() == 0  # (9 + 10 + 11) / 3; nothing past the end
    # Gradients reach every kept frame (through the means), none reach blanks or padding.
    frames.requires_grad_(True)
    ctc_compress(frames, torch.tensor([8, 5]), labels, blank)[0].sum().backward()
    assert (frames.grad[0, :, 0] > 0).tolist() == [True, True, False, True, True, False, False, True]
    assert (frames.grad[1, :, 0] > 0).tolist() == [False, True, True, True, False, False, False, False]
    # A row with no non-blank label yet (early training) has no audio position.
    assert ctc_compress(frames, torch.tensor([8, 8]), torch.zeros(2, 8, dtype=torch.long), blank)[1].tolist() == [0, 0]


def test_ctc_compression_of_bf16_frames_sums_in_fp32():
    from common.models.salm import ctc_compress

    # One run of 257 frames: 256 x 1.0 and one 3.0. bf16 holds whole numbers exactly only up to 256,
    # so a bf16 sum (259 -> 260) and count (257 -> 256) would give 1.0156 instead of 1.0078.
    frames = torch.cat([torch.ones(256), torch.full((1,), 3.0)]).to(torch.bfloat16)[None, :, None]
    out, counts = ctc_compress(frames, torch.tensor([257]), torch.ones(1, 257, dtype=torch.long), blank=0)
    assert out.dtype == torch.bfloat16 and counts.tolist() == [1]
    assert out.float().item() == pytest.approx(259 / 257, abs=2.0**-8)


def test_ctc_compressed_salm_trains_and_decodes(tiny_corpus, salm_cfg):
    from omegaconf import OmegaConf

    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = WordTokenizer.build((c.supervisions[0].text for c in cuts), extra_words=["transcribe"])
    cfg = OmegaConf.merge(salm_cfg.model, {"projector": {"ctc_compress": True, "stack_frames": 1}})
    torch.manual_seed(0)
    model = SALM(cfg, tok)
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=12, shuffle=False, seed=0),
                                        dp_rank=0, dp_size=1)))
    loss, n, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and n == int(batch["target_lens"].sum())
    assert model.ctc_head.weight.grad.abs().sum() > 0
    # The answer's loss alone (CTC weight 0) reaches the encoder through the segment means, and not the
    # CTC head: its labels only choose the segments (argmax of detached logits).
    model.zero_grad()
    model.ctc_weight = 0.0
    model(batch).loss_sum.backward()
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.encoder.layers.parameters() if p.grad is not None) > 0
    assert model.ctc_head.weight.grad is None or model.ctc_head.weight.grad.abs().sum() == 0
    assert len(model.eval().generate(batch["input_features"][:2], batch["feature_mask"][:2])) == 2
    with pytest.raises(ValueError, match="ctc_aux_weight"):
        SALM(OmegaConf.merge(cfg, {"ctc_aux_weight": 0.0}), tok)
