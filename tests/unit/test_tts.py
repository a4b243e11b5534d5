"""The SpeechT5 TTS model on one process: loss, batch independence, synthesis, vocoder, PNG."""

import numpy as np
import pytest
import torch
from lhotse import CutSet

from common.data.features import BatchFeatures
from common.data.loading import LoaderConfig, featurized, make_loader
from common.data.tokenizer import BPETokenizer
from common.models.tts_speecht5 import SpeechT5TTS
from tests.conftest import recipe_config, tts_single_utterances


@pytest.fixture(scope="module")
def setup(tiny_corpus):
    cfg = recipe_config("tts_ddp", ["model=speecht5_tiny", "model.speecht5.speech_decoder_prenet_dropout=0.0"])
    cuts = CutSet.from_file(tiny_corpus["train"])
    tok = BPETokenizer.build((c.supervisions[0].text for c in cuts), vocab_size=cfg.model.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = SpeechT5TTS(cfg.model, tok, num_mel_bins=cfg.data.num_mel_bins).eval()
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=8, shuffle=False, seed=0,
                                                     normalize_features=False),
                                        dp_rank=0, dp_size=1)))
    return model, tok, batch, cfg


def test_targets_are_raw_log_mel_and_frame_counts_match_metadata(setup):
    _, _, batch, _ = setup
    frames = batch["feature_mask"].sum(1)
    assert batch["global_num_frames"] == int(frames.sum())  # computed from cut durations alone
    assert batch["input_features"][batch["feature_mask"]].mean() < -1  # raw log energies, not standardized


def test_loss_is_a_sum_over_frames_independent_of_batch_composition(setup):
    model, _, batch, _ = setup
    with torch.no_grad():
        whole, n, parts = model(batch)
        mel_sum, mel_count = parts["mel_loss"]
        stop_count = parts["stop_loss"][1]
        parts = sum(model(single)[0].item() for single in tts_single_utterances(batch))
    assert n == int(batch["feature_mask"].sum()) and mel_count == stop_count == n
    assert whole.item() == pytest.approx(parts, rel=1e-4)
    assert 0 < mel_sum.item() / mel_count
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_synthesis_stops_within_its_frame_budget(setup):
    model, tok, _, cfg = setup
    mels = model.synthesize(["alpha bravo", "charlie"])
    for text, mel in zip(["alpha bravo", "charlie"], mels):
        assert mel.shape[1] == cfg.data.num_mel_bins
        assert 0 < mel.shape[0] <= len(tok.encode(text)) * cfg.model.max_frames_per_token + 2
    # Sentences that ran to the frame limit instead of ending at the stop token are counted.
    r = model.r
    at_limit = sum(mel.shape[0] >= int(len(tok.encode(t)) * cfg.model.max_frames_per_token / r) * r
                   for t, mel in zip(["alpha bravo", "charlie"], mels))
    short = sum(mel.shape[0] < len(tok.encode(t)) for t, mel in zip(["alpha bravo", "charlie"], mels))
    assert model.last_synthesis == {"sentences": 2, "hit_frame_limit": at_limit, "too_short": short}


def test_griffin_lim_inverts_the_training_features(tiny_corpus):
    from common.models.vocoder import GriffinLim

    audio = CutSet.from_file(tiny_corpus["val"])[0].load_audio()[0]
    features = BatchFeatures(64, 16000, normalize=False)
    mel = features.of_waveform(audio)[0][0]
    samples = GriffinLim(64, 16000)(mel)
    again = features.of_waveform(samples)[0][0]
    assert samples.dtype == np.float32 and np.abs(samples).max() <= 0.9 + 1e-6
    assert again.shape == mel.shape
    centered = lambda x: x - x.mean()  # noqa: E731 - the vocoder normalizes loudness
    # Spectral shape survives (the exact error is bounded well below the features' own spread).
    assert (centered(again) - centered(mel)).abs().mean() < 0.5 * centered(mel).abs().mean()


def test_synthesize_writes_wav_and_png(setup, tmp_path):
    import soundfile as sf

    from common.tools.synthesize import synthesize_to_files

    model, _, _, cfg = setup
    wav, png = synthesize_to_files(model, cfg, "Alpha, BRAVO!", tmp_path / "out.wav")
    samples, rate = sf.read(wav)
    assert rate == 16000 and len(samples) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_scales_to_speecht5_base_size():
    cfg = recipe_config("tts_ddp", ["model=speecht5_tiny", "model.speecht5.hidden_size=768", "model.speecht5.encoder_layers=12",
                                    "model.speecht5.decoder_layers=6", "model.speecht5.encoder_attention_heads=12",
                                    "model.speecht5.decoder_attention_heads=12", "model.speecht5.encoder_ffn_dim=3072",
                                    "model.speecht5.decoder_ffn_dim=3072", "model.speecht5.speech_decoder_prenet_units=256",
                                    "model.speecht5.speech_decoder_postnet_units=256"])
    tok = BPETokenizer.build(["alpha bravo"], vocab_size=2)
    with torch.device("meta"):
        model = SpeechT5TTS(cfg.model, tok, num_mel_bins=80)
    n = sum(p.numel() for p in model.parameters())
    assert 120e6 < n < 160e6, n
