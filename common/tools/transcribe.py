"""Transcribe audio files with a trained checkpoint of any recipe (one process, CPU or one GPU).

The checkpoint alone is enough: it carries the run's resolved config and its tokenizer. Audio
of any sample rate is resampled to the model's, and multi-channel audio is downmixed to mono.

Usage::

    make transcribe RECIPE=asr_ddp AUDIO=my.wav          # the latest run's last checkpoint
    python -m common.tools.transcribe outputs/asr_ddp/latest/checkpoints/last.ckpt a.wav b.flac
    python -m common.tools.transcribe outputs/salm_tp_fsdp2/latest/export a.wav   # a `make export` directory

Prints one line per file: ``<path>\\t<transcript>``. A file that cannot be read gets an
``error:`` line on stderr and the others go on; the exit status is then 1. A missing, unreadable
or wrong kind of checkpoint (a TTS model, a run directory) is exit status 2.

Long audio is transcribed in chunks of at most ``--chunk-s`` seconds (default 30: the length
the recipes train on, and a bounded attention span), each cut at the quietest 10 ms frame of
its last ``--search-s`` seconds (default 3) so that a chunk boundary rarely splits a word; only
one chunk is in memory at a time, whatever the file's length. The transcripts of the chunks
are joined with spaces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.errors import ConfigError
from common.inference import load_model

CHUNK_S = 30.0  # longest piece of audio given to the model at once (seconds)
SEARCH_S = 3.0  # a chunk ends at the quietest 10 ms frame of its last SEARCH_S seconds


def _open_audio(audio_path: str | Path):
    from lhotse import Recording

    path = Path(audio_path)
    if not path.is_file():
        raise ConfigError(f"audio file {path}: no such file")
    try:
        cut = Recording.from_file(path).to_cut()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, name the file
        raise ConfigError(f"audio file {path}: cannot be read as audio ({type(exc).__name__}: {exc})") from exc
    if cut.duration <= 0:
        raise ConfigError(f"audio file {path}: contains no samples")
    return cut


def audio_chunks(audio_path: str | Path, sample_rate: int, chunk_s: float = CHUNK_S, search_s: float = SEARCH_S):
    """Mono pieces of at most ``chunk_s`` seconds at ``sample_rate``, read one at a time."""
    import numpy as np

    from common.data.audio import load_mono

    if chunk_s <= 0 or not 0 <= search_s < chunk_s:
        raise ConfigError(f"--chunk-s ({chunk_s}) must be > 0 and --search-s ({search_s}) in [0, chunk-s)")
    cut, start = _open_audio(audio_path), 0.0
    hop = sample_rate // 100
    while start < cut.duration - 1e-3:
        end = min(start + chunk_s, cut.duration)
        try:  # the data loader's own resample + downmix, on this piece of the file only
            piece = load_mono(cut.truncate(offset=start, duration=end - start), sample_rate)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"audio file {audio_path}: cannot be read at {start:.1f} s "
                              f"({type(exc).__name__}: {exc})") from exc
        if end < cut.duration and search_s > 0 and piece.size > hop:
            tail = piece[-int(search_s * sample_rate):]
            frames = len(tail) // hop
            energy = (tail[: frames * hop].reshape(frames, hop).astype(np.float64) ** 2).mean(1)
            keep = len(piece) - len(tail) + int(energy.argmin()) * hop + hop // 2
            piece, end = piece[:keep], start + keep / sample_rate
        if piece.size:
            yield piece
        start = end


def read_features(audio_path: str | Path, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Log-mel features (frames, bins) of a whole (short) audio file, as the training data loader computes them."""
    from common.data.audio import load_mono
    from common.data.features import BatchFeatures

    cut = _open_audio(audio_path)
    try:
        mono = load_mono(cut, sample_rate)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"audio file {audio_path}: cannot be read as audio ({type(exc).__name__}: {exc})") from exc
    if mono.size == 0:
        raise ConfigError(f"audio file {audio_path}: contains no samples")
    return BatchFeatures(num_mel_bins, sample_rate).of_waveform(mono)[0][0]


def check_recognizer(model, cfg, checkpoint) -> None:
    from common.models import spec_of

    if not spec_of(cfg).transcribes:
        raise ConfigError(f"checkpoint {checkpoint} is a {cfg.model.name!r} model (recipe {cfg.get('recipe')!r}), "
                          "which does not transcribe; give an asr_ddp, salm_fsdp2 or salm_tp_fsdp2 checkpoint "
                          "(make synthesize speaks with a TTS one)")


@torch.no_grad()
def transcribe(model, tokenizer, cfg, audio_path, chunk_s: float = CHUNK_S, search_s: float = SEARCH_S) -> str:
    from common.data.features import BatchFeatures

    features = BatchFeatures(cfg.data.num_mel_bins, cfg.data.sample_rate)
    device = next(model.parameters()).device
    texts = []
    for piece in audio_chunks(audio_path, cfg.data.sample_rate, chunk_s, search_s):
        feats, mask = features.of_waveform(piece, device)
        text = tokenizer.decode(model.generate(feats, mask)[0]).strip()
        if text:
            texts.append(text)
    return " ".join(texts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file (DDP), a sharded checkpoint directory (FSDP2/TP) "
                                           "or an exported model directory (make export)")
    parser.add_argument("audio", nargs="+", help="WAV/FLAC/... files, any sample rate, mono or multi-channel")
    parser.add_argument("--chunk-s", type=float, default=CHUNK_S, help="longest piece given to the model (s)")
    parser.add_argument("--search-s", type=float, default=SEARCH_S,
                        help="a piece ends at the quietest 10 ms of its last search-s seconds")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, cfg = load_model(args.checkpoint)
        check_recognizer(model, cfg, args.checkpoint)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.audio:
        try:
            text = transcribe(model, tokenizer, cfg, path, args.chunk_s, args.search_s)
        except ConfigError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"{path}\t{text}", flush=True)
    if failed:
        print(f"error: {failed} of {len(args.audio)} file(s) could not be transcribed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
