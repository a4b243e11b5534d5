"""The default TTS model (FastSpeech-style, alignment by monotonic alignment search) on one process."""

import pytest
import torch
from lhotse import CutSet

from common.data.loading import LoaderConfig, featurized, make_loader
from common.data.tokenizer import BPETokenizer
from common.models import build_model
from tests.conftest import recipe_config, tts_single_utterances


@pytest.fixture(scope="module")
def setup(tiny_corpus):
    cfg = recipe_config("tts_ddp", [])
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = BPETokenizer.build((c.supervisions[0].text for c in cuts), vocab_size=cfg.model.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=8, shuffle=False, seed=0,
                                                     normalize_features=False),
                                        dp_rank=0, dp_size=1)))
    return model, tok, batch, cfg


def test_the_recipe_default_is_the_non_autoregressive_model(setup):
    model, _, _, cfg = setup
    assert cfg.model.name == "tts_fastspeech" and type(model).__name__ == "FastSpeechTTS"
    assert not cfg.data.token_alignment  # it learns its own alignment: no word timings are read


def test_every_parameter_is_initialized_and_no_batch_norm_remains(setup):
    model, *_ = setup
    # transformers creates the relative-position biases uninitialized (torch.Tensor(n)); left so,
    # they held whatever memory they got (values up to 1e30: gradient norms of 1e13 in training).
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 100, name
    # Small values alone would not prove it (fresh memory is often zeros): the biases must have
    # xavier_uniform's range *and* spread (uniform on [-a, a]: std a / sqrt(3)).
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith(("pos_bias_u", "pos_bias_v"))]
    assert biases
    for name, p in biases:
        bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
        assert p.abs().max() <= bound, name
        assert 0.6 * bound / 3**0.5 < p.std() < 1.4 * bound / 3**0.5, name
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_loss_is_a_sum_over_frames_independent_of_batch_composition(setup):
    model, _, batch, _ = setup
    model.eval()
    with torch.no_grad():
        whole, n, parts = model(batch)
        mel_sum, mel_count = parts["mel_loss"]
        singles = sum(model(single).loss_sum.item() for single in tts_single_utterances(batch))
    assert n == int(batch["feature_mask"].sum()) == mel_count
    assert whole.item() == pytest.approx(singles, rel=1e-4)
    assert mel_sum.item() > 0


@pytest.mark.slow  # make test-fast leaves it out
def test_training_learns_the_frames_and_the_durations(setup):
    _, tok, batch, cfg = setup
    torch.manual_seed(0)
    model = build_model(cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss, n, parts = model(batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        first = first if first is not None else {k: v[0].item() / v[1] for k, v in parts.items()}
    last = {k: v[0].item() / v[1] for k, v in parts.items()}
    assert last["mel_loss"] < 0.6 * first["mel_loss"] and last["duration_loss"] < 0.3 * first["duration_loss"]


def test_synthesis_length_comes_from_the_durations_and_the_frame_limit_is_counted(setup):
    model, tok, _, cfg = setup
    model.eval()
    texts = ["alpha bravo", "charlie", "delta echo foxtrot golf"]
    mels = model.synthesize(texts)
    assert model.last_synthesis["sentences"] == 3 and model.last_synthesis["too_short"] == 0
    for text, mel in zip(texts, mels):
        tokens = len(tok.encode(text))
        assert mel.shape[1] == cfg.data.num_mel_bins and tokens <= mel.shape[0] <= tokens * cfg.model.max_frames_per_token
    # One sentence per call or all at once: the same frames (padding does not leak between sentences).
    alone = model.synthesize([texts[1]])[0]
    assert torch.allclose(alone, mels[1], atol=1e-4)
    model.max_frames_per_token = 1.0
    capped = model.synthesize(texts)
    assert model.last_synthesis["hit_frame_limit"] == sum(m.shape[0] > len(tok.encode(t)) for m, t in zip(mels, texts))
    assert all(m.shape[0] <= len(tok.encode(t)) for m, t in zip(capped, texts))
    model.max_frames_per_token = 0.5  # every sentence is cut below one frame per token: all counted
    model.synthesize(texts)
    assert model.last_synthesis["too_short"] == 3 and model.last_synthesis["hit_frame_limit"] == 3
    model.max_frames_per_token = float(cfg.model.max_frames_per_token)


def test_attention_alignment_trains_every_parameter_and_keeps_the_encoders_target(setup):
    """model.alignment=attention: DDP runs without an unused-parameter search, so every parameter must
    get a gradient in every step (the aligner's from the forward-sum loss, the encoder's also from the
    mean-frame prior, which keeps its states specific to their tokens)."""
    _, tok, batch, _ = setup
    cfg = recipe_config("tts_ddp", ["model.alignment=attention"])
    torch.manual_seed(0)
    model = build_model(cfg, tok).train()
    loss, n, _ = model(batch)
    (loss / n).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # to_prior's only path to the loss is the mean-frame prior: its gradient is the encoder's target.
    assert missing == [] and hasattr(model, "aligner") and model.alignment == "attention"
