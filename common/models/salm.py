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
    loss_sum, num_tokens, _ = model(batch)       # summed CE over the answer tokens of this batch
    hyps = model.generate(batch["input_features"], batch["feature_mask"])
"""

from __future__ import annotations

import fnmatch
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.flops import ModelFlops, Part, decoder_lm_forward, fastconformer_forward, trainable_share
from common.models.encoder import (
    build_encoder,
    check_exported_features,
    encoder_activation_values,
    exported_ctc_head,
    exported_model_config,
)
from common.models.spec import LossSums, ModelSpec, register
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
        self.pieces = None  # see add_piece_embeddings

    def add_piece_embeddings(self, table: torch.Tensor) -> None:
        """Also map each segment's mean CTC posterior over the recognizer's pieces through ``table``
        (pieces x LLM width), the LLM's own embedding of each piece's text. The MLP's last layer starts
        at zero, so at step 0 a segment recognized as ``▁the`` reaches the LLM as its token `` the``:
        the pretrained LLM reads the recognizer's spelling from the first step, and training adds what
        the hidden states know beyond it."""
        self.pieces = nn.Linear(table.shape[0], table.shape[1], bias=False)
        with torch.no_grad():
            self.pieces.weight.copy_(table.t())
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, frames: torch.Tensor, lens: torch.Tensor, posteriors=None) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_lens = self._stacked(frames, lens)
        if self.pieces is not None:
            out = out + self.pieces(posteriors.to(out.dtype))
        return out, out_lens

    def _stacked(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = frames.shape
        k = self.stack_frames
        # Frames past each utterance's end hold whatever the encoder computed for padding; zero
        # them, or the last stacked frame of an utterance would depend on what it was batched with.
        frames = frames * (torch.arange(t, device=frames.device)[None, :] < lens[:, None])[..., None]
        frames = F.pad(frames, (0, 0, 0, (-t) % k))
        stacked = frames.reshape(b, -1, d * k)
        return self.mlp(stacked), torch.div(lens + k - 1, k, rounding_mode="floor")


def ctc_compress(frames: torch.Tensor, lens: torch.Tensor, labels: torch.Tensor, blank: int):
    """CTC compression (Gaido et al. 2021; Speech-LLaMA, Wu et al. 2023): the mean of each run of
    frames with the same non-blank CTC label, blank frames dropped; batched, no per-utterance loop.

    ``frames`` (B, T, D), ``lens`` (B,) valid frames per row, ``labels`` (B, T) the CTC head's argmax.
    Returns ``(segments (B, S, D), segment counts (B,))``, S the most segments of a row (>= 1): one
    position per spoken unit, in order. Reading an utterance in order is then what the LLM's
    positions already do; over 40 ms frames it is a search. The segment count is data-dependent,
    so this costs one host sync per batch.

        labels [a a _ b b _ _ a] -> segments [mean(f0, f1), mean(f3, f4), f7]
    """
    b, t, d = frames.shape
    keep = (labels != blank) & (torch.arange(t, device=frames.device)[None, :] < lens[:, None])
    prev_label = F.pad(labels, (1, 0), value=-1)[:, :-1]
    prev_keep = F.pad(keep, (1, 0), value=False)[:, :-1]
    start = keep & ~(prev_keep & (prev_label == labels))  # a kept frame that opens a new run
    index = (start.long().cumsum(1) - 1).clamp(min=0)  # its run's index, per row
    counts = start.sum(1)
    width = max(int(counts.max()), 1)
    # Sums and counts in fp32: under bf16 autocast the encoder's frames are bf16, which holds whole
    # numbers exactly only up to 256 (a long run's count and sum would round), and CUDA's scatter_add
    # rounds each atomic add to the tensor's dtype.
    weight = keep.float()
    sums = frames.new_zeros(b, width, d, dtype=torch.float32).scatter_add(
        1, index[..., None].expand(-1, -1, d), frames.float() * weight[..., None])
    sizes = weight.new_zeros(b, width).scatter_add(1, index, weight)
    return (sums / sizes.clamp(min=1)[..., None]).to(frames.dtype), counts


# Rows of a pretrained LLM's embedding table after the tokenizer outgrew it (the audio placeholder):
# a multiple of 192 = 64 x 3, so every tensor-parallel size that divides the heads of common
# backbones (1, 2, 3, 4, 6, 8, 12, ...: SmolLM2 has 3 key/value heads) also divides the vocabulary.
VOCAB_MULTIPLE = 192


def embedding_rows(config_vocab: int, tokenizer_vocab: int) -> int:
    """The LLM's vocabulary rows: its own if the tokenizer fits, else the tokenizer's rounded up."""
    if config_vocab >= tokenizer_vocab:
        return config_vocab
    return math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def load_pretrained_llm(name_or_path: str) -> nn.Module:
    """A Hugging Face causal LM from a local directory, a hub id, or a GGUF file (dequantized by
    transformers' GGUF loader; needs the ``gguf`` package). Never runs code shipped with weights."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_llm {name_or_path}: no such GGUF file")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False,
                                                    dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False, dtype=torch.float32)


def pretrained_llm_config(name_or_path: str):
    """The architecture (transformers config) of a pretrained causal LM, without its weights."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)


LLM_INIT = ("pretrained", "random")


def build_llm(cfg, vocab_size: int) -> nn.Module:
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    init = cfg.get("llm_init", "pretrained")
    if init not in LLM_INIT:
        raise ValueError(f"model.llm_init must be one of {', '.join(LLM_INIT)}, got {init!r}")
    if cfg.get("pretrained_llm"):
        if init == "random":  # the ablation: the same architecture and tokenizer, none of the pretraining
            config = pretrained_llm_config(cfg.pretrained_llm)
            config.dtype = torch.float32
            llm = AutoModelForCausalLM.from_config(config)
        else:
            llm = load_pretrained_llm(cfg.pretrained_llm).train()  # from_pretrained returns eval mode
        rows = embedding_rows(llm.get_input_embeddings().weight.shape[0], vocab_size)
        if rows != llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(rows, mean_resizing=False)
    else:
        llm_cfg = OmegaConf.to_container(cfg.llm, resolve=True) if OmegaConf.is_config(cfg.llm) else dict(cfg.llm)
        model_type = llm_cfg.pop("model_type", "qwen3")
        # An exported model's config carries the (possibly grown) vocabulary of its backbone.
        rows = embedding_rows(llm_cfg.pop("vocab_size"), vocab_size) if "vocab_size" in llm_cfg else vocab_size
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=rows, **llm_cfg))
    if cfg.get("lora"):
        from peft import LoraConfig, get_peft_model

        # Freezes the LLM's own weights; the encoder and projector stay trainable.
        lora = OmegaConf.to_container(cfg.lora, resolve=True) if OmegaConf.is_config(cfg.lora) else dict(cfg.lora)
        llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **lora))
    return llm


def ties_embeddings(llm: nn.Module) -> bool:
    """Whether the LM head shares its weight with the input embeddings (Qwen3-0.6B/1.7B, SmolLM2)."""
    head = llm.get_output_embeddings()
    return head is not None and head.weight is llm.get_input_embeddings().weight


def prompt_ids(tokenizer, prompt: str, prompt_format: str = "plain") -> tuple[list[int], list[int]]:
    """(ids before the audio, ids after it). ``plain``: ``<bos>`` (if the tokenizer has one), then
    the audio, then ``prompt``. ``chat``: the LLM's own chat template around a user turn
    ``"<prompt> <|audio|>"`` with the assistant's turn opened (the answer ends with ``<eos>``)."""
    if prompt_format == "plain":
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []), tokenizer.encode(prompt)
    if prompt_format != "chat":
        raise ValueError(f"model.prompt_format must be plain or chat, got {prompt_format!r}")
    if getattr(tokenizer, "shapes_only", False):  # planner / parameter counts: a chat turn's typical framing
        return [tokenizer.unk_id] * 8, tokenizer.encode(prompt) + [tokenizer.unk_id] * 4
    template = getattr(getattr(tokenizer, "tok", None), "chat_template", None)
    if not template:
        raise ValueError("model.prompt_format=chat needs a tokenizer with a chat template (model.pretrained_llm "
                         "of an instruct/chat model); this one has none: use model.prompt_format=plain")
    from common.data.tokenizer import AUDIO_TOKEN

    ids = tokenizer.tok.apply_chat_template([{"role": "user", "content": f"{prompt} {AUDIO_TOKEN}"}],
                                            add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if ids.count(tokenizer.audio_id) != 1:
        raise ValueError(f"the chat template of {type(tokenizer.tok).__name__} did not keep exactly one "
                         f"{AUDIO_TOKEN} placeholder (found {ids.count(tokenizer.audio_id)})")
    at = ids.index(tokenizer.audio_id)
    return ids[:at], ids[at + 1:]


def ctc_head_of(cfg, tokenizer, hidden: int, ctc_weight: float, ctc_compress: bool) -> tuple[nn.Module | None, int]:
    """(CTC head, its blank id): trained with the auxiliary CTC loss over the LLM's tokens; or,
    with no auxiliary loss, the head of the recognizer the encoder was exported from (its own
    vocabulary; ``model.ctc_head_vocab`` records its size in an export of this model), which
    only picks the segments of CTC compression and stays frozen: no loss reaches it."""
    if ctc_weight:
        return nn.Linear(hidden, tokenizer.vocab_size), tokenizer.pad_id
    if not ctc_compress:
        return None, tokenizer.pad_id
    if cfg.get("pretrained_encoder"):
        found = exported_ctc_head(cfg.pretrained_encoder)
        head, blank = found if found else (None, tokenizer.pad_id)
    elif cfg.get("ctc_head_vocab"):  # an export of this model: the weights are in its checkpoint
        head, blank = nn.Linear(hidden, int(cfg.ctc_head_vocab)), 0
    else:
        return None, tokenizer.pad_id
    if head is not None:
        head.requires_grad_(False)
    return head, blank

def piece_table(cfg, tokenizer, llm, num_pieces: int, blank: int) -> torch.Tensor:
    """(recognizer pieces, LLM width): each piece's text (``▁`` a space) as the LLM embeds it, the
    mean over its LLM tokens; zero for the blank and specials. Zeros where the recognizer's
    tokenizer is not at hand (an export of this model: its checkpoint holds the trained table)."""
    table = torch.zeros(num_pieces, llm.config.hidden_size)
    source = cfg.get("pretrained_encoder")
    if not source:
        return table
    from common.data.tokenizer import load_tokenizer

    embed = llm.get_input_embeddings().weight.detach()
    for i, piece in enumerate(load_tokenizer(source).pieces()):
        ids = [] if i == blank or piece.startswith("<") else tokenizer.encode(piece.replace("\u2581", " "))
        if ids:
            table[i] = embed[ids].float().mean(0)
    return table


def greedy_decode(llm, hooks: ParallelHooks, embeds, offset, steps: int, pad_id: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding with the LLM's KV cache: the prefix once, then one position per new token.

    Prefixes are left-padded by ``offset`` (position ids and the attention mask skip the padding),
    so every row's next token sits in the same column. Always runs exactly ``steps`` steps (no
    early stop): under FSDP/TP every rank must run the same number of forward passes, or the
    collectives inside them would deadlock. Under sequence parallelism a step feeds
    ``tp`` positions (the new token + padding; sequence shards must be equal) and the cache is
    cropped back to the real token.
    """
    from transformers import DynamicCache

    b, width, dev = embeds.shape[0], embeds.shape[1], embeds.device
    attention = (torch.arange(width, device=dev)[None, :] >= offset[:, None]).long()
    positions = (torch.arange(width, device=dev)[None, :] - offset[:, None]).clamp(min=0)
    decoder, cache = llm.get_decoder(), DynamicCache(config=llm.config)
    hidden = decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                     past_key_values=cache, use_cache=True).last_hidden_state
    logits = hooks.full_tensor(llm.lm_head(hidden))
    tokens = [logits[:, -1].argmax(-1)]
    chunk = hooks.seq_len_multiple
    for _ in range(steps - 1):
        step_ids = torch.full((b, chunk), pad_id, dtype=torch.long, device=dev)
        step_ids[:, 0] = tokens[-1]
        past = attention.shape[1]
        attention = torch.cat([attention, torch.ones(b, chunk, dtype=torch.long, device=dev)], dim=1)
        positions = positions[:, -1:] + 1 + torch.arange(chunk, device=dev)[None, :]
        hidden = decoder(inputs_embeds=llm.get_input_embeddings()(step_ids), attention_mask=attention,
                         position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        logits = hooks.full_tensor(llm.lm_head(hidden))
        tokens.append(logits[:, 0].argmax(-1))
        if chunk > 1:  # keep only the real token's keys and values
            cache.crop(-(chunk - 1))  # negative: tokens to drop (transformers 4.x and 5.x alike)
            attention, positions = attention[:, : past + 1], positions[:, :1]
    out = torch.stack(tokens, dim=1).tolist()  # one copy to the host at the end
    return [seq[: seq.index(eos_id)] if eos_id in seq else seq for seq in out]


def lay_out(embed, audio, audio_lens, answer, answer_lens, width: int, head_ids: list[int], prompt_ids: list[int],
            pad_id: int, offset=None):
    """Embeddings and token ids of ``head audio-frames prompt answer`` per row, in ``width``
    columns, all rows at once (no per-utterance loop): row ``i`` starts at column ``offset[i]``
    (0: right-padded for training; left-padded prefixes for cached generation).

    Returns ``(embeds (B, width, D), ids (B, width), in_answer (B, width) bool)``.
    """
    b, dev = audio.shape[0], audio.device
    pos = torch.arange(width, device=dev)[None, :] - (0 if offset is None else offset[:, None])  # in-row position
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
    num_head, num_prompt = len(head_ids), len(prompt_ids)
    for fixed, rel in ((head_ids, pos), (prompt_ids, pos - num_head - audio_lens[:, None])):
        if fixed:
            table = torch.tensor(fixed, device=dev)
            ids = torch.where((rel >= 0) & (rel < len(fixed)), table[rel.clamp(0, len(fixed) - 1)], ids)
    rel = pos - num_head - audio_lens[:, None] - num_prompt
    in_answer = (rel >= 0) & (rel < answer_lens[:, None])
    if answer.shape[1]:
        ids = torch.where(in_answer, answer.gather(1, rel.clamp(0, answer.shape[1] - 1)), ids)
    embeds = embed(ids)
    # Audio frame j of row i goes to in-row position num_head + j: one gather, one select.
    is_audio = (pos >= num_head) & (pos < num_head + audio_lens[:, None])
    frame = (pos - num_head).clamp(0, audio.shape[1] - 1).expand(b, -1)  # gather needs the batch dim spelled out
    frames = audio.gather(1, frame[..., None].expand(-1, -1, audio.shape[-1]))
    embeds = torch.where(is_audio[..., None], frames.to(embeds.dtype), embeds)
    return embeds, ids, in_answer


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
        self.ctc_weight = float(cfg.ctc_aux_weight)
        # CTC compression of the audio before the projector (see ctc_compress); the CTC head picks the runs.
        self.ctc_compress = bool(cfg.projector.ctc_compress)
        self.ctc_head, self.ctc_blank = ctc_head_of(cfg, tokenizer, self.encoder.config.hidden_size,
                                                    self.ctc_weight, self.ctc_compress)
        if self.ctc_compress and self.ctc_head is None:
            raise ValueError("model.projector.ctc_compress needs a CTC head: model.ctc_aux_weight > 0, or a "
                             "model.pretrained_encoder exported from a CTC recognizer (make export of an asr_ddp "
                             "run); or set model.projector.ctc_compress=false")
        if cfg.projector.get("piece_embeddings"):
            if not (self.ctc_compress and self.ctc_head is not None and not self.ctc_weight):
                raise ValueError("model.projector.piece_embeddings needs the CTC head of a recognizer (a make export "
                                 "in model.pretrained_encoder) and model.projector.ctc_compress=true")
            self.projector.add_piece_embeddings(piece_table(cfg, tokenizer, self.llm, self.ctc_head.out_features,
                                                            self.ctc_blank))
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.audio_id = tokenizer.audio_id
        # The token ids before and after the audio frames (the answer follows them).
        self.head_ids, self.prompt_ids = prompt_ids(tokenizer, cfg.prompt, cfg.prompt_format)
        self.max_new_tokens = cfg.max_new_tokens
        # Few distinct sequence lengths: DTensor caches its sharding decisions per shape, and
        # GPU kernels (and torch.compile) like fixed shapes too.
        self.pad_to_multiple_of = int(cfg.pad_to_multiple_of)
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
        tied = ties_embeddings(self.llm)
        # A tied embedding is one parameter used first and last: one FSDP unit must own it, and
        # it stays gathered through the forward (torchtitan keeps tied weights in one unit too).
        ends = [[backbone.embed_tokens, backbone.norm, self.llm.lm_head]] if tied else [
            backbone.embed_tokens, [backbone.norm, self.llm.lm_head]]
        return ParallelSpec(
            block_lists=[self.encoder.layers, backbone.layers],
            # With CTC compression the CTC head runs in generate() too, outside the root's forward
            # (where FSDP2 gathers root parameters): it joins the projector's unit then.
            extra_fsdp_units=[[self.encoder.subsampling, self.projector,
                               *([self.ctc_head] if self.ctc_compress else [])], *ends],
            tp_backbone=backbone,
            lm_head=self.llm.lm_head,
            tied_lm_head=tied,
        )

    # --- model ---------------------------------------------------------------------------------
    def encode_audio(self, features: torch.Tensor, feature_mask: torch.Tensor, targets=None, target_lens=None):
        out = self.encoder(input_features=features, attention_mask=feature_mask.long())
        lens = out.attention_mask.sum(-1)
        hidden = out.last_hidden_state
        train_ctc = targets is not None and self.ctc_weight > 0
        logits = self.ctc_head(hidden) if train_ctc or self.ctc_compress else None
        if self.ctc_compress and self.projector.pieces is not None:
            # Posteriors ride along with the hidden states: one mean of each per segment.
            posteriors = logits.detach().float().softmax(-1).to(hidden.dtype)
            segments, counts = ctc_compress(torch.cat([hidden, posteriors], -1), lens, logits.detach().argmax(-1),
                                            self.ctc_blank)
            h = hidden.shape[-1]
            audio, audio_lens = self.projector(segments[..., :h], counts, segments[..., h:])
        elif self.ctc_compress:
            audio, audio_lens = self.projector(*ctc_compress(hidden, lens, logits.detach().argmax(-1), self.ctc_blank))
        else:
            audio, audio_lens = self.projector(hidden, lens)
        if not train_ctc:
            return audio, audio_lens, None
        # CTC over the transcript words (the padded targets minus their <eos>); the pad id is the blank.
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        ctc = F.ctc_loss(log_probs, targets, lens, target_lens - 1, blank=self.pad_id, reduction="sum",
                         zero_infinity=True)
        return audio, audio_lens, ctc

    def _sequence(self, audio, audio_lens, answer, answer_lens, width: int, offset=None):
        return lay_out(self.llm.get_input_embeddings(), audio, audio_lens, answer, answer_lens, width, self.head_ids,
                       self.prompt_ids, self.pad_id, offset)

    def _padded_width(self, longest: int) -> int:
        m = math.lcm(self.parallel_hooks.seq_len_multiple, self.pad_to_multiple_of)
        return math.ceil(longest / m) * m

    def _logits(self, embeds):
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.llm.lm_head(hidden)

    def forward(self, batch) -> LossSums:
        """Summed cross-entropy over this batch's answer tokens, and their number."""
        targets, target_lens = batch["target_ids"], batch["target_lens"]
        audio, audio_lens, ctc_sum = self.encode_audio(batch["input_features"], batch["feature_mask"], targets,
                                                       target_lens)
        # The padded length from tensor shapes (host-side numbers): no device sync in the step.
        width = self._padded_width(len(self.head_ids) + audio.shape[1] + len(self.prompt_ids) + targets.shape[1])
        embeds, ids, in_answer = self._sequence(audio, audio_lens, targets, target_lens, width)
        # Position j predicts token j + 1: labels are the answer tokens, shifted left by one.
        labels = torch.where(in_answer[:, 1:], ids[:, 1:], IGNORE)
        labels = F.pad(labels, (0, 1), value=IGNORE)
        logits = self._logits(embeds)
        with self.parallel_hooks.loss_context():
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
        loss_sum = self.parallel_hooks.full_tensor(loss_sum)  # a replicated DTensor under loss parallel
        if ctc_sum is not None:
            loss_sum = loss_sum + self.ctc_weight * ctc_sum
        num_tokens = batch["num_target_tokens"] if "num_target_tokens" in batch else int(target_lens.sum())
        return LossSums(loss_sum, num_tokens)

    @torch.no_grad()
    def generate(self, features, feature_mask, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy transcripts (token ids up to ``<eos>``) of a batch of audio features."""
        audio, audio_lens, _ = self.encode_audio(features, feature_mask)
        b, dev = audio.shape[0], audio.device
        prefix_lens = len(self.head_ids) + audio_lens + len(self.prompt_ids)
        width = self._padded_width(len(self.head_ids) + audio.shape[1] + len(self.prompt_ids))
        offset = width - prefix_lens
        no_answer = torch.zeros(b, 0, dtype=torch.long, device=dev)
        embeds, _, _ = self._sequence(audio, audio_lens, no_answer, torch.zeros_like(audio_lens), width, offset)
        return greedy_decode(self.llm, self.parallel_hooks, embeds, offset, max_new_tokens or self.max_new_tokens,
                             self.pad_id, self.eos_id)

    @torch.no_grad()
    def generate_text(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of text-only prompts (token ids), by the same cached decoding as
        :meth:`generate`: what the backbone alone would say (checked against transformers' own)."""
        dev = self.llm.get_input_embeddings().weight.device
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = self._padded_width(int(lens.max()))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=dev)
        for i, prompt in enumerate(prompts):  # left-padded, as generate() lays out its prefixes
            ids[i, width - len(prompt):] = torch.tensor(prompt, device=dev)
        return greedy_decode(self.llm, self.parallel_hooks, self.llm.get_input_embeddings()(ids), width - lens,
                             max_new_tokens, self.pad_id, self.eos_id)


def salm_tokenizer(cfg, texts):
    """The pretrained LLM's own tokenizer (``model.pretrained_llm``), else a word vocabulary of the
    training transcripts and the prompt."""
    from common.data.tokenizer import HFTokenizer, WordTokenizer

    if cfg.model.get("pretrained_llm"):
        return HFTokenizer.from_pretrained(cfg.model.pretrained_llm)
    return WordTokenizer.build(texts, extra_words=cfg.model.prompt.split(), pad_to_multiple_of=8)


def salm_flops(model: SALM) -> ModelFlops:
    enc, llm_cfg = model.encoder.config, model.llm.config
    stack = model.projector.stack_frames
    llm_dim, vocab = llm_cfg.hidden_size, model.llm.get_input_embeddings().num_embeddings
    prompt = len(model.head_ids) + len(model.prompt_ids)
    ctc_vocab = model.ctc_head.out_features if model.ctc_head is not None else 0

    def parts_of(frames: int, tokens: int) -> list[Part]:
        encoder, t = fastconformer_forward(enc, frames)
        encoder.weights += 2 * t * enc.hidden_size * ctc_vocab
        # CTC compression: about one position per spoken unit (the transcript's tokens) instead of t / stack
        audio = tokens if model.ctc_compress else math.ceil(t / stack)
        projector = Part(weights=2 * audio * (enc.hidden_size * stack * llm_dim + llm_dim * llm_dim))
        positions = audio + prompt + tokens
        llm = decoder_lm_forward(llm_cfg, positions, with_head=False)
        llm.weights += 2 * positions * llm_dim * vocab
        return [encoder, projector, llm]

    trainable = [trainable_share([model.encoder, model.ctc_head]), trainable_share([model.projector]),
                 trainable_share([model.llm])]
    return ModelFlops(parts_of, trainable)


def salm_activation_values(cfg, model: SALM, batch) -> float:
    """The encoder (and its CTC head), the projector and a Qwen3-style LLM: 4h+5q+4kv+4i values per
    position and layer (q/kv: query and key/value widths; memory-efficient attention), sequence
    parallel dividing the norms' part and tensor parallel the rest by tp, and the logits kept
    twice in fp32 for the loss (divided by tp under loss parallel)."""
    enc = model.encoder.config
    head = model.ctc_head.out_features if model.ctc_head is not None else None
    values, t_enc = encoder_activation_values(enc, batch, head_vocab=head)
    c, tp = model.llm.config, batch.tp
    sp = tp if batch.sequence_parallel else 1
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    pos = t_enc / cfg.model.projector.stack_frames + batch.text_tokens
    if batch.llm_positions is not None:
        pos = batch.llm_positions
    values += pos * (enc.hidden_size * 2 + 2 * c.hidden_size)  # projector
    per_token = 4 * c.hidden_size / sp + (5 * q + 4 * kv + 4 * c.intermediate_size) / tp
    values += batch.stack(pos, c.num_hidden_layers, per_token, c.hidden_size / sp)
    lp = tp if batch.loss_parallel else 1
    values += pos * c.vocab_size / lp * (1 + 8 / batch.act_bytes)
    return values


def salm_export_settings(model: SALM) -> dict:
    """A CTC head that came with the pretrained encoder is rebuilt from its size in an export."""
    frozen_head = model.ctc_head is not None and not model.ctc_weight
    return {"ctc_head_vocab": model.ctc_head.out_features} if frozen_head else {}


def merge_lora(model: SALM) -> None:
    model.llm = model.llm.merge_and_unload()  # peft: the adapters' B @ A (scaled) added to the weights


def check_salm_settings(cfg) -> None:
    m = cfg.model
    exported = exported_model_config(m.pretrained_encoder) if m.get("pretrained_encoder") else None
    try:
        if exported:
            check_exported_features(m.pretrained_encoder, exported, cfg.data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not (m.projector.ctc_compress and not m.ctc_aux_weight) or m.get("ctc_head_vocab"):
        return
    encoder = m.get("pretrained_encoder")
    try:
        head = exported_ctc_head(encoder) if encoder else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if head is None:
        source = f"model.pretrained_encoder {encoder} has none" if encoder else "model.pretrained_encoder is null"
        raise ConfigError(f"model.projector.ctc_compress=true needs a CTC head, but model.ctc_aux_weight is "
                          f"{m.ctc_aux_weight!r} and {source}: set model.ctc_aux_weight > 0, name a recognizer "
                          "exported by make export in model.pretrained_encoder, or set model.projector.ctc_compress="
                          "false (then stack frames, e.g. model.projector.stack_frames=2)")


SPEC = register(ModelSpec(
    name="salm", build=lambda cfg, tokenizer: SALM(cfg.model, tokenizer), tokenizer=salm_tokenizer,
    flops=salm_flops, activation_values=salm_activation_values, transcribes=True,
    llm=lambda model: model.llm, merge_lora=merge_lora, speech_encoder=lambda model: model.encoder,
    export_settings=salm_export_settings,
    # encoder subsampling x projector stacking
    audio_frames_per_token=lambda cfg: int(cfg.model.encoder.subsampling_factor) * int(cfg.model.projector.stack_frames),
    check=check_salm_settings,
    legacy_settings={"model.ctc_aux_weight": 0.0, "model.projector.ctc_compress": False,
                     "model.prompt_format": "plain", "model.pad_to_multiple_of": 1, "model.encoder_conv_norm": "auto",
                     "model.llm_init": "pretrained", "model.ctc_head_vocab": None,
                     "model.projector.piece_embeddings": False},
))
