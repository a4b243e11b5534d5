"""The speech encoder shared by the recipes: transformers' FastConformer (``ParakeetEncoder``).

Usage::

    encoder = build_encoder(cfg.model)   # random init from cfg.model.encoder, or
                                         # cfg.model.pretrained_encoder: a Hugging Face Parakeet
                                         # directory or hub id, or a NeMo .nemo checkpoint
    out = encoder(input_features=feats, attention_mask=mask.long())

A ``.nemo`` file (what canary-1b-flash and the parakeet/FastConformer models ship as: a tar of
``model_config.yaml`` and ``model_weights.ckpt``) is converted in memory: NeMo's encoder settings
and weight names are mapped to transformers' ``ParakeetEncoder`` the way transformers' own
NeMo-to-HF converter maps them; the decoder, joint and preprocessor weights are left out.
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


def build_encoder(cfg) -> nn.Module:
    from omegaconf import OmegaConf
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    pretrained = cfg.get("pretrained_encoder")
    conv_norm = cfg.encoder_conv_norm
    if conv_norm == "auto":  # keep a pretrained encoder's BatchNorm (its statistics are weights too)
        conv_norm = "batch_norm" if pretrained else "layer_norm"
    if conv_norm not in ("layer_norm", "batch_norm"):
        raise ValueError(f"model.encoder_conv_norm must be auto, layer_norm or batch_norm, got {conv_norm!r}")
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
