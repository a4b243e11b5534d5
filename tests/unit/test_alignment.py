"""Monotonic alignment search and the length regulator (common/models/alignment.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from common.models.alignment import (
    AttentionAligner,
    beta_binomial_log_prior,
    diagonal_log_prior,
    expand,
    forward_sum_loss,
    frame_log_likelihood,
    monotonic_alignment_search,
)


def best_path_by_enumeration(log_p: torch.Tensor, tokens: int, frames: int) -> list[int]:
    """Every way to split ``frames`` into ``tokens`` runs of at least one frame, the best total kept."""
    best = None
    for cuts in itertools.combinations(range(1, frames), tokens - 1):
        bounds = [0, *cuts, frames]
        total = sum(float(log_p[j, bounds[j]:bounds[j + 1]].sum()) for j in range(tokens))
        if best is None or total > best[0]:
            best = (total, [bounds[j + 1] - bounds[j] for j in range(tokens)])
    return best[1]


def test_search_finds_the_best_monotonic_path_for_every_utterance_of_a_batch():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        log_p = torch.randn(4, 5, 10, generator=gen)
        text_lens = torch.randint(1, 6, (4,), generator=gen)
        frame_lens = torch.maximum(torch.randint(3, 11, (4,), generator=gen), text_lens)
        durations = monotonic_alignment_search(log_p, text_lens, frame_lens)
        for b in range(4):
            n, t = int(text_lens[b]), int(frame_lens[b])
            assert durations[b, :n].tolist() == best_path_by_enumeration(log_p[b], n, t)
            assert durations[b, n:].sum() == 0 and durations[b].sum() == t and durations[b, :n].min() >= 1


def test_search_recovers_the_durations_that_made_the_frames():
    # Frames drawn around three token means with known durations: the likelihood's best path is them.
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 3, 16, generator=gen) * 3
    true = torch.tensor([[4, 9, 2]])
    mel, _ = expand(mu, true, 15)
    mel = mel + 0.3 * torch.randn(mel.shape, generator=gen)
    found = monotonic_alignment_search(frame_log_likelihood(mel, mu), torch.tensor([3]), torch.tensor([15]))
    assert found.tolist() == true.tolist()


def test_expand_repeats_states_and_says_how_far_into_its_token_each_frame_is():
    states = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [0.0]]])
    durations = torch.tensor([[2, 1, 3], [1, 2, 0]])
    frames, progress = expand(states, durations, 7)
    assert frames[..., 0].tolist() == [[1, 1, 2, 3, 3, 3, 0], [4, 5, 5, 0, 0, 0, 0]]
    assert torch.allclose(progress, torch.tensor([[0, 0.5, 0, 0, 1 / 3, 2 / 3, 0], [0, 0, 0.5, 0, 0, 0, 0]]))


def test_beta_binomial_prior_is_a_distribution_over_each_utterances_tokens_and_narrows_with_length():
    text_lens, frame_lens = torch.tensor([150, 20]), torch.tensor([900, 120])
    log_prior = beta_binomial_log_prior(text_lens, frame_lens, 150, 900)
    assert torch.isfinite(log_prior).all()
    for b, (n, t) in enumerate(zip(text_lens.tolist(), frame_lens.tolist())):
        # Over the tokens the utterance has: a distribution at its first frames; towards its end part
        # of the mass is on outcome N (NeMo's form), and the last token is the likeliest at the last frame.
        total = log_prior[b, :n, :t].exp().sum(0)
        assert (total <= 1 + 1e-5).all() and total[: t // 2].min() > 0.99
        assert int(log_prior[b, :n, t - 1].argmax()) == n - 1
        assert abs(int(log_prior[b, :n, t // 2].argmax()) - n // 2) <= 1  # centred on the diagonal
    # The band, as a share of the utterance, is narrower for the long sentence (about sqrt(N) tokens wide),
    # where the even-pace Gaussian prior is the same share at every length.
    def band_share(lp, n, t):
        return float((lp[:n, t // 2].exp() > 0.01).sum()) / n
    assert band_share(log_prior[0], 150, 900) < 0.6 * band_share(log_prior[1], 20, 120)
    gauss = diagonal_log_prior(text_lens, frame_lens, 150, 900, 0.2)
    assert band_share(gauss[0].softmax(0), 150, 900) == pytest.approx(band_share(gauss[1, :20].softmax(0), 20, 120), abs=0.1)


def ctc_by_enumeration(log_attn: torch.Tensor, blank: float = -1.0) -> float:
    """-log sum over every CTC path of tokens 1..N (with blanks) of its probability, one utterance."""
    n, t = log_attn.shape
    probs = torch.log_softmax(torch.cat([torch.full((1, t), blank), log_attn]), dim=0)  # (1 + n, t)
    total = []
    for path in itertools.product(range(n + 1), repeat=t):  # 0 = blank
        collapsed = [c for i, c in enumerate(path) if c and (i == 0 or path[i - 1] != c)]
        if collapsed == list(range(1, n + 1)):
            total.append(sum(float(probs[c, i]) for i, c in enumerate(path)))
    return -float(torch.logsumexp(torch.tensor(total), 0))


def test_forward_sum_loss_is_the_ctc_likelihood_of_every_monotonic_path_summed_over_utterances():
    gen = torch.Generator().manual_seed(0)
    log_attn = torch.randn(3, 3, 6, generator=gen)
    text_lens, frame_lens = torch.tensor([3, 2, 1]), torch.tensor([6, 4, 5])
    padded = log_attn.clone()
    padded[1, 2:] = 7.0    # padding (tokens past the utterance's end) must not count
    padded[0, :, 6:] = 0.0
    got = forward_sum_loss(padded, text_lens, frame_lens)
    want = sum(ctc_by_enumeration(log_attn[b, :n, :t]) for b, (n, t) in enumerate(zip(text_lens.tolist(), frame_lens.tolist())))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_attention_aligner_learns_which_frames_belong_to_which_token():
    # Frames made from per-token patterns with uneven durations, which the prior alone places badly:
    # 150 steps of the forward-sum loss alone move the search's path most of the way to the truth
    # (a loss with the wrong sign or a broken CTC leaves it at the prior's), and an utterance's
    # attention does not depend on the other utterances of its batch.
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(6, 16, generator=gen) * 2        # token id -> its frame
    text = torch.tensor([[1, 2, 3, 4, 5], [3, 1, 4, 0, 0]])
    text_lens, true = torch.tensor([5, 3]), torch.tensor([[2, 9, 1, 6, 2], [7, 1, 6, 0, 0]])
    frame_lens = true.sum(1)
    mel, _ = expand(patterns[text], true, 20)
    mel = mel + 0.1 * torch.randn(mel.shape, generator=gen)

    def agreement(durations):  # the share of frames given to their true token
        def owner(d):
            return torch.cat([torch.repeat_interleave(torch.arange(5), row) for row in d])
        return float((owner(durations) == owner(true)).float().mean())

    prior = beta_binomial_log_prior(text_lens, frame_lens, 5, 20)
    assert agreement(monotonic_alignment_search(prior, text_lens, frame_lens)) < 0.6
    torch.manual_seed(0)
    aligner = AttentionAligner(num_tokens=6, num_mel_bins=16, dim=16)
    opt = torch.optim.Adam(aligner.parameters(), lr=3e-3)
    for _ in range(150):
        loss = forward_sum_loss(aligner(mel, text, text_lens, frame_lens, prior), text_lens, frame_lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_attn = aligner(mel, text, text_lens, frame_lens, prior)
        alone = aligner(mel[1:, :14], text[1:, :3], text_lens[1:], frame_lens[1:], prior[1:, :3, :14])
    assert agreement(monotonic_alignment_search(log_attn, text_lens, frame_lens)) >= 0.8
    assert torch.allclose(alone[0], log_attn[1, :3, :14], atol=1e-4)
