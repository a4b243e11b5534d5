"""Text-to-speech acoustic model: transformers' SpeechT5 (text encoder -> autoregressive mel decoder).

Why SpeechT5: it is a complete, trainable TTS model in transformers (text pre-net, transformer
encoder-decoder, speech pre-net, post-net, stop-token head) that learns its own text-to-frame
alignment through cross-attention, so it needs no external durations; a guided-attention loss
makes that alignment form quickly from random init. Predicts raw log-mel frames
(``data.feature_normalization: none``), which :mod:`common.models.vocoder` turns into audio.

The loss is a *sum* over this batch's valid mel frames, normalized by the global batch's frame
count in :class:`common.module.TrainingModule`, so DDP and one process agree step for step:

    per frame: (L1(before post-net) + L1(after post-net)) / num_mel_bins + BCE(stop) [+ guided attention]

Usage::

    model = SpeechT5TTS(cfg.model, BPETokenizer.build(texts, vocab_size=1), num_mel_bins=64)
    loss_sum, num_frames, parts = model(batch)  # batch["target_ids"]: text, batch["input_features"]: mel
    mels = model.synthesize(["alpha bravo"])   # list of (frames, num_mel_bins) tensors
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.flops import ModelFlops, Part, trainable_share
from common.models.encoder import ChannelLayerNorm
from common.models.spec import FRAME_S, TEXT_TOKENS_PER_S, LossSums, ModelSpec, bpe_tokenizer, register
from common.parallel.spec import ParallelHooks


def guided_attention_weights(text_lens, frame_lens, max_text: int, max_frames: int, sigma: float):
    """W[b, t, n] = 1 - exp(-(n/N - t/T)^2 / (2 sigma^2)): small near the diagonal, 0 off the valid area."""
    n = torch.arange(max_text, device=text_lens.device)[None, None, :] / text_lens[:, None, None]
    t = torch.arange(max_frames, device=text_lens.device)[None, :, None] / frame_lens[:, None, None]
    weights = 1 - torch.exp(-((n - t) ** 2) / (2 * sigma**2))
    valid = (n < 1) & (t < 1)
    return weights * valid


def aligned_attention_weights(token_end_frames, text_lens, frame_lens, num_steps: int, r: int, sigma_frames: float):
    """Like the diagonal prior, but around each token's true frames (from word alignments).

    W[b, step, n] grows with the distance (in frames) from the step's frames to token n's span:
    0 inside the span, ~1 a few frames away.
    """
    ends = token_end_frames.float()  # (b, text); padding holds a huge value
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    centre = (torch.arange(num_steps, device=ends.device).float() * r + (r - 1) / 2)[None, :, None]
    distance = (starts[:, None, :] - centre).clamp(min=0) + (centre - ends[:, None, :] + 1).clamp(min=0)
    weights = 1 - torch.exp(-(distance**2) / (2 * sigma_frames**2))
    n = torch.arange(ends.shape[1], device=ends.device)[None, None, :]
    steps = torch.arange(num_steps, device=ends.device)[None, :, None]
    valid = (n < text_lens[:, None, None]) & (steps * r < frame_lens[:, None, None])
    return weights * valid


class SpeechT5TTS(nn.Module):
    def __init__(self, cfg, tokenizer, num_mel_bins: int):
        super().__init__()
        from omegaconf import OmegaConf
        from transformers import SpeechT5Config, SpeechT5ForTextToSpeech

        arch = OmegaConf.to_container(cfg.speecht5, resolve=True) if OmegaConf.is_config(cfg.speecht5) else dict(cfg.speecht5)
        self.config = SpeechT5Config(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                     num_mel_bins=num_mel_bins, use_guided_attention_loss=False, **arch)
        self.tts = SpeechT5ForTextToSpeech(self.config)
        from transformers.models.speecht5.modeling_speecht5 import shift_spectrograms_right

        self._shift_right = shift_spectrograms_right  # teacher forcing: decoder input = previous step's frame
        # The post-net's BatchNorm makes a frame's output depend on the rest of the batch (and on
        # the data-parallel layout); a per-frame LayerNorm does not.
        for layer in self.tts.speech_decoder_postnet.layers:
            layer.batch_norm = ChannelLayerNorm(layer.batch_norm.num_features)
        self.pad_id = tokenizer.pad_id
        self.tokenizer = tokenizer
        self.r = self.config.reduction_factor
        self.guided_attention_weight = float(cfg.guided_attention_weight)
        self.guided_attention_sigma = float(cfg.guided_attention_sigma)
        self.max_frames_per_token = float(cfg.max_frames_per_token)
        self.stop_threshold = float(cfg.stop_threshold)
        # Single speaker: SpeechT5's decoder pre-net always concatenates a speaker embedding.
        self.register_buffer("speaker", torch.zeros(1, self.config.speaker_embedding_dim), persistent=False)
        self.parallel_hooks = ParallelHooks()
        self.last_synthesis: dict[str, int] = {}  # sentences, hit_frame_limit of the last synthesize()

    def forward(self, batch) -> LossSums:
        text, text_lens = batch["target_ids"], batch["target_lens"]
        text_mask = (torch.arange(text.shape[1], device=text.device)[None, :] < text_lens[:, None]).long()
        mel, frame_mask = batch["input_features"], batch["feature_mask"]
        pad = (-mel.shape[1]) % self.r  # whole decoder steps of r frames
        mel, frame_mask = F.pad(mel, (0, 0, 0, pad)), F.pad(frame_mask, (0, pad))
        decoder_in, decoder_mask = self._shift_right(mel, self.r, frame_mask.long())
        speaker = self.speaker.expand(mel.shape[0], -1)
        out = self.tts.speecht5(
            input_values=text, attention_mask=text_mask, decoder_input_values=decoder_in,
            decoder_attention_mask=decoder_mask, speaker_embeddings=speaker,
            output_attentions=self.guided_attention_weight > 0, return_dict=True,
        )
        before, after, stop_logits = self.tts.speech_decoder_postnet(out.last_hidden_state)
        valid = frame_mask[..., None].float()
        l1_before = ((before - mel).abs() * valid).sum()
        l1_after = ((after - mel).abs() * valid).sum()
        # Stop target: 1 on each utterance's last frame (predicted from that frame's state).
        frame_lens = frame_mask.sum(1)
        stop_target = F.one_hot(frame_lens - 1, mel.shape[1]).float()
        bce = F.binary_cross_entropy_with_logits(stop_logits, stop_target, reduction="none",
                                                 pos_weight=torch.tensor(5.0, device=mel.device))
        bce_sum = (bce * frame_mask).sum()
        loss_sum = (l1_before + l1_after) / mel.shape[-1] + bce_sum
        if self.guided_attention_weight > 0:
            steps = decoder_mask.sum(1)
            attn = torch.stack([a[:, :2] for a in out.cross_attentions], 1)  # (b, layers, 2 heads, steps, text)
            if "token_end_frames" in batch:  # true word timings: attention learns the alignment directly
                w = aligned_attention_weights(batch["token_end_frames"], text_lens, frame_lens, decoder_in.shape[1],
                                              self.r, sigma_frames=2.0)
            else:
                w = guided_attention_weights(text_lens, steps, text.shape[1], decoder_in.shape[1],
                                             self.guided_attention_sigma)
            # Per decoder step (r frames), averaged over the guided heads.
            ga = (attn * w[:, None, None]).sum() / (attn.shape[1] * attn.shape[2]) * self.r
            loss_sum = loss_sum + self.guided_attention_weight * ga
        num_frames = batch["num_frames"] if "num_frames" in batch else int(frame_lens.sum())  # no host sync
        # Sums over this batch's frames (common.step.training_loss divides by the global frame count).
        return LossSums(loss_sum, num_frames, {"mel_loss": (l1_after.detach() / mel.shape[-1], num_frames),
                                               "stop_loss": (bce_sum.detach(), num_frames)})

    @torch.no_grad()
    def synthesize(self, texts: list[str]) -> list[torch.Tensor]:
        """Log-mel spectrograms (frames, bins) for each text, decoded until the stop token."""
        out, hit_limit, too_short = [], 0, 0
        for text in texts:
            ids = torch.tensor([self.tokenizer.encode(text)], device=self.speaker.device)
            ratio = self.max_frames_per_token  # frames allowed per input token
            mel = self.tts.generate_speech(ids, self.speaker, threshold=self.stop_threshold, maxlenratio=ratio)
            # generate_speech stops at the stop token or after int(tokens x ratio / r) decoder steps
            hit_limit += mel.shape[0] >= int(ids.shape[1] * ratio / self.r) * self.r
            too_short += mel.shape[0] < ids.shape[1]  # fewer frames than tokens: stopped early
            out.append(mel)
        self.last_synthesis = {"sentences": len(texts), "hit_frame_limit": int(hit_limit), "too_short": int(too_short)}
        return out


def speecht5_flops(model: SpeechT5TTS) -> ModelFlops:
    c = model.config
    d, r, mel = c.hidden_size, c.reduction_factor, c.num_mel_bins
    units, k = c.speech_decoder_postnet_units, c.speech_decoder_postnet_kernel
    prenet_units = c.speech_decoder_prenet_units

    def parts_of(frames: int, tokens: int) -> list[Part]:
        steps = math.ceil(frames / r)
        encoder = Part(weights=2 * tokens * c.encoder_layers * (4 * d * d + 2 * d * c.encoder_ffn_dim),
                       attention=c.encoder_layers * 2 * 2 * tokens * tokens * d)
        prenet = 2 * steps * (mel * prenet_units + prenet_units * prenet_units * (c.speech_decoder_prenet_layers - 1)
                              + prenet_units * d + (d + c.speaker_embedding_dim) * d)
        per_step = 4 * d * d + 2 * d * d + 2 * d * c.decoder_ffn_dim  # self q k v o, cross q o, FF
        decoder = Part(weights=prenet + 2 * c.decoder_layers * (steps * per_step + tokens * 2 * d * d),  # cross k v
                       attention=c.decoder_layers * 2 * 2 * (steps * steps + steps * tokens) * d)
        post_layers = c.speech_decoder_postnet_layers
        convs = mel * units + units * units * max(post_layers - 2, 0) + units * mel
        decoder.weights += 2 * steps * (d * mel * r + d * r) + 2 * steps * r * k * convs
        return [encoder, decoder]

    return ModelFlops(parts_of, [trainable_share([model.tts.speecht5.encoder]), trainable_share([model.tts])])


def speecht5_activation_values(cfg, model: SpeechT5TTS, batch) -> float:
    """8h+2i / 12h+2i values per position and layer of the encoder / decoder (decoder steps of
    ``reduction_factor`` frames, cross-attention to the text) and the post-net."""
    c = model.config
    h, text = c.hidden_size, batch.text_tokens
    steps, text_utt = batch.frames / c.reduction_factor, TEXT_TOKENS_PER_S * batch.utterance_s
    steps_utt = batch.utterance_s / FRAME_S / c.reduction_factor
    values = batch.stack(text, c.encoder_layers, 8 * h + 2 * c.encoder_ffn_dim, h,
                         2 * c.encoder_attention_heads * text * text_utt)
    values += batch.stack(steps, c.decoder_layers, 12 * h + 2 * c.decoder_ffn_dim, h,
                          2 * c.decoder_attention_heads * steps * (steps_utt + text_utt))
    values += batch.frames * c.speech_decoder_postnet_units * c.speech_decoder_postnet_layers * 3
    return values


SPEC = register(ModelSpec(
    name="tts_speecht5", build=lambda cfg, tokenizer: SpeechT5TTS(cfg.model, tokenizer, num_mel_bins=cfg.data.num_mel_bins),
    tokenizer=bpe_tokenizer, flops=speecht5_flops, activation_values=speecht5_activation_values,
    loss_normalizer="global_num_frames",  # loss sums are per mel frame
    # Per-frame means reported besides the total loss: |predicted - target| log-mel after the
    # post-net (per value), and the stop-token BCE.
    validation_metrics=("mel_loss", "stop_loss"), synthesizes=True,
    legacy_settings={"model.guided_attention_weight": 1.0, "model.guided_attention_sigma": 0.4,
                     "model.max_frames_per_token": 12.0, "model.stop_threshold": 0.5},
))
