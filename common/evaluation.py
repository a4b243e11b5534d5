"""Evaluations run after training (below the training entry point, above the models).

:func:`intelligibility`: a TTS model's held-out sentences, synthesized (Griffin-Lim) and transcribed
by an ``asr_ddp`` checkpoint; the character error rate is what ``summary.json`` reports as
``val.asr_cer`` when ``eval.asr_checkpoint`` is set, beside how many sentences did not end on their
own: cut at the model's frame limit (``val.synthesis_hit_frame_limit``) or shorter than their text
in tokens (``val.synthesis_too_short``).

Usage::

    result = intelligibility(tts_model, cfg, ["alpha bravo"], "outputs/asr_ddp/latest/checkpoints/last.ckpt")
    result["asr_cer"]
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.parallel import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def intelligibility(model, cfg, texts: list[str], asr_checkpoint: str | Path) -> dict:
    """Character error rate of an ASR model on this TTS model's synthesis of ``texts``."""
    from torchmetrics.functional.text import char_error_rate

    from common.data.features import BatchFeatures
    from common.inference import load_model
    from common.models.vocoder import GriffinLim

    asr, asr_tok, asr_cfg = load_model(asr_checkpoint)
    asr = asr.to(next(model.parameters()).device)
    if asr_cfg.data.sample_rate != cfg.data.sample_rate:
        raise ConfigError(f"eval.asr_checkpoint {asr_checkpoint}: sample rate {asr_cfg.data.sample_rate} "
                          f"!= this model's {cfg.data.sample_rate}")
    vocoder = GriffinLim(cfg.data.num_mel_bins, cfg.data.sample_rate)
    features = BatchFeatures(asr_cfg.data.num_mel_bins, asr_cfg.data.sample_rate)
    hyps = []
    mels = model.synthesize(texts)
    # The model counts what it knows while synthesizing: sentences cut at the frame limit, and
    # those with fewer frames than tokens (they cannot have said every token: stopped early).
    ended = dict(getattr(model, "last_synthesis", {}))
    for mel in mels:
        feats, mask = features.of_waveform(vocoder(mel.cpu()), mel.device)
        hyps.append(asr_tok.decode(asr.generate(feats, mask)[0]))
    refs = [model.tokenizer.normalize(t) for t in texts]
    # The functional form: rank 0 alone runs this, so nothing may wait for the other ranks.
    cer = char_error_rate(hyps, refs)
    for ref, hyp in list(zip(refs, hyps))[:3]:
        log.info("intelligibility: %r -> %r", ref, hyp)
    return {"asr_cer": float(cer), "asr_num_sentences": len(hyps),  # sentences the recognizer scored
            "synthesis_hit_frame_limit": int(ended.get("hit_frame_limit", 0)), "synthesis_too_short": int(ended.get("too_short", 0))}
