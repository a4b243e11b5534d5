"""Export a checkpoint (a DDP ``.ckpt`` file or a sharded DCP directory) as a consolidated,
Hugging Face-style model directory, for evaluation and inference in one process.

Writes ``<out_dir>/``:

* ``model.safetensors``: every weight as one full (unsharded) tensor; tied/shared tensors are
  stored once (``safetensors.torch.save_model``) and tied again on load; LoRA adapters merged into
  the weights they adapt;
* ``config.json``: what rebuilds the model: the model section of the run config, the data
  feature settings (sample rate, mel bins, normalization), the recipe and the source checkpoint;
* the tokenizer files (``word_tokenizer.json``, ``bpe_tokenizer.json`` or a HF tokenizer's).

Usage (what ``make export`` does)::

    python -m common.tools.export outputs/salm_tp_fsdp2/latest/checkpoints/last.ckpt outputs/salm_tp_fsdp2/latest/export
    python -m common.tools.transcribe outputs/salm_tp_fsdp2/latest/export a.wav    # an export loads like a checkpoint

``common.inference.load_model(dir)`` loads it back: ``(model in eval mode, tokenizer, config)``,
as for a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from common.errors import ConfigError
from common.inference import CONFIG_FILE, FORMAT, WEIGHTS_FILE, is_export, load_model, read_checkpoint
from common.models import spec_of

DATA_KEYS = ("sample_rate", "num_mel_bins", "feature_normalization")  # what turns audio into model inputs



def check_out_dir(out_dir: Path) -> None:
    """Export writes a new directory or replaces an earlier export, never anything else: a run
    directory, a checkpoint or any other non-empty directory is refused (nothing is deleted)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConfigError(f"OUT {out_dir} exists and is not a directory; choose a new directory for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        from common.rundir import is_run_directory

        what = "a run directory" if is_run_directory(out_dir) else "a non-empty directory that is not an earlier export"
        raise ConfigError(f"OUT {out_dir} is {what}; export writes only a new directory or replaces an earlier "
                          f"export (nothing was changed); e.g. OUT={out_dir / 'export'}")


# Config fields that describe where a config came from, not the architecture.
_NOT_ARCHITECTURE = ("transformers_version", "quantization_config", "architectures", "dtype", "torch_dtype",
                     "_name_or_path")


def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE and not k.startswith("_")}


def self_contained(model, model_cfg: dict, spec) -> dict:
    """The exported model needs nothing but its directory: LoRA adapters are merged into the LLM's
    weights (``model.lora`` becomes null), and pretrained sources (a hub id, a GGUF or .nemo file)
    are replaced by the architecture they had (``model.llm`` / ``model.encoder``), so loading an
    export never downloads or dequantizes anything. Changes ``model`` in place."""
    if model_cfg.get("lora"):
        spec.merge_lora(model)
        model_cfg["lora"] = None
    if model_cfg.get("pretrained_llm"):
        model_cfg["llm"], model_cfg["pretrained_llm"] = _architecture(spec.llm(model).config), None
    if model_cfg.get("pretrained_encoder"):
        from common.models.encoder import ChannelLayerNorm

        encoder = spec.speech_encoder(model)
        model_cfg["encoder"], model_cfg["pretrained_encoder"] = _architecture(encoder.config), None
        # A pretrained encoder keeps its BatchNorm; one exported by this project may have the LayerNorm.
        layer_norm = isinstance(encoder.layers[0].conv.norm, ChannelLayerNorm)
        model_cfg["encoder_conv_norm"] = "layer_norm" if layer_norm else "batch_norm"
        model_cfg.update(spec.export_settings(model) if spec.export_settings else {})
    return model_cfg


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Consolidate ``checkpoint`` into ``out_dir`` (written under a temporary name, then renamed)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(out_dir)
    model, tokenizer, cfg = load_model(checkpoint)  # a DCP directory: full tensors, read in this process
    meta, _ = read_checkpoint(checkpoint)
    model_cfg = self_contained(model, OmegaConf.to_container(cfg.model, resolve=True), spec_of(cfg))
    tmp = out_dir.with_name(f".partial-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "model_type": cfg.model.name,
        "recipe": cfg.get("recipe"),
        "source_checkpoint": str(checkpoint.resolve()),
        "global_step": meta.get("global_step"),
        "model": model_cfg,
        "data": {k: cfg.data[k] for k in DATA_KEYS if k in cfg.data},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(tmp)
    old = out_dir.with_name(f".replaced-{out_dir.name}")
    if out_dir.exists():  # an earlier export (check_out_dir): kept until the new one is in place
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file (DDP) or a sharded checkpoint directory (FSDP2/TP)")
    parser.add_argument("out_dir", help="the directory to write (new, empty, or an earlier export, which is replaced)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} ({WEIGHTS_FILE}, {CONFIG_FILE}, tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
