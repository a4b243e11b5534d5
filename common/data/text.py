"""The project's one text normalizer: what a transcript is compared and tokenized as.

Every word and character error rate of the project (validation WER, ``make transcribe`` scoring,
the TTS intelligibility CER, the English corpus' transcripts) compares texts after
:func:`normalize_text`, and the BPE tokenizer carries the same rules (:func:`hf_normalizer`, saved
in its JSON), so "Hello, World!" and "hello world" are the same transcript everywhere.

The rules, in order: Unicode NFKC; lower case; an apostrophe that is not inside a word
("'quoted'") becomes a space, one inside a word ("don't") stays; every other character that is
neither a letter, a digit nor a space becomes a space; runs of spaces become one; ends stripped.
Numbers are not spelled out: a corpus whose audio says "nineteen" must say so in its text.

Usage::

    normalize_text("It's the \u201cGNU\u201d License, isn't it?")   # "it's the gnu license isn't it"
"""

from __future__ import annotations

import re
import unicodedata

# (pattern, replacement) after NFKC and lower case; the same strings build the tokenizers normalizer.
RULES = (
    (r"(?<!\w)'|'(?!\w)", " "),   # apostrophes at word edges (quotes)
    (r"[^\w' ]+", " "),            # punctuation, symbols, tabs and newlines
    (r"\s+", " "),
)
_COMPILED = tuple((re.compile(p), r) for p, r in RULES)


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text)
    return text.strip()


def hf_normalizer():
    """The same rules as a Hugging Face ``tokenizers`` normalizer (travels in a tokenizer's JSON)."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        *(normalizers.Replace(Regex(p), r) for p, r in RULES),
        normalizers.Strip(),
    ])
