"""Monotonic alignment between text tokens and audio frames, learned without external durations.

:func:`monotonic_alignment_search` is Glow-TTS's MAS (Kim et al., 2020): given how well each
frame fits each token (a log-likelihood), the single monotonic path that maps every frame to one
token, visits every token at least once and never goes back, with the highest total fit. Its
per-token frame counts are the durations a duration predictor learns and a length regulator
uses (:func:`expand`). Batched over utterances and tokens; the dynamic programme steps over frames.

The search alone has a degenerate start: while the token means are still alike, every path fits
about equally, and the token that wins the first ties absorbs most frames, which makes its mean
the average frame, which makes it win again. :func:`diagonal_log_prior` (the role of RAD-TTS's and
NeMo FastPitch's beta-binomial prior) breaks those ties towards an even pace through the text;
a fitted model's likelihood outweighs it wherever the pace is not even.

Usage::

    log_p = frame_log_likelihood(mel, mu) / bins + diagonal_log_prior(text_lens, frame_lens, 8, 300, 0.2)
    durations = monotonic_alignment_search(log_p, text_lens, frame_lens)   # (batch, tokens), sum = frames
    frames = expand(token_states, durations, max_frames)      # (batch, frames, dim)
"""

from __future__ import annotations

import torch


def frame_log_likelihood(mel: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """log N(mel_t; mu_j, I) up to a constant, (batch, tokens, frames), from mel (b, frames, bins), mu (b, tokens, bins)."""
    cross = torch.bmm(mu, mel.transpose(1, 2))  # (b, tokens, frames)
    return cross - 0.5 * (mu**2).sum(-1, keepdim=True) - 0.5 * (mel**2).sum(-1)[:, None, :]


def diagonal_log_prior(text_lens, frame_lens, n_text: int, n_frames: int, sigma: float) -> torch.Tensor:
    """(batch, tokens, frames): -(t/T - j/N)^2 / (2 sigma^2) for frame t of T and token j of N (centres)."""
    j = (torch.arange(n_text, device=text_lens.device)[None, :, None] + 0.5) / text_lens[:, None, None]
    t = (torch.arange(n_frames, device=text_lens.device)[None, None, :] + 0.5) / frame_lens[:, None, None]
    return -((t - j) ** 2) / (2 * sigma**2)


def beta_binomial_log_prior(text_lens, frame_lens, n_text: int, n_frames: int, scaling: float = 1.0) -> torch.Tensor:
    """(batch, tokens, frames): log P(token j | frame t), a beta-binomial over the N tokens centred on
    t/T (RAD-TTS's and NeMo FastPitch's prior, ``scaling`` 1 as theirs). As theirs, it has N trials, of
    which tokens take outcomes 0..N-1: towards an utterance's last frames part of the mass sits on
    outcome N, which no token takes; the last token still gets most of what is left.

    Its width grows as sqrt(N) tokens, not as a fixed share of the utterance: a 150-character English
    sentence gets a band of about +-6 characters, where a prior of 0.2 x the utterance would allow
    +-30 and lets a peaked attention send half the frames to the first character.
    """
    device = text_lens.device
    n = text_lens.double()[:, None, None]                                       # N trials
    frames = frame_lens.double()[:, None, None]
    k = torch.minimum(torch.arange(n_text, device=device, dtype=torch.float64)[None, :, None], n)  # padding: clamped
    t = torch.minimum(torch.arange(1, n_frames + 1, device=device, dtype=torch.float64)[None, None, :], frames)
    a, b = scaling * t, scaling * (frames + 1 - t)

    def log_beta(x, y):
        return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)

    log_choose = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return (log_choose + log_beta(k + a, n - k + b) - log_beta(a, b)).float()


@torch.no_grad()
def monotonic_alignment_search(log_p: torch.Tensor, text_lens: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
    """Durations (batch, tokens), long: frames per token on the best monotonic path; 0 on padding.

    Every token of an utterance gets at least one frame, so an utterance needs at least as many
    frames as tokens (the caller checks; the data checks drop such items).
    """
    b, n_text, n_frames = log_p.shape
    device = log_p.device
    neg = torch.finfo(torch.float32).min / 4
    tokens = torch.arange(n_text, device=device)[None, :]
    valid_token = tokens < text_lens[:, None]
    lp = log_p.float().masked_fill(~valid_token[:, :, None], neg).transpose(1, 2).contiguous()  # (b, frames, tokens)
    # score[b, t, j]: best path ending at token j after frame t. Frame 0 belongs to token 0.
    score = torch.full((b, n_frames, n_text), neg, device=device)
    score[:, 0, 0] = lp[:, 0, 0]
    for t in range(1, n_frames):
        prev = score[:, t - 1]
        advance = torch.cat([torch.full_like(prev[:, :1], neg), prev[:, :-1]], dim=1)
        score[:, t] = lp[:, t] + torch.maximum(prev, advance)
    # Back from each utterance's last token at its last frame.
    rows = torch.arange(b, device=device)
    j = text_lens - 1
    durations = torch.zeros(b, n_text, dtype=torch.long, device=device)
    for t in range(n_frames - 1, -1, -1):
        active = t < frame_lens
        durations[rows, j] += active.long()
        if t == 0:
            break
        stay, move = score[rows, t - 1, j], score[rows, t - 1, (j - 1).clamp(min=0)]
        j = j - (active & (j > 0) & ((move > stay) | (j >= t))).long()
    return durations


def expand(states: torch.Tensor, durations: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The length regulator: token states repeated over their frames, batched.

    Returns (frames (batch, max_frames, dim), progress (batch, max_frames) in [0, 1): how far into its
    token each frame lies; frames past an utterance's end are zeros with progress 0.
    """
    ends = durations.cumsum(1)  # (b, tokens)
    t = torch.arange(max_frames, device=states.device)[None, :]
    index = torch.searchsorted(ends, t.expand(states.shape[0], -1).contiguous(), right=True)  # token of each frame
    inside = index < durations.shape[1]
    index = index.clamp(max=durations.shape[1] - 1)
    inside &= t < ends[:, -1:]
    frames = torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1])) * inside[..., None]
    start = ends.gather(1, index) - durations.gather(1, index)
    progress = ((t - start).float() / durations.gather(1, index).clamp(min=1).float()) * inside
    return frames, progress


class AttentionAligner(torch.nn.Module):
    """A learned soft alignment between text and frames (RAD-TTS's aligner, as NeMo FastPitch uses it).

    Two small convolutional encoders, one over the text's embeddings (keys) and one over the mel
    frames (queries); the attention of frame t on token j is a softmax over tokens of
    ``-temperature x |query_t - key_j|^2``, times the even-pace prior. Trained by the forward-sum
    loss (:func:`forward_sum_loss`: the likelihood of *all* monotonic paths, a CTC loss), it does
    not depend on a model of each token's mean frame, whose rich-get-richer start
    (:func:`frame_log_likelihood`) left English characters with one frame or forty. The hard
    durations are then :func:`monotonic_alignment_search` over its log attention.

    Usage::

        aligner = AttentionAligner(num_tokens=40, num_mel_bins=64)
        log_attn = aligner(mel, text, text_lens, frame_lens, log_prior)   # (batch, tokens, frames)
        loss_sum = forward_sum_loss(log_attn, text_lens, frame_lens)       # summed over utterances
        durations = monotonic_alignment_search(log_attn, text_lens, frame_lens)
    """

    def __init__(self, num_tokens: int, num_mel_bins: int, dim: int = 80, temperature: float = 0.0005,
                 pad_id: int = 0):
        super().__init__()
        nn = torch.nn
        self.embedding = nn.Embedding(num_tokens, dim, padding_idx=pad_id)
        self.keys = nn.Sequential(nn.Conv1d(dim, 2 * dim, 3, padding=1), nn.ReLU(), nn.Conv1d(2 * dim, dim, 1))
        self.queries = nn.Sequential(nn.Conv1d(num_mel_bins, 2 * num_mel_bins, 3, padding=1), nn.ReLU(),
                                     nn.Conv1d(2 * num_mel_bins, num_mel_bins, 1), nn.ReLU(),
                                     nn.Conv1d(num_mel_bins, dim, 1))
        self.temperature = temperature

    def forward(self, mel, text, text_lens, frame_lens, log_prior):
        """log attention (batch, tokens, frames): per frame a log-softmax over the utterance's tokens,
        plus ``log_prior``; -inf-like on padded tokens. ``mel`` (b, frames, bins), ``text`` (b, tokens)."""
        token_mask = torch.arange(text.shape[1], device=text.device)[None, :] < text_lens[:, None]
        frame_mask = torch.arange(mel.shape[1], device=mel.device)[None, :] < frame_lens[:, None]
        # Zeros past each sequence's end before the width-3 convolutions (as the model's other convolutions).
        keys = self.keys((self.embedding(text) * token_mask[..., None]).transpose(1, 2))          # (b, dim, tokens)
        queries = self.queries((mel * frame_mask[..., None]).transpose(1, 2))                      # (b, dim, frames)
        # |q - k|^2 without the (b, dim, tokens, frames) difference tensor.
        dist = (keys**2).sum(1)[:, :, None] - 2 * torch.bmm(keys.transpose(1, 2), queries) + (queries**2).sum(1)[:, None, :]
        logits = (-self.temperature * dist).masked_fill(~token_mask[:, :, None], torch.finfo(dist.dtype).min / 4)
        return torch.log_softmax(logits, dim=1) + log_prior


def forward_sum_loss(log_attn: torch.Tensor, text_lens: torch.Tensor, frame_lens: torch.Tensor,
                     blank_log_prob: float = -1.0) -> torch.Tensor:
    """-log of the total probability of every monotonic path that visits each token in order, summed
    over the batch's utterances (RAD-TTS's forward-sum loss): a CTC loss whose "labels" are the
    utterance's token positions 1..N and whose blank is a constant ``blank_log_prob`` column."""
    b, n_text, n_frames = log_attn.shape
    padded = torch.nn.functional.pad(log_attn.transpose(1, 2), (1, 0), value=blank_log_prob)  # (b, frames, 1 + tokens)
    valid = torch.arange(n_text + 1, device=log_attn.device)[None, :] <= text_lens[:, None]
    padded = padded.masked_fill(~valid[:, None, :], torch.finfo(padded.dtype).min / 4)
    log_probs = torch.log_softmax(padded, dim=-1).transpose(0, 1)  # (frames, b, classes), as ctc_loss wants
    targets = torch.arange(1, n_text + 1, device=log_attn.device)[None, :].expand(b, -1)
    return torch.nn.functional.ctc_loss(log_probs.float(), targets, frame_lens, text_lens, blank=0,
                                        reduction="sum", zero_infinity=True)
