"""CTC speech recognizer: transformers' ``ParakeetForCTC`` (FastConformer encoder + CTC head).

The encoder comes from :func:`common.models.encoder.build_encoder` (random init from
``model.encoder``, sized by config from a few hundred thousand parameters up to the 100M class,
or ``model.pretrained_encoder``); the CTC head maps each encoder frame to the tokenizer's
vocabulary, whose id 0 is the blank.

Usage::

    model = CTCASR(cfg.model, BPETokenizer.build(texts, vocab_size=64))
    loss_sum, num_tokens, _ = model(batch)  # summed CTC loss of this batch, and its target tokens
    hyps = model.generate(batch["input_features"], batch["feature_mask"])   # greedy CTC decoding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.flops import ModelFlops, fastconformer_forward, trainable_share
from common.models.encoder import build_encoder, encoder_activation_values
from common.models.spec import LossSums, ModelSpec, bpe_tokenizer, register
from common.parallel.spec import ParallelHooks


def ctc_greedy_decode(log_probs: torch.Tensor, lens: torch.Tensor, blank_id: int) -> list[list[int]]:
    """Best path per utterance: argmax per frame, repeated tokens merged, then blanks removed.

    >>> ctc_greedy_decode(torch.eye(3)[[1, 1, 0, 1, 2, 2, 0]].log()[None], torch.tensor([7]), 0)
    [[1, 1, 2]]
    """
    best = log_probs.argmax(-1)
    out = []
    for path, n in zip(best.tolist(), lens.tolist()):
        path = path[:n]
        out.append([t for i, t in enumerate(path) if t != blank_id and (i == 0 or t != path[i - 1])])
    return out


class CTCASR(nn.Module):
    def __init__(self, cfg, tokenizer):
        super().__init__()
        from transformers import ParakeetCTCConfig, ParakeetForCTC

        self.blank_id = tokenizer.blank_id
        encoder = build_encoder(cfg)
        config = ParakeetCTCConfig(
            encoder_config=encoder.config.to_dict(), vocab_size=tokenizer.vocab_size, pad_token_id=self.blank_id
        )
        self.ctc = ParakeetForCTC(config)
        # ParakeetForCTC builds its own encoder from the config; use ours (initialisation,
        # conv norm and pretrained weights as the SALM recipes have them).
        self.ctc.encoder = encoder
        self.ctc.ctc_head.reset_parameters()  # a 1x1 Conv1d: fan-in init, as for the encoder
        self.parallel_hooks = ParallelHooks()  # DDP replicates the model whole; no hooks needed
        # Intermediate CTC (Lee & Watanabe, 2021): the same head also reads the output of an inner
        # layer, and its CTC loss is mixed in. The layers below it learn to align as a shallow model
        # does, which is what lets a deeper encoder leave CTC's all-blank start (recipes/asr_ddp/README.md).
        inter = cfg.get("inter_ctc") or {}
        self.inter_layer, self.inter_weight = inter.get("layer"), float(inter.get("weight", 0.0))
        n_layers = len(encoder.layers)
        if self.inter_layer is not None and not (isinstance(self.inter_layer, int) and 1 <= self.inter_layer < n_layers
                                                 and 0 < self.inter_weight < 1):
            raise ValueError(f"model.inter_ctc: layer must be an integer in [1, {n_layers - 1}] and weight in (0, 1), "
                             f"got {dict(inter)}")

    def encode(self, features: torch.Tensor, feature_mask: torch.Tensor, inner: bool = False):
        """(log-probs (B, T, V), lengths); with ``inner``, also the intermediate-CTC layer's log-probs."""
        out = self.ctc.encoder(input_features=features, attention_mask=feature_mask.long(),
                               output_hidden_states=inner)
        log_probs = self.ctc.ctc_head(out.last_hidden_state).float().log_softmax(-1)
        lens = out.attention_mask.sum(-1)
        if not inner:
            return log_probs, lens
        # hidden_states[k]: the output of block k (0 is the subsampled input)
        return log_probs, lens, self.ctc.ctc_head(out.hidden_states[self.inter_layer]).float().log_softmax(-1)

    def forward(self, batch) -> LossSums:
        """Summed CTC loss over this batch's utterances, and the number of target tokens."""
        inner = self.inter_layer is not None
        log_probs, lens, *inner_log_probs = self.encode(batch["input_features"], batch["feature_mask"], inner=inner)
        target_lens = batch["target_lens"]
        # Padded (B, S) targets: CTC reads each row up to its length (no per-utterance slicing).
        loss_sum = F.ctc_loss(log_probs.transpose(0, 1), batch["target_ids"], lens, target_lens,
                              blank=self.blank_id, reduction="sum", zero_infinity=True)
        if inner:
            inner_loss = F.ctc_loss(inner_log_probs[0].transpose(0, 1), batch["target_ids"], lens, target_lens,
                                    blank=self.blank_id, reduction="sum", zero_infinity=True)
            loss_sum = (1 - self.inter_weight) * loss_sum + self.inter_weight * inner_loss
        num_tokens = batch["num_target_tokens"] if "num_target_tokens" in batch else int(target_lens.sum())
        return LossSums(loss_sum, num_tokens)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, feature_mask: torch.Tensor) -> list[list[int]]:
        log_probs, lens = self.encode(features, feature_mask)
        return ctc_greedy_decode(log_probs, lens, self.blank_id)


def ctc_flops(model: CTCASR) -> ModelFlops:
    enc, vocab = model.ctc.encoder.config, model.ctc.config.vocab_size

    def parts_of(frames: int, tokens: int):
        encoder, t = fastconformer_forward(enc, frames)
        encoder.weights += 2 * t * enc.hidden_size * vocab  # the CTC head
        return [encoder]

    return ModelFlops(parts_of, [trainable_share([model.ctc])])


def ctc_activation_values(cfg, model: CTCASR, batch) -> float:
    return encoder_activation_values(model.ctc.encoder.config, batch, head_vocab=model.ctc.config.vocab_size)[0]


SPEC = register(ModelSpec(
    name="asr_ctc", build=lambda cfg, tokenizer: CTCASR(cfg.model, tokenizer), tokenizer=bpe_tokenizer,
    flops=ctc_flops, activation_values=ctc_activation_values, transcribes=True,
    ctc_log_probs=lambda model, features, mask: model.encode(features, mask),
    speech_encoder=lambda model: model.ctc.encoder, legacy_settings={"model.encoder_conv_norm": "auto"},
))
