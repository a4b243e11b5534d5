"""Model FLOPs for MFU: the formulas against a hand count, and against PyTorch's FLOP counter on real models."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.data.tokenizer import BPETokenizer, WordTokenizer
from common.flops import PEAK_BF16_TFLOPS, Part, decoder_lm_forward, peak_flops, training_flops
from common.models import build_model, spec_of
from common.models.salm import salm_flops
from tests.conftest import recipe_config


def test_decoder_lm_forward_by_hand():
    cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=4, num_hidden_layers=1, vocab_size=10)
    # Per token: q 8x8 + o 8x8 + k 8x4 + v 8x4 + gate/up/down 3 x 8x16 = 576 multiply-adds; 3 tokens.
    # Head: 8 x 10 per token. Attention: 2 (scores, weighted sum) x 2 x 3 x 3 x (2 heads x 4).
    part = decoder_lm_forward(cfg, positions=3)
    assert part.weights == 2 * 3 * 576 + 2 * 3 * 80 == 3936
    assert part.attention == 2 * 2 * 9 * 8 == 288


def test_training_counts_backward_by_what_trains():
    encoder, llm = Part(weights=100, attention=10), Part(weights=1000, attention=50)
    # Everything trains: 3 x forward (input gradients 2x attention, weight gradients 1x weights).
    assert training_flops([(encoder, 1.0), (llm, 1.0)]) == 3 * 110 + 3 * 1050
    # LLM frozen (LoRA-style): it still passes gradients back to the encoder, but has no weight gradients.
    assert training_flops([(encoder, 1.0), (llm, 0.0)]) == 110 + (100 + 20) + 100 + 1050 + (1000 + 100)
    # Encoder frozen: no backward through it at all.
    assert training_flops([(encoder, 0.0), (llm, 1.0)]) == 110 + 1050 + (1000 + 100) + 1000


def _batch(recipe, tok, frames, tokens):
    target = torch.randint(3, tok.vocab_size, (1, tokens))
    if recipe.startswith("salm"):
        target[0, -1] = tok.eos_id
    return {"input_features": torch.randn(1, frames, 64), "feature_mask": torch.ones(1, frames, dtype=torch.bool),
            "target_ids": target, "target_lens": torch.tensor([tokens]), "global_num_frames": frames}


SALM_STACKED = ["model.projector.ctc_compress=false", "model.projector.stack_frames=2"]


@pytest.mark.parametrize("recipe,overrides,lengths", [
    ("salm_fsdp2", SALM_STACKED, ((173, 5), (301, 7))),
    # CTC compression, the default: the formula counts one LLM position per answer token. The CTC head
    # is pinned below to one non-blank label (one run per row), so answers of one token (<eos>) match.
    ("salm_fsdp2", [], ((173, 1), (301, 1))),
    ("asr_ddp", [], ((173, 5), (301, 7))),
    ("tts_ddp", [], ((173, 5), (301, 7))),
], ids=["salm_fsdp2-stacked", "salm_fsdp2-ctc_compress", "asr_ddp", "tts_ddp"])
def test_forward_flops_match_pytorchs_counter(recipe, overrides, lengths):
    """The formulas count every matrix multiply and convolution the real model runs (1%)."""
    cfg = recipe_config(recipe, overrides)
    texts = ["alpha bravo charlie", "delta echo foxtrot"]
    tok = (WordTokenizer.build(texts, extra_words=["transcribe"]) if recipe.startswith("salm")
           else BPETokenizer.build(texts, vocab_size=20))
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    if recipe.startswith("salm"):
        model.pad_to_multiple_of = 1  # count the real positions only (padding is waste, not model work)
        if model.ctc_compress:
            with torch.no_grad():
                model.ctc_head.weight.zero_()
                model.ctc_head.bias.copy_(torch.arange(tok.vocab_size) == 3)
    for module in model.modules():  # PyTorch's counter does not see CPU's fused attention kernel
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    for frames, tokens in lengths:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(_batch(recipe, tok, frames, tokens))
        assert spec_of(cfg).flops(model).forward([(frames, tokens)]) == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_frozen_weights_have_no_weight_gradient_flops(salm_cfg):
    tok = WordTokenizer.build(["alpha bravo"], extra_words=["transcribe"])
    cfg = salm_cfg.model.copy()
    full = salm_flops(build_model(recipe_config("salm_fsdp2", []), tok)).training([(300, 4)])
    from common.models.salm import SALM

    cfg.freeze = ["llm.*"]
    frozen = salm_flops(SALM(cfg, tok)).training([(300, 4)])
    llm_weights = salm_flops(SALM(cfg, tok))._parts([(300, 4)])[2].weights
    assert frozen == pytest.approx(full - llm_weights)


def test_peak_is_none_on_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert math.isclose(dict(PEAK_BF16_TFLOPS)["H100"], 989.4)
