"""Model FLOPs of a training step, from the lengths of the utterances in its global batch (for MFU).

Counted per utterance on its real (unpadded) lengths, so padding is waste, not work:

* matrix multiplies and convolutions: 2 x multiply-adds (a ``Linear(i, o)`` on T positions: 2 T i o);
* attention scores and the weighted sum: 2 x 2 T^2 d per layer for T positions of width d (the
  full square, as PaLM's appendix B and torchtitan count it), plus FastConformer's relative-position
  term;
* training = forward + backward. The backward computes input gradients (same FLOPs as the forward,
  2x for attention) for every part with a trainable parameter in it or before it, and weight
  gradients (same FLOPs as the forward's matrix multiplies) for trainable weights only: a frozen
  LLM under LoRA pays its input gradients, not its weight gradients.

MFU = model FLOPs per second / (world size x the device's dense bf16 peak, :data:`PEAK_BF16_TFLOPS`).

Usage::

    flops = model_spec(cfg.model.name).flops(model)       # each model file has its formula (common.models.spec)
    step_flops = flops.training(batch["global_lengths"])  # [(feature frames, target tokens), ...]
    mfu = step_flops / step_s / (world_size * peak_flops(device))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name(), most specific first. A device not listed has no MFU.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),        # SXM (HBM3)
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s; None on CPUs and unlisted GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


@dataclass
class Part:
    """Forward FLOPs of one part of a model: matrix multiplies (``weights``) and attention."""

    weights: float = 0.0
    attention: float = 0.0

    def __iadd__(self, other: Part) -> Part:
        self.weights += other.weights
        self.attention += other.attention
        return self


def conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def fastconformer_forward(cfg, frames: int) -> tuple[Part, int]:
    """Forward FLOPs of a transformers ``ParakeetEncoder`` on ``frames`` log-mel frames, and its output frames."""
    d, f, m = cfg.hidden_size, cfg.intermediate_size, cfg.num_mel_bins
    c, k, s = cfg.subsampling_conv_channels, cfg.subsampling_conv_kernel_size, cfg.subsampling_conv_stride
    pad = (k - 1) // 2
    part = Part()
    t, freq = conv_out(frames, k, s, pad), conv_out(m, k, s, pad)
    part.weights += 2 * k * k * c * t * freq                         # Conv2d(1, c, k, stride)
    for _ in range(int(math.log2(cfg.subsampling_factor)) - 1):
        t, freq = conv_out(t, k, s, pad), conv_out(freq, k, s, pad)
        part.weights += 2 * k * k * c * t * freq + 2 * c * c * t * freq  # depthwise k x k, pointwise 1 x 1
    part.weights += 2 * t * (c * (m // s ** int(math.log2(cfg.subsampling_factor)))) * d  # to the model width
    per_frame = 2 * (2 * d * f) + 4 * d * d + 3 * d * d + d * cfg.conv_kernel_size  # 2 FFs, q k v o, convolution
    for _ in range(cfg.num_hidden_layers):
        part.weights += 2 * t * per_frame + 2 * (2 * t - 1) * d * d  # + relative position keys (2T-1 of them)
        part.attention += 2 * t * t * d * 2 + 2 * t * (2 * t - 1) * d  # scores + weighted sum, position scores
    return part, t


def decoder_lm_forward(cfg, positions: int, with_head: bool = True) -> Part:
    """Forward FLOPs of a transformers decoder-only LM (Llama/Qwen family) on one sequence."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    per_token = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * f  # q, o; k, v; gate, up, down
    part = Part(weights=2 * positions * cfg.num_hidden_layers * per_token,
                attention=cfg.num_hidden_layers * 2 * 2 * positions * positions * heads * head_dim)
    if with_head:
        part.weights += 2 * positions * d * cfg.vocab_size
    return part


def training_flops(parts: list[tuple[Part, float]]) -> float:
    """Forward + backward of parts in data-flow order, each with the share of its weights that trains."""
    total, grad_flows = 0.0, False
    for part, trainable_share in parts:
        total += part.weights + part.attention                       # forward
        grad_flows = grad_flows or trainable_share > 0
        if grad_flows:
            total += part.weights + 2 * part.attention               # input gradients
        total += trainable_share * part.weights                      # weight gradients
    return total


def trainable_share(modules) -> float:
    """Share of the weight-matrix parameters (2-D and up) of ``modules`` that train."""
    total = trains = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.dim() >= 2:
                total += p.numel()
                trains += p.numel() if p.requires_grad else 0
    return trains / total if total else 0.0


class ModelFlops:
    """Training FLOPs per global batch of a recipe's model (see the module docstring)."""

    def __init__(self, parts_of, trainable: list[float]):
        self.parts_of, self.trainable = parts_of, trainable
        self._by_lengths: dict[tuple[int, int], list[Part]] = {}  # runs every step: lengths repeat a lot

    def forward(self, lengths) -> float:
        return sum(p.weights + p.attention for p in self._parts(lengths))

    def training(self, lengths) -> float:
        return training_flops(list(zip(self._parts(lengths), self.trainable)))

    def _parts(self, lengths) -> list[Part]:
        totals = None
        for frames, tokens in lengths:
            key = (int(frames), int(tokens))
            parts = self._by_lengths.get(key) or self._by_lengths.setdefault(key, self.parts_of(*key))
            if totals is None:
                totals = [Part() for _ in parts]
            for total, part in zip(totals, parts):
                total += part
        return totals or []
