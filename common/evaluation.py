"""Evaluations run after training (below the training entry point, above the models).

:func:`intelligibility`: a TTS model's held-out sentences, synthesized (Griffin-Lim) and transcribed
by an ``asr_ddp`` checkpoint; the character error rate is what ``summary.json`` reports as
``val.asr_cer`` when ``eval.asr_checkpoint`` is set, beside how many sentences did not end on their
own: cut at the model's frame limit (``val.synthesis_hit_frame_limit``) or shorter than their text
in tokens (``val.synthesis_too_short``).


:func:`recognition_scores`: a recognizer's WER and CER on a test set (lhotse cuts, NeMo, any source
``data.train`` takes), transcribed in batches of similar length; hypotheses and references are
compared after :func:`common.data.text.normalize_text`. ``summary.json`` reports it per set of
``data.test`` as ``test.<name>``.

Usage::

    scores = recognition_scores(model, tokenizer, cfg, parse_sources("data/test_cuts.jsonl.gz", "test"))
    scores["wer"], scores["cer"], scores["utterances"]

    result = intelligibility(tts_model, cfg, ["alpha bravo"], "outputs/asr_ddp/latest/checkpoints/last.ckpt")
    result["asr_cer"]
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.errors import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def recognition_scores(model, tokenizer, cfg, sources: list, batch_s: float = 120.0, num_examples: int = 3,
                       lm=None) -> dict:
    """WER and CER of a recognizer (a model whose spec transcribes) on every utterance of ``sources``:
    greedy decoding, and with ``lm`` (a :class:`common.models.ctc_lm.WordLM`, CTC models only) also
    CTC beam search with that word LM (``wer_lm``, ``cer_lm``)."""
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    from common.data.audio import load_mono
    from common.data.features import BatchFeatures
    from common.data.sources import open_sources
    from common.data.text import normalize_text
    from common.models import spec_of

    device = next(model.parameters()).device
    features = BatchFeatures(cfg.data.num_mel_bins, cfg.data.sample_rate,
                             normalize=cfg.data.get("feature_normalization", "utterance") == "utterance")
    cuts = sorted(open_sources(sources, seed=0, mix=False), key=lambda c: c.duration)
    refs, hyps, lm_hyps, seconds, batch = [], [], [], 0.0, []
    ctc = spec_of(cfg).ctc_log_probs if lm is not None else None
    if lm is not None and ctc is None:
        raise ConfigError(f"a word LM decodes CTC models only; {cfg.model.name!r} is not one")
    if ctc is not None:
        from common.models.ctc_lm import beam_search

        pieces, skip = tokenizer.pieces(), frozenset({tokenizer.unk_id})

    def flush():
        waves = [torch.as_tensor(load_mono(c, cfg.data.sample_rate)) for c in batch]
        lens = torch.tensor([len(w) for w in waves])
        padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(device)
        feats, num_frames = features.log_mel(padded, lens.to(device))
        mask = torch.arange(feats.shape[1], device=device)[None, :] < num_frames[:, None]
        for cut, ids in zip(batch, model.generate(feats, mask)):
            refs.append(normalize_text(" ".join(s.text for s in cut.supervisions)))
            hyps.append(normalize_text(tokenizer.decode(ids)))
        if ctc is not None:
            log_probs, lengths = ctc(model, feats, mask)
            lm_hyps.extend(normalize_text(beam_search(lp[:n].cpu(), pieces, lm, tokenizer.blank_id, skip=skip))
                           for lp, n in zip(log_probs, lengths.tolist()))
        batch.clear()

    for cut in cuts:
        if batch and (len(batch) + 1) * cut.duration > batch_s:  # sorted: this cut is the batch's longest
            flush()
        batch.append(cut)
        seconds += cut.duration
    if batch:
        flush()
    if not refs:
        raise ConfigError(f"test set {[s.name for s in sources]} has no utterance")
    out = {"wer": round(float(word_error_rate(hyps, refs)), 4), "cer": round(float(char_error_rate(hyps, refs)), 4)}
    if lm_hyps:
        out.update(wer_lm=round(float(word_error_rate(lm_hyps, refs)), 4),
                   cer_lm=round(float(char_error_rate(lm_hyps, refs)), 4))
    out.update(utterances=len(refs), hours=round(seconds / 3600, 3),
               examples=[{"ref": r, "hyp": h, **({"hyp_lm": lm_hyps[i]} if lm_hyps else {})}
                         for i, (r, h) in enumerate(list(zip(refs, hyps))[:num_examples])])
    return out


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
    from common.data.text import normalize_text

    hyps = [normalize_text(h) for h in hyps]
    refs = [normalize_text(t) for t in texts]
    # The functional form: rank 0 alone runs this, so nothing may wait for the other ranks.
    cer = char_error_rate(hyps, refs)
    for ref, hyp in list(zip(refs, hyps))[:3]:
        log.info("intelligibility: %r -> %r", ref, hyp)
    return {"asr_cer": float(cer), "asr_num_sentences": len(hyps),  # sentences the recognizer scored
            "synthesis_hit_frame_limit": int(ended.get("hit_frame_limit", 0)), "synthesis_too_short": int(ended.get("too_short", 0))}
