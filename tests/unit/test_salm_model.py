"""The SALM model on one process: loss over answer tokens only, batch-composition independence, decoding."""

import pytest
import torch
from lhotse import CutSet

from common.data.loading import make_loader
from common.data.tokenizer import WordTokenizer
from common.models.encoder import ChannelLayerNorm
from common.models.salm import SALM


@pytest.fixture(scope="module")
def setup(tiny_corpus, salm_cfg):
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = WordTokenizer.build((c.supervisions[0].text for c in cuts), extra_words=["transcribe"])
    torch.manual_seed(0)
    model = SALM(salm_cfg.model, tok).eval()
    batch = next(iter(make_loader(cuts, tok, dp_rank=0, dp_size=1, max_duration_s=12, shuffle=False, seed=0)))
    return model, tok, batch


def _take(batch, idx):
    out = dict(batch)
    for key in ("input_features", "feature_mask", "target_ids", "target_lens"):
        out[key] = batch[key][idx]
    n = int(out["feature_mask"].sum(1).max())
    out["input_features"], out["feature_mask"] = out["input_features"][:, :n], out["feature_mask"][:, :n]
    m = int(out["target_lens"].max())
    out["target_ids"] = out["target_ids"][:, :m]
    return out


def test_loss_counts_only_answer_tokens(setup):
    model, _, batch = setup
    loss_sum, num_tokens = model(batch)
    assert num_tokens == int(batch["target_lens"].sum())  # transcript words + <eos>, nothing from the prompt
    assert torch.isfinite(loss_sum) and loss_sum > 0


def test_loss_does_not_depend_on_what_an_utterance_is_batched_with(setup):
    """The property that makes losses equal across data-parallel layouts (and why BatchNorm is replaced)."""
    model, _, batch = setup
    n = batch["input_features"].shape[0]
    assert n >= 3
    with torch.no_grad():
        whole, _ = model(batch)
        parts = sum(model(_take(batch, torch.tensor([i])))[0] for i in range(n))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert any(isinstance(m, ChannelLayerNorm) for m in model.modules())


def test_greedy_decoding_runs_fixed_steps_and_stops_at_eos(setup):
    model, tok, batch = setup
    hyps = model.generate(batch["input_features"], batch["feature_mask"], max_new_tokens=4)
    assert len(hyps) == batch["input_features"].shape[0]
    assert all(len(h) <= 4 and tok.eos_id not in h for h in hyps)


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
