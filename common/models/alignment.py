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
