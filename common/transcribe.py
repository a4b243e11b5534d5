"""Transcribe audio files with a trained checkpoint of any recipe (one process, CPU or one GPU).

The checkpoint alone is enough: it carries the run's resolved config and its tokenizer. Audio
of any sample rate is resampled to the model's, and multi-channel audio is downmixed to mono.

Usage::

    make transcribe RECIPE=asr_ddp AUDIO=my.wav          # the latest run's last checkpoint
    python -m common.transcribe outputs/asr_ddp/latest/checkpoints/last.ckpt a.wav b.flac
    python -m common.transcribe outputs/salm_tp_fsdp2/latest/export a.wav   # a `make export` directory

Prints one line per file: ``<path>\\t<transcript>``. Exit status 2 with an ``error:`` line for a
missing or unreadable checkpoint or audio file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.parallel import ConfigError

STATE_PREFIX = "model."  # TrainingModule keeps the recipe's model as `self.model`


def _read_checkpoint(path: Path) -> tuple[dict, dict | None]:
    """(everything but the weights, the weights or None if they stay in a sharded checkpoint)."""
    if path.is_dir():  # a sharded (torch.distributed.checkpoint) directory from ModelParallelStrategy
        meta = path / "meta.pt"
        if not meta.exists():
            raise ConfigError(f"checkpoint {path}: a directory without meta.pt is not a Lightning checkpoint")
        return torch.load(meta, map_location="cpu", weights_only=True), None
    if not path.exists():
        raise ConfigError(f"checkpoint {path}: no such file or directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    return ckpt, ckpt.pop("state_dict")


def load_model(checkpoint: str | Path):
    """(model in eval mode, tokenizer, resolved run config) rebuilt from a checkpoint, or from an
    exported model directory (``common.export``)."""
    from omegaconf import OmegaConf

    from common.data.tokenizer import load_tokenizer, tokenizer_from_json
    from common.export import is_export, load_exported
    from common.train import build_model

    path = Path(checkpoint)
    if is_export(path):
        return load_exported(path)
    meta, state = _read_checkpoint(path)
    if "run_config" not in meta:
        raise ConfigError(f"checkpoint {path}: no run_config inside (not written by common.train)")
    cfg = OmegaConf.create(meta["run_config"])
    if "tokenizer_json" in meta:
        tokenizer = tokenizer_from_json(meta["tokenizer_json"])
    else:  # e.g. a pretrained Hugging Face tokenizer: saved in the run directory
        tokenizer = load_tokenizer(Path(cfg.run.output_dir) / "tokenizer")
    model = build_model(cfg, tokenizer)
    target = {STATE_PREFIX + k: v for k, v in model.state_dict().items()}
    if state is None:
        import warnings

        import torch.distributed.checkpoint as dcp

        # Reads full tensors into this process's unsharded model, whatever layout wrote them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state_dict": target}, checkpoint_id=str(path), no_dist=True)
    else:
        missing = sorted(set(target) - set(state))
        if missing:
            raise ConfigError(f"checkpoint {path}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        model.load_state_dict({k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)})
    return model.eval(), tokenizer, cfg


def read_features(audio_path: str | Path, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """Log-mel features (frames, bins) of an audio file, as the training data loader computes them."""
    from lhotse import Recording

    from common.data.loading import LogMel, load_mono

    path = Path(audio_path)
    if not path.is_file():
        raise ConfigError(f"audio file {path}: no such file")
    try:  # the data loader's own resample + downmix, on a cut of the whole file
        mono = load_mono(Recording.from_file(path).to_cut(), sample_rate)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, name the file
        raise ConfigError(f"audio file {path}: cannot be read as audio ({type(exc).__name__}: {exc})") from exc
    if mono.size == 0:
        raise ConfigError(f"audio file {path}: contains no samples")
    return torch.from_numpy(LogMel(num_mel_bins, sample_rate)(mono)).float()


@torch.no_grad()
def transcribe(model, tokenizer, cfg, audio_path) -> str:
    feats = read_features(audio_path, cfg.data.sample_rate, cfg.data.num_mel_bins)[None]
    mask = torch.ones(feats.shape[:2], dtype=torch.bool)
    return tokenizer.decode(model.generate(feats, mask)[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file (DDP), a sharded checkpoint directory (FSDP2/TP) "
                                           "or an exported model directory (make export)")
    parser.add_argument("audio", nargs="+", help="WAV/FLAC/... files, any sample rate, mono or multi-channel")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, cfg = load_model(args.checkpoint)
        for path in args.audio:
            print(f"{path}\t{transcribe(model, tokenizer, cfg, path)}", flush=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
