"""Synthesize speech with a trained TTS checkpoint: a WAV (Griffin-Lim) and a PNG of the mel spectrogram.

Usage::

    make synthesize RECIPE=tts_ddp TEXT="alpha bravo charlie"        # latest run's last checkpoint
    python -m common.tools.synthesize outputs/tts_ddp/latest/checkpoints/last.ckpt "alpha bravo" --out hello.wav

writes ``hello.wav`` and ``hello.png``. With ``--reference rec.wav`` (``make synthesize REF=rec.wav``), a
recording of the same text, the PNG shows its log-mel above the synthesized one, on one scale. :func:`common.evaluation.intelligibility` is the check a user wants after training (and what
``eval.asr_checkpoint`` runs): held-out sentences synthesized, transcribed by an ``asr_ddp`` model, CER.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from common.errors import ConfigError

log = logging.getLogger(__name__)


def save_mel_png(log_mel: torch.Tensor, path: Path, title: str, reference: torch.Tensor | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(f"recording: {title}", reference), (f"synthesized: {title}", log_mel)] if reference is not None \
        else [(title, log_mel)]
    frames = max(p.shape[0] for _, p in panels)
    lo, hi = min(float(p.min()) for _, p in panels), max(float(p.max()) for _, p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(4.0, frames / 40), 3 * len(panels)), dpi=100, squeeze=False)
    for ax, (name, mel) in zip(axes[:, 0], panels):
        image = ax.imshow(mel.T.cpu().numpy(), origin="lower", aspect="auto", interpolation="nearest", vmin=lo, vmax=hi)
        ax.set(xlabel="frame (10 ms)", ylabel="mel bin", title=name, xlim=(-0.5, frames - 0.5))
        fig.colorbar(image, ax=ax, label="log energy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reference_log_mel(path: Path, cfg) -> torch.Tensor:
    """The raw log-mel (frames, bins) a TTS model of ``cfg`` was trained to predict, of a recording."""
    import soundfile as sf

    from common.data.features import BatchFeatures

    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"--reference/REF {path}: not a readable audio file ({exc})") from exc
    if rate != cfg.data.sample_rate:
        raise ConfigError(f"--reference/REF {path}: {rate} Hz, but the model speaks at {cfg.data.sample_rate} Hz")
    features = BatchFeatures(cfg.data.num_mel_bins, cfg.data.sample_rate, normalize=False)
    feats, mask = features.of_waveform(samples.mean(1))
    return feats[0, : int(mask.sum())]


def unsayable(tokenizer, text: str) -> list[str]:
    """What of ``text`` the model has no tokens for, as ``word (characters)`` items: words that
    encode to ``<unk>`` or to nothing, and characters its text normalization drops (symbols,
    other scripts' marks). Punctuation and spaces are not listed: the model never says them.

        unsayable(tok, "alpha zulu €5")   # tok trained on "alpha bravo charlie delta echo foxtrot"
        # ["'zulu' (no token for 'u', 'z')", "'5' (no token for '5')", "'€5' (dropped: '€')"]
    """
    import unicodedata

    unk = getattr(tokenizer, "unk_id", None)
    found = []
    for word in tokenizer.normalize(text).split():
        ids = tokenizer.encode(word)
        if not ids or (unk is not None and unk in ids):
            chars = sorted({c for c in word if not tokenizer.encode(c) or (unk is not None and unk in tokenizer.encode(c))})
            found.append(f"{word!r} (no token for {', '.join(map(repr, chars))})" if chars else f"{word!r}")
    kept = tokenizer.normalize(text)
    for raw in text.split():
        dropped = [c for c in raw if unicodedata.category(c)[0] in "LNS"
                   and (not tokenizer.normalize(c) or tokenizer.normalize(c) not in kept)]
        if dropped:
            found.append(f"{raw!r} (dropped: {''.join(dropped)!r})")
    return found


def synthesize_to_files(model, cfg, text: str, out_wav: Path, reference: Path | None = None,
                        strict: bool = False) -> tuple[Path, Path]:
    import soundfile as sf

    from common.models.vocoder import GriffinLim

    if not model.tokenizer.normalize(text):
        raise ConfigError(f"TEXT {text!r} is empty after normalization")
    missing = unsayable(model.tokenizer, text)
    if missing and strict:
        raise ConfigError(f"TEXT has what the model cannot say: {'; '.join(missing)} (--strict; without it the "
                          "rest is synthesized with a warning)")
    if missing:
        print(f"warning: the model cannot say {'; '.join(missing)}: those parts come out as <unk> or nothing, so "
              "the audio may be short or garbled (--strict / STRICT=1 refuses such text)", file=sys.stderr, flush=True)
    ref = reference_log_mel(reference, cfg) if reference else None
    mel = model.synthesize([text])[0].cpu()
    samples = GriffinLim(cfg.data.num_mel_bins, cfg.data.sample_rate)(mel)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_wav, samples, cfg.data.sample_rate)
    png = out_wav.with_suffix(".png")
    save_mel_png(mel, png, title=model.tokenizer.normalize(text), reference=ref)
    return out_wav, png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a tts_ddp checkpoint (.ckpt)")
    parser.add_argument("text")
    parser.add_argument("--out", type=Path, default=Path("synthesized.wav"), help="WAV path; the PNG goes beside it")
    parser.add_argument("--reference", type=Path, help="a recording of the same text: its log-mel goes above in the PNG")
    parser.add_argument("--strict", action="store_true", help="refuse text with words or characters the model has "
                        "no tokens for (default: synthesize the rest, with a warning naming them)")
    args = parser.parse_args(argv)
    from common.inference import load_model
    from common.models import spec_of

    try:
        if args.out.suffix.lower() != ".wav":
            raise ConfigError(f"--out/OUT {args.out}: must name a .wav file (the PNG is written beside it)")
        if args.out.is_dir():
            raise ConfigError(f"--out/OUT {args.out} is a directory; name a .wav file")
        model, _, cfg = load_model(args.checkpoint)
        if not spec_of(cfg).synthesizes:
            raise ConfigError(f"checkpoint {args.checkpoint} is a {cfg.model.name!r} model (recipe "
                              f"{cfg.get('recipe')!r}), which does not synthesize speech; give a tts_ddp checkpoint")
        wav, png = synthesize_to_files(model, cfg, args.text, args.out, args.reference, strict=args.strict)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {wav} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
