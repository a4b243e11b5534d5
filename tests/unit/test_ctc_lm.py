"""CTC beam search with a word LM (common/models/ctc_lm.py): the LM is a proper distribution, the
search spells only known words and prefers what the LM and the acoustics agree on."""

import math

import numpy as np

from common.models.ctc_lm import EOS, WordLM, beam_search
from common.models.ctc_lm import WORD_START as W

TEXTS = ["The cat sat.", "the cat ran", "a dog sat", "the dog ran away", "a cat"]


def test_kneser_ney_bigram_is_a_distribution_over_known_words_end_and_the_unknown_class():
    lm = WordLM.build(TEXTS)
    assert lm.words == {"the", "cat", "sat", "ran", "a", "dog", "away"}
    for prev in ("the", "cat", "<s>", "never-seen"):
        known = sum(math.exp(lm.logp(prev, w)) for w in [*lm.words, EOS])
        assert 0.5 < known < 1 and abs(known + math.exp(lm.logp(prev, "zebra")) - 1) < 1e-9  # + the unknown class
    assert lm.logp("the", "cat") > lm.logp("the", "dog") > lm.logp("the", "sat")  # seen twice, once, never
    again = WordLM.from_json(lm.to_json())
    assert again.logp("a", "dog") == lm.logp("a", "dog") and again.words == lm.words


def _frames(*rows, vocab):
    """Log-probabilities of frames given as {token id: probability}; the rest shares what is left."""
    out = np.full((len(rows), vocab), 1e-4)
    for t, row in enumerate(rows):
        for token, p in row.items():
            out[t, token] = p
    return np.log(out / out.sum(1, keepdims=True))


def test_search_corrects_a_misspelling_the_acoustics_favour():
    pieces = ["<blank>", "<unk>", W + "the", W + "c", "a", "s", "t", W + "dog"]
    # "▁the ▁c {s 0.55 | a 0.45} t": greedy reads "the cst", which is no word.
    lp = _frames({2: 0.9}, {0: 0.9}, {3: 0.9}, {5: 0.55, 4: 0.45}, {6: 0.9}, {0: 0.9}, vocab=len(pieces))
    greedy = "".join(pieces[i] for i in lp.argmax(1) if i > 1).replace(W, " ").strip()
    assert greedy == "the cst"
    lm = WordLM.build(TEXTS)
    assert beam_search(lp, pieces, lm, skip=frozenset({1})) == "the cat"
    # Repeats merge unless a blank separates them: "▁the ▁the" held over two frames is one word.
    lp2 = _frames({2: 0.9}, {2: 0.9}, {0: 0.9}, vocab=len(pieces))
    assert beam_search(lp2, pieces, lm, skip=frozenset({1})) == "the"


def test_a_search_that_ends_inside_every_word_returns_only_complete_words():
    """When every prefix the beam kept ends inside a word (an untrained model's frames, a narrow beam),
    the answer keeps the likeliest prefix's complete words, never a part of a word no lexicon has."""
    pieces = ["<blank>", "<unk>", W + "the", W + "c", "a", "s", "t", W + "dog"]
    lm = WordLM.build(TEXTS)
    lp = _frames({2: 0.9}, {0: 0.9}, {3: 0.9}, {4: 0.9}, vocab=len(pieces))  # "▁the ▁c a": "ca" is no word yet
    assert beam_search(lp, pieces, lm, beam=1, skip=frozenset({1})) == "the"
