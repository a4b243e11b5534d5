"""CTC decoding with a word language model: what LibriSpeech recipes add to greedy decoding.

:class:`WordLM` is a word bigram with interpolated Kneser-Ney smoothing, built from the training
transcripts (after :func:`common.data.text.normalize_text`); :func:`beam_search` is CTC prefix beam
search over a BPE vocabulary (``▁`` starts a word) that scores every word it completes with the LM:

    score = log P_ctc(prefix) + lm_weight * log P_lm(words) + word_bonus * len(words)

The search spells only words the LM knows (a lexicon: the training text's words); a word never
seen in training cannot be written, which costs its share of the WER (2.2% of the English test
words), against the misspellings of known words it removes.

Usage::

    lm = WordLM.build(training_texts)
    log_probs, lengths = spec.ctc_log_probs(model, features, mask)   # (B, T, V), (B,)
    texts = [beam_search(lp[:n], pieces, lm) for lp, n in zip(log_probs, lengths.tolist())]
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

BOS, EOS = "<s>", "</s>"
WORD_START = "\u2581"  # sentencepiece's word-start mark, as BPETokenizer's pieces carry it


class WordLM:
    """Bigram LM, interpolated Kneser-Ney (one discount ``d``) over the training words, ``</s>`` and one
    class for every unknown word: in every context these sum to 1."""

    def __init__(self, bigrams: dict[str, dict[str, int]], discount: float = 0.75):
        self.discount = discount
        self.bigrams = bigrams
        self.context_total = {v: sum(ws.values()) for v, ws in bigrams.items()}
        self.followers = {v: len(ws) for v, ws in bigrams.items()}
        preceders: Counter = Counter()
        for ws in bigrams.values():
            preceders.update(ws.keys())
        total_types = sum(preceders.values())
        # Continuation probability, with a share kept for the class of words never seen (one token, <unk>).
        self.continuation = {w: n / (total_types + len(preceders)) for w, n in preceders.items()}
        self.unknown = len(preceders) / (total_types + len(preceders))
        self.words = frozenset(w for w in preceders if w != EOS)
        # Every beginning of a known word: a prefix of the search spells only these.
        self.word_prefixes = frozenset(w[:i] for w in self.words for i in range(len(w) + 1))
        self._cache: dict[tuple[str, str], float] = {}

    @classmethod
    def build(cls, texts: Iterable[str], discount: float = 0.75) -> WordLM:
        from common.data.text import normalize_text

        bigrams: dict[str, Counter] = defaultdict(Counter)
        for text in texts:
            words = [BOS, *normalize_text(text).split(), EOS]
            for a, b in zip(words, words[1:]):
                bigrams[a][b] += 1
        return cls({a: dict(b) for a, b in bigrams.items()}, discount)

    def logp(self, prev: str, word: str) -> float:
        """log P(word | prev)."""
        key = (prev, word)
        if key in self._cache:
            return self._cache[key]
        lower = self.continuation.get(word, self.unknown)
        total = self.context_total.get(prev)
        if not total:
            p = lower
        else:
            seen = self.bigrams[prev].get(word, 0)
            p = max(seen - self.discount, 0) / total + self.discount * self.followers[prev] / total * lower
        self._cache[key] = value = math.log(p)
        return value

    def to_json(self) -> str:
        return json.dumps({"type": "word_bigram_kn", "discount": self.discount, "bigrams": self.bigrams})

    @classmethod
    def from_json(cls, text: str) -> WordLM:
        data = json.loads(text)
        return cls(data["bigrams"], data["discount"])


# Chosen on the English dev sentences (asr_ddp's 3,000-step 96 x 2 model: WER 0.539 greedy; with the LM
# 0.250 at beam 16 / top-6 / weight 0.5 / bonus 1, 0.227 here, 0.213 at beam 64 / top-10 for 4x the time).
BEAM, TOP_K, LM_WEIGHT, WORD_BONUS = 32, 8, 0.8, 3.0


def beam_search(log_probs, pieces: list[str], lm: WordLM, blank_id: int = 0, beam: int = BEAM,
                lm_weight: float = LM_WEIGHT, word_bonus: float = WORD_BONUS, top_k: int = TOP_K,
                skip: frozenset = frozenset()) -> str:
    """The best transcript of one utterance's CTC ``log_probs`` (T, V) under CTC x ``lm``.

    Prefixes are token sequences (blank-ending and not, as CTC's prefix search keeps them); at each
    frame only the ``top_k`` likeliest tokens extend a prefix (never a token id in ``skip``, e.g.
    ``<unk>``). A prefix's LM state is its last complete word and the piece text of the word it is
    spelling."""
    lp = np.asarray(log_probs, dtype=np.float64)
    neg = -np.inf
    # prefix -> [log p ending in blank, log p ending in a token, lm score, last word, partial word, words]
    beams: dict[tuple, list] = {(): [0.0, neg, 0.0, BOS, "", 0]}
    for t in range(lp.shape[0]):
        frame = lp[t]
        candidates = [int(c) for c in np.argpartition(frame, -top_k)[-top_k:] if c != blank_id and c not in skip]
        nxt: dict[tuple, list] = {}
        for prefix, (pb, pnb, lm_score, last, partial, n_words) in beams.items():
            total = np.logaddexp(pb, pnb)
            entry = nxt.setdefault(prefix, [neg, neg, lm_score, last, partial, n_words])
            entry[0] = np.logaddexp(entry[0], total + frame[blank_id])
            end = prefix[-1] if prefix else None
            for c in candidates:
                p = frame[c]
                if c == end:  # the same token again without a blank between: the same prefix
                    entry[1] = np.logaddexp(entry[1], pnb + p)
                    from_prev = pb + p
                else:
                    from_prev = total + p
                new = prefix + (c,)
                target = nxt.get(new)
                if target is None:
                    piece = pieces[c]
                    if piece.startswith(WORD_START):  # a new word starts: the one being spelled is complete
                        if partial and partial not in lm.words:
                            continue
                        add, new_last, new_words = _word_score(lm, last, partial, lm_weight, word_bonus)
                        target = [neg, neg, lm_score + add, new_last, piece[1:], n_words + new_words]
                    else:
                        target = [neg, neg, lm_score, last, partial + piece, n_words]
                    if target[4] not in lm.word_prefixes:  # spells no word the LM knows
                        continue
                    nxt[new] = target
                target[1] = np.logaddexp(target[1], from_prev)
        ranked = sorted(nxt.items(), key=lambda kv: np.logaddexp(kv[1][0], kv[1][1]) + kv[1][2], reverse=True)
        beams = dict(ranked[:beam])
    return _best_transcript(beams, pieces, lm, lm_weight, word_bonus)


def _best_transcript(beams: dict, pieces: list[str], lm: WordLM, lm_weight: float, word_bonus: float) -> str:
    """The text of the best final beam: its last word completed and the sentence end scored."""
    neg = -np.inf

    def final(state):
        pb, pnb, lm_score, last, partial, _ = state
        if partial and partial not in lm.words:  # ends inside a word
            return neg
        add, new_last, _ = _word_score(lm, last, partial, lm_weight, word_bonus)
        return np.logaddexp(pb, pnb) + lm_score + add + lm_weight * lm.logp(new_last, EOS)

    scored = {prefix: final(state) for prefix, state in beams.items()}
    best = max(scored, key=scored.get)
    text = "".join(pieces[c] for c in best).replace(WORD_START, " ").strip()
    if scored[best] == neg:  # every prefix ends inside a word (an untrained model): keep the likeliest
        best = max(beams, key=lambda p: np.logaddexp(beams[p][0], beams[p][1]) + beams[p][2])
        words = "".join(pieces[c] for c in best).replace(WORD_START, " ").split()
        text = " ".join(words[:-1] if beams[best][4] else words)  # one's complete words, never a part of one
    return text


def _word_score(lm: WordLM, last: str, word: str, lm_weight: float, word_bonus: float) -> tuple[float, str, int]:
    """(score of completing ``word`` after ``last``, the new last word, words added)."""
    if not word:
        return 0.0, last, 0
    return lm_weight * lm.logp(last, word) + word_bonus, word, 1
