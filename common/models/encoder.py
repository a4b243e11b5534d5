"""The speech encoder shared by the recipes: transformers' FastConformer (``ParakeetEncoder``).

Usage::

    encoder = build_encoder(cfg.model)   # random init from cfg.model.encoder, or
                                         # cfg.model.pretrained_encoder (local path or hub id)
    out = encoder(input_features=feats, attention_mask=mask.long())
"""

from __future__ import annotations

from torch import nn


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


def build_encoder(cfg) -> nn.Module:
    from omegaconf import OmegaConf
    from transformers import ParakeetEncoder, ParakeetEncoderConfig

    if cfg.get("pretrained_encoder"):
        encoder = ParakeetEncoder.from_pretrained(cfg.pretrained_encoder)
    else:
        enc_cfg = OmegaConf.to_container(cfg.encoder, resolve=True) if OmegaConf.is_config(cfg.encoder) else dict(cfg.encoder)
        encoder = ParakeetEncoder(ParakeetEncoderConfig(**enc_cfg))
        # HF initialises convolutions with std 0.02 (meant to be overwritten by pretrained weights);
        # from scratch that makes the subsampled frames nearly constant, and the LayerNorm after them
        # turns that into exploding gradients. PyTorch's fan-in initialisation trains well.
        for module in encoder.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                module.reset_parameters()
    if cfg.get("encoder_conv_norm", "layer_norm") == "layer_norm":
        for block in encoder.layers:
            block.conv.norm = ChannelLayerNorm(block.conv.norm.num_features)
    return encoder
