"""Text-to-speech acoustic model: non-autoregressive, with its own learned text-to-frame alignment.

FastSpeech-style (Ren et al.): a text encoder, a duration per token, a length regulator that
repeats each token's state over its frames, and a decoder that predicts every log-mel frame at
once, built from transformers' FastSpeech2-Conformer blocks (encoder/decoder stacks, duration
predictor, post-net). FastSpeech needs durations; here they are learned the way Glow-TTS and
Grad-TTS learn them, so any (audio, text) corpus trains without an external aligner:

1. the encoder also predicts a mean log-mel frame per token, ``mu`` (the "prior");
2. monotonic alignment search (:mod:`common.models.alignment`) finds the monotonic token -> frame
   path under which the real frames fit ``mu`` best (with a weak prior for an even pace, which
   keeps the first steps from collapsing onto one token); its frame counts are the durations;
3. the prior loss pulls ``mu`` towards the frames the path gave it, so alignment and encoder
   sharpen each other; the duration predictor learns the counts (from the encoder's states,
   detached, as in Glow-TTS); the decoder learns the frames from the expanded states.

Each expanded frame also carries how far into its token it lies (``progress``), so a token whose
sound changes over its span (a word piece, a diphthong) can be rendered in one pass.

Synthesis runs the encoder, rounds the predicted durations (at least one frame per token) and
decodes: its length is decided before decoding, so it always ends on its own; a sentence whose
predicted length reaches ``max_frames_per_token`` x tokens is cut there and counted.

The loss is a *sum* over the batch's valid frames, normalized by the global batch's frame count in
:class:`common.module.TrainingModule`, so DDP and one process agree step for step:

    sum over frames of (L1 before post-net + L1 after post-net + prior) / num_mel_bins
    + duration_loss_weight x sum over tokens of (log(1 + predicted frames) - log(1 + aligned frames))^2
    + with model.alignment=attention, the aligner's forward-sum loss (common.models.alignment), whose
      log attention the search then runs over instead of the mean frames

Usage::

    model = FastSpeechTTS(cfg.model, BPETokenizer.build(texts, vocab_size=128), num_mel_bins=64)
    loss_sum, num_frames, parts = model(batch)  # batch["target_ids"]: text, batch["input_features"]: mel
    mels = model.synthesize(["alpha bravo"])    # list of (frames, num_mel_bins) tensors
    model.last_synthesis                        # {"sentences": 1, "hit_frame_limit": 0}
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from common.flops import ModelFlops, Part, trainable_share
from common.models.alignment import (
    AttentionAligner,
    beta_binomial_log_prior,
    diagonal_log_prior,
    expand,
    forward_sum_loss,
    frame_log_likelihood,
    monotonic_alignment_search,
)
from common.models.encoder import ChannelLayerNorm
from common.models.spec import FRAME_S, TEXT_TOKENS_PER_S, LossSums, ModelSpec, register, tts_tokenizer
from common.parallel.spec import ParallelHooks

PROGRESS_BINS = 16  # resolution of "how far into its token a frame lies"


def _within(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) bool: True at the first ``lengths[i]`` positions of row i (tokens or frames)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _replace_batch_norms(module: nn.Module) -> None:
    """BatchNorm makes a frame's output depend on the rest of the batch (and on the data-parallel
    layout); the per-frame ChannelLayerNorm does not."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, ChannelLayerNorm(child.num_features))
        else:
            _replace_batch_norms(child)


def _wide_convs(*modules: nn.Module) -> list[nn.Conv1d]:
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1]


@contextmanager
def _zero_padding(convs: list[nn.Conv1d], mask: torch.Tensor):
    """Inside: every convolution reads zeros past each sequence's end, as it would alone.

    Attention masks padded positions, but a convolution at a sequence's last positions also reads
    the padded ones, which hold whatever the layers made of them; the outputs then depend on how
    long the batch's longest sequence is, i.e. on the batch and the data-parallel layout.
    """
    keep = mask[:, None, :]

    def zero(_module, args):
        return (args[0] * keep.to(args[0].dtype), *args[1:])

    handles = [conv.register_forward_pre_hook(zero) for conv in convs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FastSpeechTTS(nn.Module):
    def __init__(self, cfg, tokenizer, num_mel_bins: int):
        super().__init__()
        from omegaconf import OmegaConf
        from transformers import FastSpeech2ConformerConfig
        from transformers.models.fastspeech2_conformer import modeling_fastspeech2_conformer as fs2

        arch = OmegaConf.to_container(cfg.fastspeech, resolve=True) if OmegaConf.is_config(cfg.fastspeech) \
            else dict(cfg.fastspeech)
        if tokenizer.pad_id != 0:
            raise ValueError(f"FastSpeechTTS needs pad id 0 (the encoder embedding's padding_idx), got {tokenizer.pad_id}")
        self.config = FastSpeech2ConformerConfig(vocab_size=tokenizer.vocab_size, num_mel_bins=num_mel_bins,
                                                 reduction_factor=1, **arch)
        c = self.config
        self.encoder = fs2.FastSpeech2ConformerEncoder(c, c.encoder_config, use_encoder_input_layer=True)
        self.alignment = str(cfg.alignment)
        if self.alignment not in ("mean_frame", "attention"):
            raise ValueError(f"model.alignment: {self.alignment!r}; expected mean_frame or attention")
        # mu: the mean frame of each token. It finds the durations (mean_frame) and, with either
        # alignment, its loss is the encoder's direct target: without it, an encoder trained only
        # through the decoder forgot the tokens on English (recipes/tts_ddp/README.md).
        self.to_prior = nn.Linear(c.hidden_size, num_mel_bins)
        if self.alignment == "attention":
            self.aligner = AttentionAligner(tokenizer.vocab_size, num_mel_bins, pad_id=tokenizer.pad_id)
        self.duration_predictor = fs2.FastSpeech2ConformerDurationPredictor(c)
        self.progress = nn.Embedding(PROGRESS_BINS, c.hidden_size)
        self.decoder = fs2.FastSpeech2ConformerEncoder(c, c.decoder_config, use_encoder_input_layer=False)
        self.postnet = fs2.FastSpeech2ConformerSpeechDecoderPostnet(c)  # frames out + convolutional refinement
        _replace_batch_norms(self)
        for module in self.modules():
            # Created uninitialized (torch.Tensor(n)) and set only by FastSpeech2ConformerPreTrainedModel's
            # init, which these blocks do not go through: initialize them as it does.
            if isinstance(module, fs2.FastSpeech2ConformerAttention):
                nn.init.xavier_uniform_(module.pos_bias_u)
                nn.init.xavier_uniform_(module.pos_bias_v)
        self._text_convs = _wide_convs(self.encoder, self.duration_predictor)  # both read token sequences
        self._frame_convs = _wide_convs(self.decoder, self.postnet)
        self.pad_id = tokenizer.pad_id
        self.tokenizer = tokenizer
        self.num_mel_bins = num_mel_bins
        self.duration_loss_weight = float(cfg.duration_loss_weight)
        self.alignment_prior_sigma = float(cfg.alignment_prior_sigma)
        self.max_frames_per_token = float(cfg.max_frames_per_token)
        self.parallel_hooks = ParallelHooks()
        self.last_synthesis: dict[str, int] = {}

    def encode(self, text: torch.Tensor, text_lens: torch.Tensor) -> torch.Tensor:
        mask = _within(text_lens, text.shape[1])
        with _zero_padding(self._text_convs, mask):
            return self.encoder(text, mask[:, None, :].long(), return_dict=True).last_hidden_state * mask[..., None]

    def decode(self, frames: torch.Tensor, progress: torch.Tensor, durations: torch.Tensor):
        """Mel frames (before, after the post-net) and their mask from token states already expanded
        over their ``durations`` (:func:`expand`: ``frames``, ``progress``)."""
        frame_mask = _within(durations.sum(1), frames.shape[1])
        bins = (progress * PROGRESS_BINS).long().clamp(max=PROGRESS_BINS - 1)
        hidden = frames + self.progress(bins) * frame_mask[..., None]
        with _zero_padding(self._frame_convs, frame_mask):
            hidden = self.decoder(hidden, frame_mask[:, None, :].long(), return_dict=True).last_hidden_state
            before, after = self.postnet(hidden * frame_mask[..., None])
        return before, after, frame_mask

    def forward(self, batch) -> LossSums:
        text, text_lens = batch["target_ids"], batch["target_lens"]
        mel, frame_mask = batch["input_features"], batch["feature_mask"]
        frame_lens = frame_mask.sum(1)
        states = self.encode(text, text_lens)
        valid = frame_mask[..., None].float()
        mu = self.to_prior(states)
        if self.alignment == "attention":
            log_prior = beta_binomial_log_prior(text_lens, frame_lens, text.shape[1], mel.shape[1])
            log_attn = self.aligner(mel, text, text_lens, frame_lens, log_prior)
            # Per frame, like the other sums (the search's hard path comes from the same attention).
            align_sum = forward_sum_loss(log_attn, text_lens, frame_lens)
            durations = monotonic_alignment_search(log_attn.detach(), text_lens, frame_lens)
        else:
            # Per mel value, so that the prior's scale does not depend on the number of bins.
            fit = frame_log_likelihood(mel, mu.detach()) / mel.shape[-1]
            fit = fit + diagonal_log_prior(text_lens, frame_lens, text.shape[1], mel.shape[1], self.alignment_prior_sigma)
            durations = monotonic_alignment_search(fit, text_lens, frame_lens)
            align_sum = 0.0
        # One expansion of the states and, beside them, the prior means (same gather).
        both, progress = expand(torch.cat([states, mu], -1), durations, mel.shape[1])
        frames, mu_frames = both.split([states.shape[-1], mu.shape[-1]], dim=-1)
        # Prior: each frame against the mean of the token the alignment gave it.
        align_sum = align_sum + (0.5 * (mel - mu_frames) ** 2 * valid).sum() / mel.shape[-1]
        # Durations: log(1 + frames) per token, from the encoder's states without moving them. Not
        # weighted by frames: that would pull every token towards its longest occurrences.
        log_pred = self.log_durations(states.detach(), text_lens)
        target = torch.log1p(durations.float())
        duration_sum = ((log_pred - target) ** 2 * _within(text_lens, text.shape[1])).sum()
        before, after, _ = self.decode(frames, progress, durations)
        l1_before = ((before - mel).abs() * valid).sum()
        l1_after = ((after - mel).abs() * valid).sum()
        bins = mel.shape[-1]
        loss_sum = (l1_before + l1_after) / bins + align_sum + self.duration_loss_weight * duration_sum
        num_frames = batch["num_frames"] if "num_frames" in batch else int(frame_lens.sum())  # no host sync
        return LossSums(loss_sum, num_frames, {"mel_loss": (l1_after.detach() / bins, num_frames),
                                               "duration_loss": (duration_sum.detach(), num_frames)})

    def log_durations(self, states: torch.Tensor, text_lens: torch.Tensor) -> torch.Tensor:
        """log(1 + frames) per token, (batch, tokens), in training and in eval mode alike.

        transformers' predictor returns rounded frame counts from its forward in eval mode (so
        validation would compare counts with logs); its layers are called directly instead.
        """
        mask = _within(text_lens, states.shape[1])
        hidden = states.transpose(1, -1)
        with _zero_padding(self._text_convs, mask):
            for layer in self.duration_predictor.conv_layers:
                hidden = layer(hidden)
        return self.duration_predictor.linear(hidden.transpose(1, -1)).squeeze(-1)

    def predict_durations(self, states: torch.Tensor, text_lens: torch.Tensor) -> torch.Tensor:
        """Frames per token, at least one on every real token, 0 on padding."""
        frames = torch.round(torch.expm1(self.log_durations(states, text_lens))).long().clamp(min=1)
        return frames * _within(text_lens, states.shape[1])

    @torch.no_grad()
    def synthesize(self, texts: list[str]) -> list[torch.Tensor]:
        """Log-mel spectrograms (frames, bins) for each text, all sentences in one batch."""
        device = self.progress.weight.device
        ids = [self.tokenizer.encode(t) or [self.tokenizer.unk_id] for t in texts]
        text_lens = torch.tensor([len(i) for i in ids], device=device)
        text = torch.zeros(len(ids), int(text_lens.max()), dtype=torch.long, device=device)
        for row, seq in enumerate(ids):
            text[row, : len(seq)] = torch.tensor(seq, device=device)
        states = self.encode(text, text_lens)
        durations = self.predict_durations(states, text_lens)
        limit = (text_lens.float() * self.max_frames_per_token).long()
        lengths = durations.sum(1)
        hit_limit = lengths > limit
        lengths = torch.minimum(lengths, limit)
        _, after, _ = self.decode(*expand(states, durations, int(durations.sum(1).max())), durations)
        self.last_synthesis = {"sentences": len(texts), "hit_frame_limit": int(hit_limit.sum()),
                               "too_short": int((lengths < text_lens).sum())}  # fewer frames than tokens
        return [after[row, : int(n)] for row, n in enumerate(lengths)]


def fastspeech_flops(model: FastSpeechTTS) -> ModelFlops:
    c = model.config
    d, mel, k = c.hidden_size, c.num_mel_bins, c.positionwise_conv_kernel_size

    def conformer(positions: int, layers: int, units: int, conv_kernel: int) -> Part:
        # q k v o, relative-position keys (2T-1), two k-wide feed-forward convolutions, the
        # convolution module (pointwise d -> 2d, depthwise, pointwise d -> d)
        per_position = 4 * d * d + 2 * k * d * units + 3 * d * d + d * conv_kernel
        return Part(weights=layers * 2 * (positions * per_position + (2 * positions - 1) * d * d),
                    attention=layers * (2 * 2 * positions * positions * d + 2 * positions * (2 * positions - 1) * d))

    def parts_of(frames: int, tokens: int) -> list[Part]:
        encoder = conformer(tokens, c.encoder_layers, c.encoder_linear_units, c.encoder_kernel_size)
        encoder.weights += 2 * tokens * d * mel  # the prior (mu); alignment search is not a matmul
        if model.alignment == "attention":  # the aligner's key and query convolutions and its (tokens x frames) distances
            a = model.aligner.keys[-1].out_channels
            encoder.weights += 2 * tokens * (3 * a * 2 * a + 2 * a * a)
            encoder.weights += 2 * frames * (3 * mel * 2 * mel + 2 * mel * mel + mel * a) + 2 * tokens * frames * a
        p_chans, p_k = c.duration_predictor_channels, c.duration_predictor_kernel_size
        encoder.weights += 2 * tokens * p_k * (d * p_chans + p_chans * p_chans * (c.duration_predictor_layers - 1))
        if model.alignment == "mean_frame":
            encoder.weights += 2 * tokens * frames * mel  # the likelihood of every frame under every token
        decoder = conformer(frames, c.decoder_layers, c.decoder_linear_units, c.decoder_kernel_size)
        units, post_k, post_layers = c.speech_decoder_postnet_units, c.speech_decoder_postnet_kernel, \
            c.speech_decoder_postnet_layers
        convs = mel * units + units * units * max(post_layers - 2, 0) + units * mel
        decoder.weights += 2 * frames * d * mel + 2 * frames * post_k * convs
        return [encoder, decoder]

    aligner = [model.aligner] if model.alignment == "attention" else []
    return ModelFlops(parts_of, [trainable_share([model.encoder, model.to_prior, *aligner, model.duration_predictor]),
                                 trainable_share([model.progress, model.decoder, model.postnet])])


def fastspeech_activation_values(cfg, model: FastSpeechTTS, batch) -> float:
    """19h+2i values per position and layer of the Conformer stacks (tokens, then frames), the
    frame likelihoods under every token (alignment search, no grad) and the post-net."""
    c = model.config
    h, text = c.hidden_size, batch.text_tokens
    text_utt, frames_utt = TEXT_TOKENS_PER_S * batch.utterance_s, batch.utterance_s / FRAME_S
    values = batch.stack(text, c.encoder_layers, 19 * h + 2 * c.encoder_linear_units, h,
                         2 * c.encoder_num_attention_heads * text * text_utt)
    values += text * frames_utt * 2
    values += batch.stack(batch.frames, c.decoder_layers, 19 * h + 2 * c.decoder_linear_units, h,
                          2 * c.decoder_num_attention_heads * batch.frames * frames_utt)
    values += batch.frames * (c.speech_decoder_postnet_units * c.speech_decoder_postnet_layers * 3 + 6 * c.num_mel_bins)
    return values


SPEC = register(ModelSpec(
    name="tts_fastspeech", build=lambda cfg, tokenizer: FastSpeechTTS(cfg.model, tokenizer, num_mel_bins=cfg.data.num_mel_bins),
    tokenizer=tts_tokenizer, flops=fastspeech_flops, activation_values=fastspeech_activation_values,
    loss_normalizer="global_num_frames",  # loss sums are per mel frame
    # Reported besides the total loss, per frame like it: |predicted - target| log-mel after the
    # post-net (per value), and the tokens' squared log-duration errors.
    validation_metrics=("mel_loss", "duration_loss"), synthesizes=True,
    legacy_settings={"model.duration_loss_weight": 1.0, "model.alignment_prior_sigma": 0.2,
                     "model.max_frames_per_token": 60.0, "model.alignment": "mean_frame",
                     "model.tokenizer.phonemes": None},
))
