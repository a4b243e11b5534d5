"""The CTC recognizer on one process: greedy decoding, loss, batch-composition independence."""

import pytest
import torch
from lhotse import CutSet

from common.data.loading import LoaderConfig, featurized, make_loader
from common.data.tokenizer import BPETokenizer
from common.models.asr_ctc import CTCASR, ctc_greedy_decode
from tests.conftest import recipe_config


def _log_probs(paths, vocab):
    return torch.stack([torch.nn.functional.one_hot(torch.tensor(p), vocab).float() for p in paths]).add(1e-6).log()


def test_greedy_decoding_merges_repeats_then_drops_blanks():
    lp = _log_probs([[0, 3, 3, 0, 3, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0]], vocab=4)
    assert ctc_greedy_decode(lp, torch.tensor([8, 8]), blank_id=0) == [[3, 3, 2], [1]]
    # Frames past an utterance's length are ignored.
    assert ctc_greedy_decode(lp, torch.tensor([3, 2]), blank_id=0) == [[3], [1]]


@pytest.fixture(scope="module")
def setup(tiny_corpus):
    cfg = recipe_config("asr_ddp")
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = BPETokenizer.build((c.supervisions[0].text for c in cuts), vocab_size=cfg.model.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = CTCASR(cfg.model, tok).eval()
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=12, shuffle=False, seed=0),
                                        dp_rank=0, dp_size=1)))
    return model, tok, batch


def test_loss_sum_and_token_count(setup):
    model, tok, batch = setup
    loss_sum, num_tokens, _ = model(batch)
    assert num_tokens == sum(len(tok.encode(t)) for t in batch["texts"])  # no <eos> for CTC
    assert torch.isfinite(loss_sum) and loss_sum > 0
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_loss_does_not_depend_on_what_an_utterance_is_batched_with(setup):
    model, _, batch = setup
    n = batch["input_features"].shape[0]
    with torch.no_grad():
        whole = model(batch).loss_sum
        parts = 0.0
        for i in range(n):
            frames = int(batch["feature_mask"][i].sum())
            single = {"input_features": batch["input_features"][i : i + 1, :frames],
                      "feature_mask": batch["feature_mask"][i : i + 1, :frames],
                      "target_ids": batch["target_ids"][i : i + 1], "target_lens": batch["target_lens"][i : i + 1]}
            parts += model(single)[0].item()
    assert whole.item() == pytest.approx(parts, rel=1e-5)


def test_generate_returns_token_ids_without_blanks(setup):
    model, tok, batch = setup
    hyps = model.generate(batch["input_features"], batch["feature_mask"])
    assert len(hyps) == batch["input_features"].shape[0]
    assert all(tok.blank_id not in h and all(0 <= t < tok.vocab_size for t in h) for h in hyps)


def test_spec_augment_changes_training_features_only(tiny_corpus):
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = BPETokenizer.build((c.supervisions[0].text for c in cuts), vocab_size=32)
    plain = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=12, shuffle=False),
                                        dp_rank=0, dp_size=1)))
    torch.manual_seed(0)
    augment = {"time_warp_factor": None, "num_frame_masks": 2, "frames_mask_size": 10, "p": 1.0}
    config = LoaderConfig(max_duration_s=12, shuffle=False, spec_augment=augment)
    masked = next(featurized(make_loader(cuts, tok, config, dp_rank=0, dp_size=1), training=True))
    assert plain["ids"] == masked["ids"]
    assert not torch.equal(plain["input_features"], masked["input_features"])

    def constant_frames(b):  # a time mask fills whole frames with one value
        return int(((b["input_features"].std(-1) == 0) & b["feature_mask"]).sum())

    assert constant_frames(masked) > constant_frames(plain) == 0


def test_config_scales_to_the_100m_class():
    """The documented large setting really is a ~100M-parameter FastConformer-CTC (built on the meta device)."""
    cfg = recipe_config("asr_ddp", ["model.encoder.hidden_size=512", "model.encoder.num_hidden_layers=17",
                                    "model.encoder.num_attention_heads=8", "model.encoder.intermediate_size=2048",
                                    "model.encoder.subsampling_factor=8", "model.encoder.subsampling_conv_channels=256",
                                    "data.num_mel_bins=80"])
    tok = BPETokenizer.build(["alpha bravo"], vocab_size=1024)
    with torch.device("meta"):
        model = CTCASR(cfg.model, tok)
    n = sum(p.numel() for p in model.parameters())
    assert 90e6 < n < 130e6, n


def test_intermediate_ctc_mixes_the_inner_layers_loss(setup):
    from omegaconf import OmegaConf

    _, tok, batch = setup
    cfg = recipe_config("asr_ddp").model
    torch.manual_seed(0)
    plain = CTCASR(cfg, tok).eval()
    mixed_cfg = OmegaConf.merge(cfg, {"inter_ctc": {"layer": 1, "weight": 0.3}})
    torch.manual_seed(0)
    mixed = CTCASR(mixed_cfg, tok).eval()
    with torch.no_grad():
        final = plain(batch).loss_sum
        # The inner loss by hand: layer 1's output through the same head.
        out = plain.ctc.encoder(input_features=batch["input_features"], attention_mask=batch["feature_mask"].long(),
                                output_hidden_states=True)
        inner = plain.ctc.ctc_head(out.hidden_states[1]).float().log_softmax(-1)
        inner_loss = torch.nn.functional.ctc_loss(inner.transpose(0, 1), batch["target_ids"], out.attention_mask.sum(-1),
                                                  batch["target_lens"], blank=0, reduction="sum", zero_infinity=True)
        got = mixed(batch).loss_sum
        assert torch.allclose(got, 0.7 * final + 0.3 * inner_loss, rtol=1e-5)
        assert mixed.generate(batch["input_features"], batch["feature_mask"]) == \
            plain.generate(batch["input_features"], batch["feature_mask"])  # decoding reads the last layer only
    with pytest.raises(ValueError, match="model.inter_ctc: layer must be an integer in \\[1, 1\\]"):
        CTCASR(OmegaConf.merge(cfg, {"inter_ctc": {"layer": 2, "weight": 0.3}}), tok)


def test_the_step_divides_the_models_sums_by_the_global_count_and_names_a_model_that_breaks_the_contract():
    import pytest

    from common.models.spec import LossSums
    from common.step import training_loss

    batch = {"global_num_target_tokens": torch.tensor(8.0)}
    out = LossSums(torch.tensor(4.0), 3, {"part": (torch.tensor(2.0), 3)})
    loss, shares = training_loss(out, batch, "global_num_target_tokens", dp=2, tp=2)
    # dp 2 undoes DDP's / FSDP2's average of the gradients; TP ranks hold copies of the same sums.
    assert float(loss) == 4.0 * 2 / 8 and float(shares["train_loss"]) == 4.0 / 8 / 2
    assert float(shares["train_part"]) == 2.0 / 8 / 2
    silent, _ = training_loss(out, {**batch, "substitute": True}, "global_num_target_tokens", dp=2)
    assert float(silent) == 0.0  # an unreadable shard's silence contributes nothing

    class Old(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match=r"Old.forward\(batch\) returned tuple; a model returns .*LossSums"):
        training_loss((torch.tensor(1.0), 1), batch, "global_num_target_tokens", dp=1, model=Old())
