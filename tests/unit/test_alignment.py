"""Monotonic alignment search and the length regulator (common/models/alignment.py)."""

from __future__ import annotations

import itertools

import torch

from common.models.alignment import expand, frame_log_likelihood, monotonic_alignment_search


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
