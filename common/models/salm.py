"""SALM: a speech-augmented language model (speech encoder -> projector -> causal LM).

The prompt ``<bos> <|audio|> transcribe`` holds one audio placeholder token; it is replaced by
the projected encoder frames, and the model is trained to continue with the transcript and
``<eos>``. Only those answer tokens carry loss.

* encoder: transformers' FastConformer (``ParakeetEncoder``), random-init from ``model.encoder``
  or loaded from ``model.pretrained_encoder``;
* projector: stacks ``stack_frames`` encoder frames (downsampling in time) and maps them to the
  LLM width with a 2-layer MLP;
* LLM: any transformers causal LM (Qwen3 by default), random-init from ``model.llm`` or loaded
  from ``model.pretrained_llm``.

This file never touches ``torch.distributed``: it declares its shardable parts in
``parallel_spec()`` and ``common.parallel`` applies TP/SP/FSDP2 to it from outside.

Usage::

    model = SALM(cfg.model, tokenizer)
    loss_sum, num_tokens = model(batch)          # summed CE over the answer tokens of this batch
    hyps = model.generate(batch["input_features"], batch["feature_mask"])
"""

from __future__ import annotations

import fnmatch
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models.encoder import build_encoder
from common.parallel.spec import ParallelHooks, ParallelSpec

log = logging.getLogger(__name__)
IGNORE = -100


class Projector(nn.Module):
    def __init__(self, encoder_dim: int, llm_dim: int, stack_frames: int):
        super().__init__()
        self.stack_frames = stack_frames
        self.mlp = nn.Sequential(
            nn.Linear(encoder_dim * stack_frames, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )

    def forward(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = frames.shape
        k = self.stack_frames
        # Frames past each utterance's end hold whatever the encoder computed for padding; zero
        # them, or the last stacked frame of an utterance would depend on what it was batched with.
        frames = frames * (torch.arange(t, device=frames.device)[None, :] < lens[:, None])[..., None]
        frames = F.pad(frames, (0, 0, 0, (-t) % k))
        stacked = frames.reshape(b, -1, d * k)
        return self.mlp(stacked), torch.div(lens + k - 1, k, rounding_mode="floor")


def build_llm(cfg, vocab_size: int) -> nn.Module:
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.get("pretrained_llm"):
        llm = AutoModelForCausalLM.from_pretrained(cfg.pretrained_llm, trust_remote_code=False)
        llm.resize_token_embeddings(vocab_size, pad_to_multiple_of=8)
    else:
        llm_cfg = OmegaConf.to_container(cfg.llm, resolve=True) if OmegaConf.is_config(cfg.llm) else dict(cfg.llm)
        model_type = llm_cfg.pop("model_type", "qwen3")
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=vocab_size, **llm_cfg))
    if cfg.get("lora"):
        from peft import LoraConfig, get_peft_model

        # Freezes the LLM's own weights; the encoder and projector stay trainable.
        lora = OmegaConf.to_container(cfg.lora, resolve=True) if OmegaConf.is_config(cfg.lora) else dict(cfg.lora)
        llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **lora))
    return llm


class SALM(nn.Module):
    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.encoder = build_encoder(cfg)
        self.llm = build_llm(cfg, tokenizer.vocab_size)
        self.projector = Projector(
            self.encoder.config.hidden_size, self.llm.config.hidden_size, cfg.projector.stack_frames
        )
        # Optional auxiliary CTC on the encoder (hybrid CTC/attention): from random init it gives the
        # encoder a direct, alignment-free signal long before the LLM learns to attend to audio.
        self.ctc_weight = float(cfg.get("ctc_aux_weight", 0.0))
        self.ctc_head = nn.Linear(self.encoder.config.hidden_size, tokenizer.vocab_size) if self.ctc_weight else None
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.audio_id = tokenizer.audio_id
        self.prompt_ids = tokenizer.encode(cfg.prompt)
        self.max_new_tokens = cfg.max_new_tokens
        # Few distinct sequence lengths: DTensor caches its sharding decisions per shape, and
        # GPU kernels (and torch.compile) like fixed shapes too.
        self.pad_to_multiple_of = int(cfg.get("pad_to_multiple_of", 1))
        self.parallel_hooks = ParallelHooks()
        for pattern in cfg.get("freeze") or []:
            matched = [p for n, p in self.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"model.freeze pattern {pattern!r} matches no parameter name")
            for param in matched:
                param.requires_grad_(False)

    # --- what may be sharded (common.parallel decides how) -------------------------------------
    def parallel_spec(self) -> ParallelSpec:
        backbone = self.llm.get_decoder()
        return ParallelSpec(
            block_lists=[self.encoder.layers, backbone.layers],
            extra_fsdp_units=[
                [self.encoder.subsampling, self.projector],
                backbone.embed_tokens,
                [backbone.norm, self.llm.lm_head],
            ],
            tp_backbone=backbone,
            lm_head=self.llm.lm_head,
        )

    # --- model ---------------------------------------------------------------------------------
    def encode_audio(self, features: torch.Tensor, feature_mask: torch.Tensor, targets=None):
        out = self.encoder(input_features=features, attention_mask=feature_mask.long())
        lens = out.attention_mask.sum(-1)
        audio, audio_lens = self.projector(out.last_hidden_state, lens)
        if targets is None or self.ctc_head is None:
            return audio, audio_lens, None
        # CTC over the transcript words (no <eos>); the pad id serves as the blank.
        words = [t[:-1] for t in targets]
        log_probs = self.ctc_head(out.last_hidden_state).float().log_softmax(-1).transpose(0, 1)
        flat = torch.tensor([w for ws in words for w in ws], dtype=torch.long, device=features.device)
        ctc = F.ctc_loss(log_probs, flat, lens, torch.tensor([len(w) for w in words], device=features.device),
                         blank=self.pad_id, reduction="sum", zero_infinity=True)
        return audio, audio_lens, ctc

    def _embed(self, audio, audio_lens, token_seqs: list[list[int]]):
        """Embeddings of ``<bos> audio-frames prompt tokens...`` per sample, right-padded."""
        prefix = [self.bos_id]
        lens = [len(prefix) + int(n) + len(self.prompt_ids) + len(t) for n, t in zip(audio_lens, token_seqs)]
        m = math.lcm(self.parallel_hooks.seq_len_multiple, self.pad_to_multiple_of)
        seq_len = math.ceil(max(lens) / m) * m
        ids = torch.full((len(token_seqs), seq_len), self.pad_id, dtype=torch.long, device=audio.device)
        is_audio = torch.zeros_like(ids, dtype=torch.bool)
        for i, (n, toks) in enumerate(zip(audio_lens.tolist(), token_seqs)):
            row = prefix + [self.audio_id] * n + self.prompt_ids + list(toks)
            ids[i, : len(row)] = torch.tensor(row, device=ids.device)
            is_audio[i, len(prefix) : len(prefix) + n] = True
        embeds = self.llm.get_input_embeddings()(ids)
        valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lens[:, None]
        embeds = embeds.masked_scatter(is_audio[..., None], audio[valid].to(embeds.dtype))
        return embeds, ids, lens

    def _logits(self, embeds):
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.llm.lm_head(hidden)

    def forward(self, batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over this batch's answer tokens, and their number."""
        targets = [t[:n].tolist() for t, n in zip(batch["target_ids"], batch["target_lens"])]
        audio, audio_lens, ctc_sum = self.encode_audio(batch["input_features"], batch["feature_mask"], targets)
        embeds, ids, _ = self._embed(audio, audio_lens, targets)
        labels = torch.full_like(ids, IGNORE)
        for i, (n, t) in enumerate(zip(audio_lens.tolist(), targets)):
            start = 1 + n + len(self.prompt_ids)  # first answer token; predicted from position start - 1
            labels[i, start - 1 : start - 1 + len(t)] = torch.tensor(t, device=ids.device)
        logits = self._logits(embeds)
        with self.parallel_hooks.loss_context():
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
        loss_sum = self.parallel_hooks.full_tensor(loss_sum)  # a replicated DTensor under loss parallel
        if ctc_sum is not None:
            loss_sum = loss_sum + self.ctc_weight * ctc_sum
        return loss_sum, int(sum(len(t) for t in targets))

    @torch.no_grad()
    def generate(self, features, feature_mask, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding.

        Always runs exactly ``max_new_tokens`` steps (no early stop): under FSDP/TP every rank must
        run the same number of forward passes, or the collectives inside them would deadlock.
        """
        audio, audio_lens, _ = self.encode_audio(features, feature_mask)
        out: list[list[int]] = [[] for _ in range(features.shape[0])]
        for _ in range(max_new_tokens or self.max_new_tokens):
            embeds, _, lens = self._embed(audio, audio_lens, out)
            logits = self.parallel_hooks.full_tensor(self._logits(embeds))
            last = torch.tensor(lens, device=logits.device) - 1
            nxt = logits[torch.arange(len(out), device=logits.device), last].argmax(-1).tolist()
            for seq, tok in zip(out, nxt):
                seq.append(tok)
        return [seq[: seq.index(self.eos_id)] if self.eos_id in seq else seq for seq in out]
