"""One spec per model family: everything the training loop, the planner, the benchmarks and the
tools know about a model, in one registered object (as torchtitan's TrainSpec).

A model file ends with its spec; ``common.models`` finds it by ``model.name`` (or imports
``model.module``, a model file outside this package, which registers its own). Nothing else
matches class names or probes a model with ``hasattr``.

Usage (in a model file)::

    SPEC = register(ModelSpec(
        name="asr_ctc", build=lambda cfg, tok: CTCASR(cfg.model, tok), tokenizer=bpe_tokenizer,
        flops=ctc_flops, activation_values=ctc_activations, transcribes=True))

and everywhere else::

    spec = model_spec(cfg.model.name)
    model = spec.build(cfg, tokenizer)
    flops = spec.flops(model).training(batch["global_lengths"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch

from common.errors import ConfigError

FRAME_S = 0.01  # one log-mel feature frame (common.data.features)
TEXT_TOKENS_PER_S = 4  # the planner's assumption for target text per audio second


class LossSums(NamedTuple):
    """What every model's ``forward(batch)`` returns: sums over this rank's share of the batch, never
    means (``common.step.training_loss`` divides by the global batch's count).

    ``loss_sum``: the loss to train, summed over this rank's targets; ``count``: how many targets
    (answer tokens, or mel frames for TTS); ``parts``: named sums the model reports beside the loss,
    each with its count (TTS ``mel_loss``), logged as ``train_<name>`` and, where the spec lists them in
    ``validation_metrics``, validated.

    Usage::

        out = model(batch)
        out.loss_sum, out.count, out.parts.get("mel_loss")
    """

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    parts: Mapping[str, tuple[torch.Tensor, torch.Tensor | int]] = MappingProxyType({})  # read-only: shared default


@dataclass(frozen=True)
class RankBatch:
    """One rank's share of a training batch, as the planner sizes activations (``common.tools.plan``)."""

    audio_s: float            # audio seconds on this rank
    utterance_s: float        # the longest utterance: what one attention spans
    llm_positions: float | None  # LLM positions on this rank when data.max_tokens bounds the batch, else None
    tp: int
    activation_checkpointing: bool
    sequence_parallel: bool
    loss_parallel: bool
    act_bytes: int            # bytes per activation value

    @property
    def frames(self) -> float:
        return self.audio_s / FRAME_S

    @property
    def text_tokens(self) -> float:
        return TEXT_TOKENS_PER_S * self.audio_s

    def stack(self, positions: float, layers: int, per_position: float, width: float, scores: float = 0.0) -> float:
        """Values a stack of ``layers`` layers keeps for backward: all of each layer's ``per_position``
        values (+ its attention ``scores``), or with activation checkpointing one input per layer plus
        one whole layer."""
        one_layer = positions * per_position + scores
        return positions * width * layers + one_layer if self.activation_checkpointing else one_layer * layers


@dataclass(frozen=True)
class ModelSpec:
    """What is known about one model family (``model.name``)."""

    name: str
    build: Callable             # (cfg, tokenizer) -> nn.Module: random init, or pretrained weights per cfg.model
    tokenizer: Callable         # (cfg, texts) -> tokenizer built from the training transcripts
    flops: Callable             # model -> common.flops.ModelFlops (training FLOPs per global batch, for MFU)
    activation_values: Callable  # (cfg, model, RankBatch) -> values backward keeps on one rank (planner estimate)
    loss_normalizer: str = "global_num_target_tokens"  # the batch figure the loop divides loss sums by
    validation_metrics: tuple[str, ...] = ()  # per-value means the model reports beside the loss (LossSums.parts)
    transcribes: bool = False   # model.generate(features, mask) -> token ids: WER in validation, make transcribe
    ctc_log_probs: Callable | None = None  # (model, features, mask) -> (log_probs (B, T, V), lengths): CTC models,
                                           # decoded with a word LM too (common.models.ctc_lm)
    synthesizes: bool = False   # model.synthesize(texts) -> mels: make synthesize, intelligibility
    llm: Callable | None = None  # model -> its causal-LM backbone (tensor parallel checks, vocabulary)
    merge_lora: Callable | None = None  # model -> None: LoRA adapters merged into the backbone's weights (export)
    speech_encoder: Callable | None = None  # model -> its speech encoder (export of a pretrained encoder)
    export_settings: Callable | None = None  # model -> {model key: value} that rebuild, without the pretrained
                                             # sources, what those sources gave it (export)
    audio_frames_per_token: Callable | None = None  # cfg -> feature frames per LLM position (speech-LLMs)
    check: Callable | None = None  # cfg -> None: the family's own settings; raises ConfigError naming them
    # Settings added after some of the family's checkpoints and exports were written, with the value
    # that rebuilds those models as they were trained ({"model.<key>": value}). Loading fills them in
    # where a stored config lacks them (common.models.with_legacy_settings); the model code reads
    # every setting directly, and today's defaults live in the presets alone.
    legacy_settings: dict | None = None


def bpe_tokenizer(cfg, texts):
    """A BPE vocabulary of ``model.tokenizer.vocab_size`` learned from the training transcripts."""
    from common.data.tokenizer import BPETokenizer

    return BPETokenizer.build(texts, vocab_size=cfg.model.tokenizer.vocab_size)


def tts_tokenizer(cfg, texts):
    """espeak-ng phonemes when ``model.tokenizer.phonemes`` names a voice (e.g. ``en-us``), cached in
    ``<data.dir>/phoneme_cache``, else :func:`bpe_tokenizer` (characters at ``vocab_size: 1``)."""
    if cfg.model.tokenizer.phonemes:
        from pathlib import Path

        from common.data.tokenizer import PhonemeTokenizer

        return PhonemeTokenizer.build(texts, voice=cfg.model.tokenizer.phonemes,
                                      cache_dir=Path(cfg.data.dir) / "phoneme_cache")
    return bpe_tokenizer(cfg, texts)


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` known under ``spec.name`` (a model file calls this once, at import)."""
    known = _SPECS.get(spec.name)
    if known is not None and known is not spec and known.build is not spec.build:
        raise ConfigError(f"model.name {spec.name!r} is registered twice (by {known.build.__module__} and "
                          f"{spec.build.__module__})")
    _SPECS[spec.name] = spec
    return spec


def registered() -> dict[str, ModelSpec]:
    return dict(_SPECS)
