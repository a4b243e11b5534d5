"""Model presets (common/conf/model/): every preset builds on the meta device with the parameter
counts it documents (2%), fits its recipe's family, and GPU presets size batches per GPU."""

import pytest
import torch

from common.data.tokenizer import SizedVocabulary
from common.errors import ConfigError
from common.models import build_model, model_presets, parameter_counts
from common.run import ROOT, compose
from common.settings import check_settings, resolve_batch_size

RECIPE_OF = {"salm": "salm_fsdp2", "asr_ctc": "asr_ddp", "tts_fastspeech": "tts_ddp", "tts_speecht5": "tts_ddp"}
RECIPES_OF = {"salm": ["salm_fsdp2", "salm_tp_fsdp2"], "asr_ctc": ["asr_ddp"], "tts_fastspeech": ["tts_ddp"],
              "tts_speecht5": ["tts_ddp"]}
PRESETS = model_presets()


def test_every_family_has_a_tiny_default_and_real_presets():
    assert {"salm_tiny", "ctc_tiny", "fastspeech_tiny", "speecht5_tiny", "canary_qwen_2p5b", "salm_0p7b",
            "fastconformer_ctc_large", "fastconformer_ctc_xl", "fastspeech_base", "speecht5_base"} <= set(PRESETS)
    for recipe in set(RECIPE_OF.values()):
        cfg = compose(recipe, ["run.name=x"])
        assert cfg.model.about.source.startswith("tiny"), f"{recipe}'s default is not its tiny preset"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_match_what_it_documents(preset):
    cfg = compose(RECIPE_OF[PRESETS[preset]], [f"model={preset}", "run.name=x"])
    about = cfg.model.about
    assert about.source and about.trains, f"{preset}: model.about must state its source and what it trains"
    for key in ("pretrained_llm", "pretrained_encoder"):  # the architecture the preset spells out, offline
        if key in cfg.model:
            cfg.model[key] = None
    with torch.device("meta"):
        model = build_model(cfg, SizedVocabulary(about.vocab_size))
    total, trainable = parameter_counts(model)
    assert total == pytest.approx(about.parameters, rel=0.02), f"{preset}: {total:,} parameters"
    assert trainable == pytest.approx(about.trainable_parameters, rel=0.02), f"{preset}: {trainable:,} trainable"
    if not preset.endswith("_tiny"):  # GPU presets: batch per GPU, so any cluster size keeps per-GPU memory
        assert cfg.data.max_duration_s_per_gpu or cfg.data.max_tokens_per_gpu, preset
        assert total > 5e7, f"{preset} is not a real-size preset"  # (FastSpeech2-Conformer: 68 M)


def test_frozen_llm_with_lora_is_what_canary_qwen_trains():
    cfg = compose("salm_fsdp2", ["model=canary_qwen_2p5b", "model.pretrained_llm=null", "run.name=x"])
    with torch.device("meta"):
        model = build_model(cfg, SizedVocabulary(cfg.model.about.vocab_size))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in trainable) and any(n.startswith("projector.") for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("llm."))
    assert model.llm.get_input_embeddings().weight is model.llm.get_output_embeddings().weight  # Qwen3-1.7B ties


def test_recipe_readmes_document_their_presets():
    for family, recipes in RECIPES_OF.items():
        for recipe in recipes:
            readme = (ROOT / "recipes" / recipe / "README.md").read_text()
            for preset, name in PRESETS.items():
                if name == family:
                    assert f"model={preset}" in readme, f"recipes/{recipe}/README.md does not document {preset}"


def test_a_preset_of_another_family_is_refused_naming_the_ones_that_fit():
    cfg = compose("asr_ddp", ["model=canary_qwen_2p5b", "run.name=x"])
    with pytest.raises(ConfigError, match=r"recipe 'asr_ddp' trains 'asr_ctc'.*model=ctc_tiny.*fastconformer_ctc_large"):
        check_settings(cfg)


def test_a_recipe_with_two_model_families_takes_either_and_names_both():
    # tts_ddp trains the FastSpeech-style model by default and SpeechT5 on request.
    for preset in ("fastspeech_tiny", "speecht5_tiny", "fastspeech_base", "speecht5_base"):
        check_settings(compose("tts_ddp", [f"model={preset}", "run.name=x"]))
    cfg = compose("tts_ddp", ["model=ctc_tiny", "run.name=x"])
    with pytest.raises(ConfigError, match=r"trains 'tts_fastspeech' or 'tts_speecht5'.*model=fastspeech_base.*speecht5_tiny"):
        check_settings(cfg)


def test_per_gpu_batch_scales_with_the_world_size():
    cfg = compose("asr_ddp", ["model=fastconformer_ctc_large", "run.name=x"])
    resolve_batch_size(cfg.data, 16)
    assert cfg.data.max_duration_s == 2000 * 16
    tiny = compose("asr_ddp", ["run.name=x"])
    resolve_batch_size(tiny.data, 16)
    assert tiny.data.max_duration_s == 30  # the tiny presets keep the global batch
    with pytest.raises(ConfigError, match="data.max_duration_s_per_gpu"):
        check_settings(compose("asr_ddp", ["data.max_duration_s_per_gpu=-3", "run.name=x"]))


def test_data_presets_pick_each_default_models_measured_settings():
    """common/conf/tuning/<family>/<model>_<data>.yaml: asr_ddp's default model on English gets the
    width, steps and weight average measured there; tts_ddp's reads one voice, in phonemes, with the attention alignment; the tone corpus and
    another model preset keep their own settings."""
    english = compose("asr_ddp", ["data=english"])
    assert (english.model.encoder.hidden_size, english.trainer.max_steps, english.ema.decay) == (144, 9000, 0.999)
    assert english.data.speed_perturb is None and english.data.noise is None  # the A/B: they did not help here
    tone = compose("asr_ddp")
    assert tone.ema.decay is None and tone.model.encoder.hidden_size == 96
    assert compose("asr_ddp", ["data=english", "model=fastconformer_ctc_large"]).ema.decay is None
    tts_english, tts_tone = compose("tts_ddp", ["data=english"]), compose("tts_ddp")
    assert (tts_english.data.english.voice, tts_english.model.tokenizer.phonemes, tts_english.model.alignment) \
        == ("en-us+m3", "en-us", "attention")
    assert (tts_tone.data.english.voice, tts_tone.model.tokenizer.phonemes, tts_tone.model.alignment) \
        == (None, None, "mean_frame")  # characters and the search over mean frames
