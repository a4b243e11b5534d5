"""Synthesize speech with a trained TTS checkpoint: a WAV (Griffin-Lim) and a PNG of the mel spectrogram.

Usage::

    make synthesize RECIPE=tts_ddp TEXT="alpha bravo charlie"        # latest run's last checkpoint
    python -m common.synthesize outputs/tts_ddp/latest/checkpoints/last.ckpt "alpha bravo" --out hello.wav

writes ``hello.wav`` and ``hello.png``. :func:`intelligibility` is the check a user wants after
training: synthesize held-out sentences, transcribe them with an ``asr_ddp`` checkpoint, report CER.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from common.parallel import ConfigError

log = logging.getLogger(__name__)


def save_mel_png(log_mel: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, log_mel.shape[0] / 40), 3), dpi=100)
    image = ax.imshow(log_mel.T.cpu().numpy(), origin="lower", aspect="auto", interpolation="nearest")
    ax.set(xlabel="frame (10 ms)", ylabel="mel bin", title=title)
    fig.colorbar(image, ax=ax, label="log energy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def synthesize_to_files(model, cfg, text: str, out_wav: Path) -> tuple[Path, Path]:
    import soundfile as sf

    from common.models.vocoder import GriffinLim

    if not model.tokenizer.normalize(text):
        raise ConfigError(f"TEXT {text!r} is empty after normalization")
    mel = model.synthesize([text])[0].cpu()
    samples = GriffinLim(cfg.data.num_mel_bins, cfg.data.sample_rate)(mel)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_wav, samples, cfg.data.sample_rate)
    png = out_wav.with_suffix(".png")
    save_mel_png(mel, png, title=model.tokenizer.normalize(text))
    return out_wav, png


@torch.no_grad()
def intelligibility(model, cfg, texts: list[str], asr_checkpoint: str | Path) -> dict:
    """Character error rate of an ASR model on this TTS model's synthesis of ``texts``."""
    from torchmetrics.functional.text import char_error_rate

    from common.data.features import BatchFeatures
    from common.models.vocoder import GriffinLim
    from common.transcribe import load_model

    asr, asr_tok, asr_cfg = load_model(asr_checkpoint)
    asr = asr.to(next(model.parameters()).device)
    if asr_cfg.data.sample_rate != cfg.data.sample_rate:
        raise ConfigError(f"eval.asr_checkpoint {asr_checkpoint}: sample rate {asr_cfg.data.sample_rate} "
                          f"!= this model's {cfg.data.sample_rate}")
    vocoder = GriffinLim(cfg.data.num_mel_bins, cfg.data.sample_rate)
    features = BatchFeatures(asr_cfg.data.num_mel_bins, asr_cfg.data.sample_rate)
    hyps = []
    for mel in model.synthesize(texts):
        feats, mask = features.of_waveform(vocoder(mel.cpu()), mel.device)
        hyps.append(asr_tok.decode(asr.generate(feats, mask)[0]))
    refs = [model.tokenizer.normalize(t) for t in texts]
    # The functional form: rank 0 alone runs this, so nothing may wait for the other ranks.
    cer = char_error_rate(hyps, refs)
    for ref, hyp in list(zip(refs, hyps))[:3]:
        log.info("intelligibility: %r -> %r", ref, hyp)
    return {"asr_cer": float(cer), "asr_num_sentences": len(texts)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a tts_ddp checkpoint (.ckpt)")
    parser.add_argument("text")
    parser.add_argument("--out", type=Path, default=Path("synthesized.wav"), help="WAV path; the PNG goes beside it")
    args = parser.parse_args(argv)
    from common.transcribe import load_model

    try:
        if args.out.suffix.lower() != ".wav":
            raise ConfigError(f"--out/OUT {args.out}: must name a .wav file (the PNG is written beside it)")
        if args.out.is_dir():
            raise ConfigError(f"--out/OUT {args.out} is a directory; name a .wav file")
        model, _, cfg = load_model(args.checkpoint)
        if not hasattr(model, "synthesize"):
            raise ConfigError(f"checkpoint {args.checkpoint} is a {cfg.model.name!r} model (recipe "
                              f"{cfg.get('recipe')!r}), which does not synthesize speech; give a tts_ddp checkpoint")
        wav, png = synthesize_to_files(model, cfg, args.text, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {wav} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
