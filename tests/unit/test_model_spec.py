"""One registered spec per model family: complete for every built-in model, the only source of what
the loop, the planner and the tools know about a model (no class names, no hasattr probing)."""

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.errors import ConfigError
from common.models import BUILTIN, build_model, model_spec
from common.models.spec import ModelSpec, register
from tests.conftest import recipe_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE_OF = {"salm": ("salm_fsdp2", []), "asr_ctc": ("asr_ddp", []), "tts_fastspeech": ("tts_ddp", []),
             "tts_speecht5": ("tts_ddp", ["model=speecht5_tiny"])}


@pytest.mark.parametrize("name", sorted(RECIPE_OF))
def test_each_builtin_spec_says_what_its_model_does(name):
    from common.data.tokenizer import BPETokenizer, WordTokenizer

    spec = model_spec(name)
    assert spec.name == name and all((spec.build, spec.tokenizer, spec.flops, spec.activation_values))
    recipe, overrides = RECIPE_OF[name]
    cfg = recipe_config(recipe, ["run.name=x", *overrides])
    texts = ["alpha bravo charlie", "delta echo foxtrot"]
    tok = WordTokenizer.build(texts, extra_words=["transcribe"]) if name == "salm" else BPETokenizer.build(texts, vocab_size=20)
    model = build_model(cfg, tok)
    # The capabilities it declares are the methods the tools call on it.
    assert spec.transcribes == callable(getattr(model, "generate", None))
    assert spec.synthesizes == callable(getattr(model, "synthesize", None))
    assert spec.flops(model).training([(300, 4)]) > 0
    assert (spec.audio_frames_per_token is not None) == (name == "salm")


def test_an_unknown_model_and_an_unimportable_model_file_are_named():
    with pytest.raises(ConfigError, match=r"model.name 'nope' is not known \(known: salm, asr_ctc, tts_fastspeech, "
                                          r"tts_speecht5\)"):
        model_spec("nope")
    with pytest.raises(ConfigError, match=r"model.module 'no_such_model_file' \(model.name 'toy'\) cannot be imported"):
        model_spec("toy", module="no_such_model_file")
    assert set(BUILTIN) == {"salm", "asr_ctc", "tts_fastspeech", "tts_speecht5"}


def test_a_model_without_an_activation_estimate_is_an_error_in_the_planner_not_zero_bytes():
    from common.tools.plan import PlanError, activation_bytes

    asr = model_spec("asr_ctc")
    register(ModelSpec(name="no_estimate", build=asr.build, tokenizer=asr.tokenizer, flops=asr.flops,
                       activation_values=None))
    cfg = recipe_config("asr_ddp", ["run.name=x"])
    OmegaConf.update(cfg, "model.name", "no_estimate")
    with pytest.raises(PlanError, match="model 'no_estimate' has no activation estimate"):
        activation_bytes(cfg, None, dp=1, tp=1, act_bytes=4)


def test_nothing_outside_the_specs_probes_a_model_or_matches_its_class():
    found = []
    for path in [*ROOT.glob("common/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("k8s/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and node.args:
                first = ast.unparse(node.args[0])
                if first in ("model", "self.model", "pl_module.model", "bare", "run.model"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} hasattr({first}, ...)")
            if isinstance(node, ast.Attribute) and node.attr == "__mro__":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} __mro__")
    assert not found, found


def test_a_stored_config_without_newer_settings_gets_the_values_its_model_was_trained_with():
    """Model code reads every setting directly (defaults live in the presets); a checkpoint or export
    written before a setting existed is filled in from the spec's legacy_settings, nothing else."""
    from common.models import with_legacy_settings

    old = OmegaConf.create({"model": {"name": "salm", "ctc_aux_weight": 0.3, "projector": {"stack_frames": 2}}})
    cfg = with_legacy_settings(old)
    assert cfg.model.ctc_aux_weight == 0.3  # present: kept
    assert (cfg.model.projector.ctc_compress, cfg.model.prompt_format, cfg.model.pad_to_multiple_of,
            cfg.model.encoder_conv_norm) == (False, "plain", 1, "auto")
    today = recipe_config("tts_ddp", ["run.name=x"])
    assert with_legacy_settings(today.copy()) == today  # a current config: nothing to fill
