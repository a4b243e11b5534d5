"""Loading trained models for inference: one place for checkpoints and exports.

Every tool that runs a trained model (``common.tools.transcribe``, ``common.tools.synthesize``,
``common.tools.export``) and the TTS intelligibility check (``common.evaluation``) load it here, so a
checkpoint of any layout and an exported directory give the same ``(model, tokenizer, config)``.

Usage::

    model, tokenizer, cfg = load_model("outputs/asr_ddp/latest/checkpoints/last.ckpt")  # DDP file
    model, tokenizer, cfg = load_model("outputs/salm_tp_fsdp2/latest/checkpoints/last.ckpt")  # DCP dir
    model, tokenizer, cfg = load_model("outputs/salm_tp_fsdp2/latest/export")   # `make export` output
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.data.buckets import allow_older_sampler_states
from common.errors import ConfigError
from common.models.encoder import EXPORT_CONFIG_FILE as CONFIG_FILE  # the one declaration of the format
from common.models.encoder import EXPORT_FORMAT as FORMAT
from common.models.encoder import EXPORT_WEIGHTS_FILE as WEIGHTS_FILE


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


STATE_PREFIX = "model."  # TrainingModule keeps the recipe's model as `self.model`


def read_checkpoint(path: Path, weights: str = "average") -> tuple[dict, dict | None]:
    """(everything but the weights, the weights or None if they stay in a sharded checkpoint).

    ``weights``: a run with ``ema.decay`` keeps two sets; ``average`` (the EMA, its ``state_dict``)
    or ``trained`` (the weights the optimizer moved, ``current_model_state``). Without an average
    both name the one set there is."""
    allow_older_sampler_states()  # checkpoints of earlier versions still load
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
    state = ckpt.pop("state_dict")
    trained = ckpt.pop("current_model_state", None)
    return ckpt, trained if weights == "trained" and trained is not None else state


def load_model(checkpoint: str | Path, weights: str = "average"):
    """(model in eval mode, tokenizer, resolved run config) rebuilt from a checkpoint, or from an
    exported model directory (``common.tools.export``); ``weights``: see :func:`read_checkpoint`."""
    from omegaconf import OmegaConf

    from common.data.tokenizer import load_tokenizer, tokenizer_from_json
    from common.models import build_model, with_legacy_settings

    path = Path(checkpoint)
    if is_export(path):
        return load_exported(path)
    from common.rundir import is_run_directory

    if is_run_directory(path):
        raise ConfigError(f"{path} is a run directory, not a checkpoint; give one of its checkpoints, e.g. "
                          f"{path / 'checkpoints' / 'last.ckpt'}")
    meta, state = read_checkpoint(path, weights)
    if "run_config" not in meta:
        raise ConfigError(f"checkpoint {path}: no run_config inside (not written by common.train)")
    cfg = with_legacy_settings(OmegaConf.create(meta["run_config"]))  # an older checkpoint: as it was trained
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


def load_exported(directory: str | Path):
    """(model in eval mode, tokenizer, config) from an ``export`` directory."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_model as load_weights

    from common.data.tokenizer import load_tokenizer
    from common.models import build_model, with_legacy_settings

    directory = Path(directory)
    if not is_export(directory):
        raise ConfigError(f"{directory}: not an exported model (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{directory}/{CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
    cfg = with_legacy_settings(OmegaConf.create({"recipe": config.get("recipe"), "model": config["model"],
                                                 "data": config["data"]}))
    tokenizer = load_tokenizer(directory)
    model = build_model(cfg, tokenizer)
    load_weights(model, directory / WEIGHTS_FILE, strict=True)  # re-ties shared tensors
    return model.eval(), tokenizer, cfg


