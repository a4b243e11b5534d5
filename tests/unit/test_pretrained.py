"""model.pretrained_llm / model.pretrained_encoder: local directories (as saved by save_pretrained) load."""

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    ParakeetEncoder,
    ParakeetEncoderConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from common.data.tokenizer import AUDIO_TOKEN, HFTokenizer, load_tokenizer
from common.models.salm import SALM


def _save_tiny_llm(path):
    words = ["<pad>", "<s>", "</s>", "<unk>", "alpha", "bravo", "transcribe"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    hf_tok.save_pretrained(path)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       intermediate_size=64, tie_word_embeddings=False))
    llm.save_pretrained(path)
    return llm


def test_pretrained_llm_and_encoder_from_local_paths(tmp_path, salm_cfg):
    llm = _save_tiny_llm(tmp_path / "llm")
    ParakeetEncoder(ParakeetEncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, num_mel_bins=64, subsampling_conv_channels=8,
                                          subsampling_factor=4)).save_pretrained(tmp_path / "enc")
    cfg = salm_cfg.model.copy()
    cfg.pretrained_llm, cfg.pretrained_encoder = str(tmp_path / "llm"), str(tmp_path / "enc")
    tok = HFTokenizer.from_pretrained(cfg.pretrained_llm)
    assert tok.decode(tok.encode("alpha bravo")) == "alpha bravo"
    assert tok.tok.convert_ids_to_tokens(tok.audio_id) == AUDIO_TOKEN  # placeholder added as a special token

    model = SALM(cfg, tok)
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] >= tok.vocab_size and emb.shape[0] % 8 == 0  # resized for the audio token, TP-friendly
    assert torch.equal(emb[:7], llm.get_input_embeddings().weight)  # real weights, not a fresh init
    assert model.encoder.config.hidden_size == 32

    features = torch.randn(2, 40, 64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    batch = {"input_features": features, "feature_mask": mask, "target_ids": torch.tensor([[4, 2], [5, 2]]),
             "target_lens": torch.tensor([2, 2])}
    loss_sum, n, _ = model(batch)
    assert n == 4 and torch.isfinite(loss_sum)

    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("bravo") == tok.encode("bravo")


def test_lora_trains_adapters_encoder_and_projector_only(salm_cfg):
    from common.data.tokenizer import WordTokenizer

    tok = WordTokenizer.build(["alpha bravo"], extra_words=["transcribe"])
    cfg = salm_cfg.model.copy()
    cfg.lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = SALM(cfg, tok)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("encoder.") for n in trainable)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)
    batch = {"input_features": torch.randn(2, 40, 64), "feature_mask": torch.ones(2, 40, dtype=torch.bool),
             "target_ids": torch.tensor([[5, 2], [6, 2]]), "target_lens": torch.tensor([2, 2])}
    loss_sum = model(batch).loss_sum
    loss_sum.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)
    assert model.parallel_spec().tp_backbone is model.llm.get_decoder()
