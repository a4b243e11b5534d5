"""The memory planner (common.tools.plan): layouts offered, per-rank bytes, recommendation, CLI errors.

Its parameter/gradient/optimizer bytes are checked against real multi-process runs in
tests/distributed/test_loss_parity.py; here against a real DDP (whole-model) state on one process.
"""

import pytest
import torch

from common.recording import training_state_bytes
from common.run import compose
from common.tools.plan import GIB, PlanError, build_meta_model, main, plan, recommend, state_bytes


@pytest.fixture(scope="module")
def corpus_overrides(tiny_corpus):
    # The default vocabulary path (built from the training text), on the small test corpus.
    return [f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16"]


def _layout(result, dp, tp):
    return next(lay for lay in result["layouts"] if (lay["dp"], lay["tp"]) == (dp, tp))


def test_salm_layouts_on_one_node_of_four(corpus_overrides):
    result = plan("salm_tp_fsdp2", gpus_per_node=4, nodes=1, overrides=corpus_overrides)
    assert [(lay["dp"], lay["tp"]) for lay in result["layouts"]] == [(4, 1), (2, 2)]
    # The default backbone has 2 key/value heads: tp=4 cannot split them, and the planner says why.
    (skipped,) = result["skipped"]
    assert (skipped["dp"], skipped["tp"]) == (1, 4) and "num_key_value_heads (2)" in skipped["reason"]
    assert all(len(lay["per_rank"]) == 4 for lay in result["layouts"])
    assert result["recommended"] == "dp4 x tp1" and "FSDP2 alone fits" in result["recommendation"]


def test_tensor_parallel_stays_inside_a_node(corpus_overrides):
    heads = ["model.llm.num_attention_heads=8", "model.llm.num_key_value_heads=8"]
    result = plan("salm_tp_fsdp2", gpus_per_node=2, nodes=2, overrides=[*corpus_overrides, *heads])
    assert [(lay["dp"], lay["tp"]) for lay in result["layouts"]] == [(4, 1), (2, 2)]
    assert "span nodes" in next(s["reason"] for s in result["skipped"] if s["tp"] == 4)
    assert len(plan("salm_tp_fsdp2", gpus_per_node=4, nodes=1, overrides=[*corpus_overrides, *heads])["layouts"]) == 3


@pytest.mark.parametrize("recipe", ["asr_ddp", "tts_ddp"])
def test_ddp_recipes_hold_everything_on_every_rank(recipe, corpus_overrides):
    result = plan(recipe, gpus_per_node=4, nodes=1, overrides=corpus_overrides, precision="bf16-true")
    (lay,) = result["layouts"]
    assert (lay["strategy"], lay["dp"], lay["tp"], lay["buffer_bytes"]) == ("ddp", 4, 1, 0)
    assert lay["param_bytes"] == lay["grad_bytes"] == 2 * result["parameters"]
    assert all(r["param_bytes"] == lay["param_bytes"] for r in lay["per_rank"])
    assert lay["optimizer_state_bytes"] > 2 * lay["param_bytes"]  # exp_avg + exp_avg_sq + a step each
    assert lay["activation_bytes"] > 0 and result["recommended"] == "DDP x4"


def test_fsdp2_shards_parameters_gradients_and_optimizer_state_over_dp(corpus_overrides):
    result = plan("salm_fsdp2", gpus_per_node=4, nodes=1, overrides=corpus_overrides, precision="32-true")
    full = 4 * result["parameters"]
    dp4 = _layout(result, 4, 1)
    # FSDP2 partitions every parameter on dim 0: the shards add up to the whole model exactly.
    assert sum(r["param_bytes"] for r in dp4["per_rank"]) == full
    assert dp4["param_bytes"] == pytest.approx(full / 4, rel=0.02)
    assert dp4["optimizer_state_bytes"] == pytest.approx(2 * full / 4, rel=0.02)
    # TP x FSDP2 over the same 4 GPUs: more per rank, as the encoder and norms are replicated over tp.
    assert full / 4 < _layout(result, 2, 2)["param_bytes"] < full / 2


def test_precision_sets_bytes_per_value(corpus_overrides):
    bf16 = _layout(plan("salm_fsdp2", 2, overrides=corpus_overrides, precision="bf16-true"), 2, 1)
    fp32 = _layout(plan("salm_fsdp2", 2, overrides=corpus_overrides, precision="32-true"), 2, 1)
    assert fp32["param_bytes"] == 2 * bf16["param_bytes"]
    with pytest.raises(PlanError, match="'fp8'"):
        plan("salm_fsdp2", 2, overrides=corpus_overrides, precision="fp8")


def test_model_size_overrides_change_the_parameter_count(corpus_overrides):
    two = plan("salm_tp_fsdp2", 2, overrides=corpus_overrides)
    four = plan("salm_tp_fsdp2", 2, overrides=[*corpus_overrides, "model.llm.num_hidden_layers=4"])
    assert four["parameters"] > two["parameters"]
    assert _layout(four, 2, 1)["total_bytes"] > _layout(two, 2, 1)["total_bytes"]


def test_vocab_size_stands_for_the_backbones_real_vocabulary(corpus_overrides):
    small = plan("salm_tp_fsdp2", 2, overrides=corpus_overrides)
    qwen = plan("salm_tp_fsdp2", 2, overrides=corpus_overrides, vocab_size=151936)
    hidden = 128  # salm.yaml's backbone; untied embedding and LM head both grow
    assert qwen["parameters"] - small["parameters"] == 2 * hidden * (151936 - small["vocab_size"])
    with pytest.raises(PlanError, match="model.tokenizer.vocab_size"):
        plan("asr_ddp", 2, overrides=corpus_overrides, vocab_size=1000)


def test_frozen_parameters_have_no_gradients_or_optimizer_state(corpus_overrides):
    result = plan("salm_fsdp2", 2, overrides=[*corpus_overrides, "model.freeze=[encoder.*]"])
    lay = _layout(result, 2, 1)
    assert result["trainable_parameters"] < result["parameters"]
    assert lay["grad_bytes"] < lay["param_bytes"]


def test_recommendation_picks_the_smallest_tp_that_fits():
    lay = [{"name": f"dp{8 // t} x tp{t}", "strategy": "model_parallel", "dp": 8 // t, "tp": t,
            "total_bytes": int(tot * GIB), "fits": tot <= 40} for t, tot in ((1, 50), (2, 30), (4, 20))]
    assert recommend(lay, 40)[0] == "dp4 x tp2"
    for row in lay:
        row["fits"] = False
    best, text = recommend(lay, 10)
    assert best is None and "nothing fits in 10 GiB" in text and "dp2 x tp4" in text
    assert "activation_checkpointing" in text


def test_nothing_fits_a_tiny_gpu(corpus_overrides):
    result = plan("salm_tp_fsdp2", 4, overrides=corpus_overrides, gpu_memory_gib=1e-6)
    assert result["recommended"] is None and not any(lay["fits"] for lay in result["layouts"])


def test_cli_errors_exit_2_with_the_bad_value(capsys, corpus_overrides):
    assert main(["--recipe", "nope", "--gpus-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "salm_tp_fsdp2" in err and "asr_ddp" in err
    assert main(["--recipe", "asr_ddp", "--gpus-per-node", "2", *corpus_overrides, "model.encoder.bogus=3"]) == 2
    assert "bad override 'model.encoder.bogus=3'" in capsys.readouterr().err


def test_cli_prints_a_table_and_json(capsys, corpus_overrides):
    import json

    assert main(["--recipe", "salm_tp_fsdp2", "--gpus-per-node", "4", *corpus_overrides]) == 0
    out = capsys.readouterr().out
    assert "dp4 x tp1" in out and "dp2 x tp2" in out and "recommended: dp4 x tp1" in out
    assert main(["--recipe", "salm_tp_fsdp2", "--gpus-per-node", "4", "--json", *corpus_overrides]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"] == "dp4 x tp1"


def test_pretrained_llm_architecture_from_a_local_config_only(tmp_path, corpus_overrides):
    from transformers import Qwen3Config

    from common.data.corpus import WORDS
    from common.data.tokenizer import WordTokenizer

    WordTokenizer.build(WORDS, extra_words=["transcribe"]).save(tmp_path / "tok")
    Qwen3Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=1000, tie_word_embeddings=False).save_pretrained(tmp_path / "llm")
    result = plan("salm_fsdp2", 2, overrides=[f"model.pretrained_llm={tmp_path / 'llm'}"], tokenizer=tmp_path / "tok")
    default = plan("salm_fsdp2", 2, overrides=corpus_overrides)
    assert result["parameters"] != default["parameters"]
    with pytest.raises(PlanError, match="never downloads"):
        plan("salm_fsdp2", 2, overrides=["model.pretrained_llm=Someone/SomeModel"], tokenizer=tmp_path / "tok")


@pytest.mark.parametrize("recipe", ["asr_ddp", "tts_ddp", "salm_fsdp2"])
def test_ddp_prediction_matches_a_real_model_and_adamw_step(recipe, corpus_overrides):
    """Whole-model state (DDP, or one process): the prediction equals what a real fp32 model + AdamW holds."""
    from common.models import build_model

    cfg = compose(recipe, corpus_overrides)
    meta, tokenizer = build_meta_model(cfg)
    (predicted,) = state_bytes(meta, "ddp", 1, 1, param_bytes=4)
    model = build_model(compose(recipe, corpus_overrides), tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, foreach=True)
    opt.step()
    measured = training_state_bytes(model, [opt])
    assert {k: predicted[k] for k in measured} == measured


def test_auto_precision_is_the_gpu_default(corpus_overrides):
    """fp32 master weights and AdamW state with bf16 compute (activations, gathered FSDP2 units) by
    default; bf16-true halves the training state. DDP recipes: bf16 autocast."""
    auto = plan("salm_fsdp2", 2, overrides=corpus_overrides)
    bf16 = plan("salm_fsdp2", 2, overrides=corpus_overrides, precision="bf16-true")
    assert auto["precision"] == "32-true" and plan("asr_ddp", 2, overrides=corpus_overrides)["precision"] == "bf16-mixed"
    a, b = _layout(auto, 2, 1), _layout(bf16, 2, 1)
    for key in ("param_bytes", "grad_bytes"):
        assert a[key] == 2 * b[key]
    assert a["activation_bytes"] == b["activation_bytes"] and a["buffer_bytes"] == b["buffer_bytes"]
    # The policy gathers a bf16 copy of each unit even at dp=1.
    assert _layout(plan("salm_fsdp2", 1, overrides=corpus_overrides), 1, 1)["buffer_bytes"] > 0
