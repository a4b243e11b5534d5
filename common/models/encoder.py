"""The speech encoder shared by the recipes: transformers' FastConformer (``ParakeetEncoder``).

Usage::

    encoder = build_encoder(cfg.model)   # random init from cfg.model.encoder, or
                                         # cfg.model.pretrained_encoder: a Hugging Face Parakeet
                                         # directory or hub id, a NeMo .nemo checkpoint, or a
                                         # model this project exported (make export) of a recognizer
    out = encoder(input_features=feats, attention_mask=mask.long())

A ``.nemo`` file (what canary-1b-flash and the parakeet/FastConformer models ship as: a tar of
``model_config.yaml`` and ``model_weights.ckpt``) is converted in memory: NeMo's encoder settings
and weight names are mapped to transformers' ``ParakeetEncoder`` the way transformers' own
NeMo-to-HF converter maps them; the decoder, joint and preprocessor weights are left out.

A directory written by ``make export`` of an ``asr_ctc`` or ``salm`` model (``config.json`` +
``model.safetensors``) gives its encoder with the convolution norm it was trained with, and its CTC
head (:func:`exported_ctc_head`): how a SALM starts from an ``asr_ddp`` run, as NeMo's SALM
starts from a trained FastConformer.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import torch
from torch import nn

# NeMo encoder setting -> ParakeetEncoderConfig field.
NEMO_ENCODER_SETTINGS = {
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
    "feat_in": "num_mel_bins", "conv_kernel_size": "conv_kernel_size", "subsampling_factor": "subsampling_factor",
    "subsampling_conv_channels": "subsampling_conv_channels", "pos_emb_max_len": "max_position_embeddings",
    "dropout": "dropout", "dropout_emb": "dropout_positions", "dropout_att": "attention_dropout",
    "xscaling": "scale_input", "stochastic_depth_drop_prob": "layerdrop",
}
# NeMo weight-name pieces -> ParakeetEncoder's (applied in order to names under "encoder.").
NEMO_WEIGHT_NAMES = (
    (r"^pre_encode\.conv\.", "subsampling.layers."),
    (r"^pre_encode\.out\.", "subsampling.linear."),
    (r"^pos_enc\.", "encode_positions."),
    (r"\.conv\.batch_norm\.", ".conv.norm."),
    (r"\.linear_q\.", ".q_proj."), (r"\.linear_k\.", ".k_proj."), (r"\.linear_v\.", ".v_proj."),
    (r"\.linear_out\.", ".o_proj."), (r"\.linear_pos\.", ".relative_k_proj."),
    (r"\.pos_bias_u$", ".bias_u"), (r"\.pos_bias_v$", ".bias_v"),
)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of a (batch, channels, time) tensor.

    Replaces the conformer convolution module's BatchNorm: BatchNorm statistics depend on which
    utterances (and how much padding) share a batch, so results would change with the
    data-parallel layout; a per-frame norm does not.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def is_nemo_file(path) -> bool:
    return str(path).endswith(".nemo")


def _nemo_member(tar: tarfile.TarFile, name: str, path) -> tarfile.TarInfo:
    found = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == name]
    if not found:
        raise ValueError(f"model.pretrained_encoder {path}: no {name} inside this .nemo archive "
                         f"(has: {', '.join(Path(m.name).name for m in tar.getmembers() if m.isfile())})")
    return found[0]


def nemo_encoder_config(path) -> dict:
    """ParakeetEncoderConfig fields of a .nemo checkpoint's encoder (its model_config.yaml)."""
    import yaml

    with tarfile.open(path) as tar:
        nemo = yaml.safe_load(tar.extractfile(_nemo_member(tar, "model_config.yaml", path)))
    enc = nemo.get("encoder") or {}
    if enc.get("self_attention_model", "rel_pos") != "rel_pos" or enc.get("subsampling", "dw_striding") != "dw_striding":
        raise ValueError(f"model.pretrained_encoder {path}: encoder {enc.get('_target_')} with self_attention_model="
                         f"{enc.get('self_attention_model')!r}, subsampling={enc.get('subsampling')!r} is not a "
                         "FastConformer (rel_pos attention, dw_striding subsampling)")
    out = {"layerdrop": 0.0}  # NeMo's default: no stochastic depth
    out.update({ours: enc[theirs] for theirs, ours in NEMO_ENCODER_SETTINGS.items() if theirs in enc})
    out["intermediate_size"] = int(enc["d_model"] * enc.get("ff_expansion_factor", 4))
    if "use_bias" in enc:
        out["attention_bias"] = out["convolution_bias"] = bool(enc["use_bias"])
    return out


def nemo_encoder_state_dict(path) -> dict[str, torch.Tensor]:
    """The encoder weights of a .nemo checkpoint under ParakeetEncoder's names (read with weights_only)."""
    with tarfile.open(path) as tar:
        state = torch.load(tar.extractfile(_nemo_member(tar, "model_weights.ckpt", path)), map_location="cpu",
                           weights_only=True)
    out = {}
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue  # preprocessor, decoder, joint: not the encoder
        name = key[len("encoder."):]
        for pattern, replacement in NEMO_WEIGHT_NAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    return out


def load_nemo_encoder(path) -> nn.Module:
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.pretrained_encoder {path}: no such .nemo file")
    encoder = ParakeetEncoder(ParakeetEncoderConfig(**nemo_encoder_config(path)))
    state = nemo_encoder_state_dict(path)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    missing = [k for k in missing if not k.startswith("encode_positions.")]  # computed, not learned
    if missing or unexpected:
        raise ValueError(f"model.pretrained_encoder {path}: encoder weights do not match a ParakeetEncoder: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    encoder.load_state_dict(state, strict=False)
    return encoder


# Where an exported model of each kind keeps its encoder and CTC head (common.tools.export names).
EXPORTED_ENCODER = {"asr_ctc": ("ctc.encoder.", "ctc.ctc_head."), "salm": ("encoder.", "ctc_head.")}
# What make export writes (common.tools.export); declared here, the lowest layer that reads exports.
EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE, EXPORT_FORMAT = "config.json", "model.safetensors", "speech-recipes-export/1"


def exported_model_config(path) -> dict | None:
    """The ``config.json`` of a directory written by ``make export``, or None for any other path."""
    import json

    path = Path(path)
    if not ((path / EXPORT_CONFIG_FILE).is_file() and (path / EXPORT_WEIGHTS_FILE).is_file()):
        return None
    config = json.loads((path / EXPORT_CONFIG_FILE).read_text())
    if config.get("format") != EXPORT_FORMAT:
        return None  # e.g. a Hugging Face Parakeet directory
    if config.get("model_type") not in EXPORTED_ENCODER:
        raise ValueError(f"model.pretrained_encoder {path}: an exported {config.get('model_type')!r} model has no "
                         f"speech encoder to start from (exports of {', '.join(EXPORTED_ENCODER)} do)")
    return config


def _exported_weights(path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / EXPORT_WEIGHTS_FILE), framework="pt") as f:  # only these tensors are read
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _exported_conv_norm(config: dict) -> str:
    norm = config["model"].get("encoder_conv_norm", "auto")
    return "layer_norm" if norm == "auto" else norm  # export writes batch_norm where it kept a pretrained one


def load_exported_encoder(path, config: dict) -> nn.Module:
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    encoder = ParakeetEncoder(ParakeetEncoderConfig(**config["model"]["encoder"]))
    if _exported_conv_norm(config) == "layer_norm":
        for block in encoder.layers:
            block.conv.norm = ChannelLayerNorm(block.conv.norm.num_features)
    state = _exported_weights(path, EXPORTED_ENCODER[config["model_type"]][0])
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("encode_positions.")]  # computed, not learned
    if missing or unexpected:
        raise ValueError(f"model.pretrained_encoder {path}: its encoder weights do not match its config.json: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return encoder


def exported_ctc_head(path) -> tuple[nn.Linear, int] | None:
    """(the CTC head of an exported recognizer as a Linear layer, its blank id), or None where
    ``path`` is no export or the exported model has no CTC head. Its vocabulary is the exported
    model's tokenizer, not the one the new model trains with."""
    config = exported_model_config(path)
    if config is None:
        return None
    state = _exported_weights(path, EXPORTED_ENCODER[config["model_type"]][1])
    if "weight" not in state:
        return None
    weight = state["weight"].reshape(state["weight"].shape[0], -1)  # asr_ctc's head is a 1x1 Conv1d
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    with torch.no_grad():
        head.weight.copy_(weight)
        if "bias" in state:
            head.bias.copy_(state["bias"])
    return head, 0  # both asr_ctc (BPETokenizer) and the SALM's CTC head use id 0 (pad) as the blank


def check_exported_features(path, config: dict, data_cfg) -> None:
    """The new run must turn audio into features as the exported encoder was trained to read them."""
    theirs = config.get("data") or {}
    differ = {k: (v, data_cfg.get(k)) for k, v in theirs.items() if data_cfg.get(k) is not None and data_cfg.get(k) != v}
    if differ:
        raise ValueError(f"model.pretrained_encoder {path} was trained on other features than this run makes: "
                         + ", ".join(f"data.{k} {ours!r} here, {v!r} there" for k, (v, ours) in differ.items())
                         + "; set them as the export has them")


def build_encoder(cfg) -> nn.Module:
    from omegaconf import OmegaConf
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    pretrained = cfg.get("pretrained_encoder")
    exported = exported_model_config(pretrained) if pretrained else None
    conv_norm = cfg.encoder_conv_norm
    if conv_norm == "auto":  # keep a pretrained encoder's BatchNorm (its statistics are weights too)
        conv_norm = _exported_conv_norm(exported) if exported else "batch_norm" if pretrained else "layer_norm"
    if conv_norm not in ("layer_norm", "batch_norm"):
        raise ValueError(f"model.encoder_conv_norm must be auto, layer_norm or batch_norm, got {conv_norm!r}")
    if exported and conv_norm != _exported_conv_norm(exported):
        raise ValueError(f"model.encoder_conv_norm={conv_norm} differs from the {_exported_conv_norm(exported)} "
                         f"that model.pretrained_encoder {pretrained} was trained with; use model.encoder_conv_norm=auto")
    if exported:
        return load_exported_encoder(pretrained, exported)
    if pretrained and conv_norm == "layer_norm":
        raise ValueError(f"model.encoder_conv_norm=layer_norm would replace the BatchNorm weights of "
                         f"model.pretrained_encoder {pretrained}; use model.encoder_conv_norm=auto or batch_norm")
    if pretrained and is_nemo_file(pretrained):
        encoder = load_nemo_encoder(pretrained)
    elif pretrained:
        encoder = ParakeetEncoder.from_pretrained(pretrained)
    else:
        enc_cfg = OmegaConf.to_container(cfg.encoder, resolve=True) if OmegaConf.is_config(cfg.encoder) else dict(cfg.encoder)
        encoder = ParakeetEncoder(ParakeetEncoderConfig(**enc_cfg))
        # HF initialises convolutions with std 0.02 (meant to be overwritten by pretrained weights);
        # from scratch that makes the subsampled frames nearly constant, and the LayerNorm after them
        # turns that into exploding gradients. PyTorch's fan-in initialisation trains well.
        for module in encoder.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                module.reset_parameters()
    if conv_norm == "layer_norm":
        for block in encoder.layers:
            block.conv.norm = ChannelLayerNorm(block.conv.norm.num_features)
    return encoder


def encoder_activation_values(enc_config, batch, head_vocab: int | None = None) -> tuple[float, float]:
    """(values a FastConformer encoder keeps for backward on one rank, its output frames): the conv
    subsampling, ~19h+4i values per frame and layer with eager attention scores over one
    utterance, and a head over ``head_vocab`` outputs (logits kept twice in fp32 for the loss).
    ``batch``: a :class:`common.models.spec.RankBatch`."""
    from common.models.spec import FRAME_S

    h, i, sub = enc_config.hidden_size, enc_config.intermediate_size, enc_config.subsampling_factor
    t_enc, t_utt = batch.frames / sub, batch.utterance_s / FRAME_S / sub
    values = batch.frames * enc_config.num_mel_bins * enc_config.subsampling_conv_channels / 2  # conv subsampling
    values += batch.stack(t_enc, enc_config.num_hidden_layers, 19 * h + 4 * i, h,
                          2 * enc_config.num_attention_heads * t_enc * t_utt)
    if head_vocab:
        values += t_enc * head_vocab * (1 + 8 / batch.act_bytes)
    return values, t_enc
