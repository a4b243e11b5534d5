"""Tokenizers with one small interface, saved next to every checkpoint.

``WordTokenizer`` is built from the training text (used by the generated corpus and tiny models);
``HFTokenizer`` wraps a pretrained Hugging Face tokenizer (used with ``model.pretrained_llm``);
``BPETokenizer`` is a sentencepiece-style BPE trained on the training text (CTC models: id 0 is
the blank); ``PhonemeTokenizer`` gives espeak-ng's phonemes of a text (TTS).

Usage::

    tok = WordTokenizer.build(["alpha bravo", "charlie"], pad_to_multiple_of=8)
    ids = tok.encode("alpha charlie")        # [7, 9]
    tok.decode(ids)                          # "alpha charlie"
    tok.save("outputs/run/tokenizer"); load_tokenizer("outputs/run/tokenizer")

    bpe = BPETokenizer.build(["alpha bravo", "charlie"], vocab_size=64)
    bpe.decode(bpe.encode("alpha charlie"))  # "alpha charlie"
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

AUDIO_TOKEN = "<|audio|>"


class _SavedAsJson:
    """``save(dir)`` writes ``to_json()`` to ``dir/FILENAME`` (what ``load_tokenizer`` looks for)."""

    FILENAME: str

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path


class WordTokenizer(_SavedAsJson):
    FILENAME = "word_tokenizer.json"
    SPECIALS = ("<pad>", "<bos>", "<eos>", AUDIO_TOKEN, "<unk>")

    def __init__(self, vocab: list[str]):
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise ValueError(f"word vocabulary must start with {self.SPECIALS}, got {vocab[:5]}")
        self.vocab = list(vocab)
        self._index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.audio_id, self.unk_id = range(len(self.SPECIALS))

    @classmethod
    def build(cls, texts: Iterable[str], extra_words: Iterable[str] = (), pad_to_multiple_of: int = 8):
        """Vocabulary = specials + sorted words of ``texts``; padded so tensor parallel can split it."""
        words = sorted({w for t in texts for w in t.split()} | set(extra_words))
        vocab = list(cls.SPECIALS) + words
        while len(vocab) % pad_to_multiple_of:
            vocab.append(f"<extra_{len(vocab)}>")
        return cls(vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(self.SPECIALS) and i < len(self.vocab))

    def to_json(self) -> str:
        return json.dumps({"type": "word", "vocab": self.vocab}, indent=0)



class BPETokenizer(_SavedAsJson):
    """Sentencepiece-style BPE (``▁`` marks a word start) from Hugging Face ``tokenizers``.

    Id 0 is ``<blank>`` (CTC's blank, also used to pad targets) and id 1 is ``<unk>``; there is
    no ``<eos>``: a CTC model emits no end token. A ``vocab_size`` at or below the number of
    distinct characters gives a character tokenizer.
    """

    FILENAME = "bpe_tokenizer.json"
    SPECIALS = ("<blank>", "<unk>")
    blank_id = pad_id = 0
    unk_id = 1
    eos_id = bos_id = None

    def __init__(self, tokenizer):
        self.tok = tokenizer
        for i, special in enumerate(self.SPECIALS):
            if tokenizer.token_to_id(special) != i:
                raise ValueError(f"BPE tokenizer must have {special!r} at id {i}")

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = 128) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from .text import hf_normalizer

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # The project's text normalizer (common.data.text) travels with the tokenizer, in its JSON.
        tok.normalizer = hf_normalizer()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def normalize(self, text: str) -> str:
        return self.tok.normalizer.normalize_str(text) if self.tok.normalizer else text

    def pieces(self) -> list[str]:
        """Every id's piece (``▁`` marks a word start): what a CTC beam search spells with."""
        return [self.tok.id_to_token(i) for i in range(self.vocab_size)]

    def to_json(self) -> str:
        return self.tok.to_str()



class PhonemeTokenizer(_SavedAsJson):
    """Text -> espeak-ng's phonemes (IPA), one id per phoneme, ``▁`` before each word, stress marks
    as their own ids. Id 0 pads (``<blank>``) and id 1 is ``<unk>``, as in :class:`BPETokenizer`.

    For TTS: one symbol per sound, where English letters are not ("though", "through"). The
    phonemes of every training text are kept in the JSON (what the model learned from stays
    fixed even if espeak-ng changes); other texts are phonemized when first seen, which needs
    espeak-ng where the model synthesizes.

    Usage::

        tok = PhonemeTokenizer.build(["see the license"], voice="en-us")
        tok.phonemes("see the license")      # "s_ˈiː ð_ə l_ˈaɪ_s_ə_n_s"
        tok.encode("see the license")        # ids of ▁ s ˈ iː ▁ ð ə ▁ l ˈ aɪ s ə n s
    """

    FILENAME = "phoneme_tokenizer.json"
    SPECIALS = ("<blank>", "<unk>", "\u2581")
    blank_id = pad_id = 0
    unk_id = 1
    eos_id = bos_id = None
    STRESS = ("\u02c8", "\u02cc")  # ˈ ˌ

    def __init__(self, voice: str, vocab: list[str], known: dict[str, str]):
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise ValueError(f"phoneme vocabulary must start with {self.SPECIALS}, got {vocab[:3]}")
        self.voice, self.vocab, self.known = voice, list(vocab), dict(known)
        self._index = {p: i for i, p in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], voice: str = "en-us", cache_dir: str | Path | None = None) -> PhonemeTokenizer:
        """``cache_dir``: keep the texts' phonemes there (:func:`cached_phonemize`), so that a relaunch,
        a resume and the other ranks read them instead of running espeak-ng over every training text."""
        from .text import normalize_text

        unique = sorted({normalize_text(t) for t in texts} - {""})
        phonemes = cached_phonemize(unique, voice, cache_dir) if cache_dir is not None else phonemize(unique, voice)
        known = dict(zip(unique, phonemes))
        symbols = sorted({sym for phonemes in known.values() for sym in cls._symbols(phonemes)} - set(cls.SPECIALS))
        return cls(voice, list(cls.SPECIALS) + symbols, known)

    @classmethod
    def _symbols(cls, phonemes: str) -> list[str]:
        out = []
        for word in phonemes.split():
            out.append(cls.SPECIALS[2])
            for sym in word.split("_"):
                while sym[:1] in cls.STRESS:  # a stress mark before a vowel: its own id
                    out.append(sym[0])
                    sym = sym[1:]
                if sym:
                    out.append(sym)
        return out

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def normalize(self, text: str) -> str:
        from .text import normalize_text

        return normalize_text(text)

    def phonemes(self, text: str) -> str:
        text = self.normalize(text)
        if not text:
            return ""
        if text not in self.known:
            self.known[text] = phonemize([text], self.voice)[0]
        return self.known[text]

    def encode(self, text: str) -> list[int]:
        return [self._index.get(sym, self.unk_id) for sym in self._symbols(self.phonemes(text))]

    def decode(self, ids: Iterable[int]) -> str:
        """The phonemes, ``▁`` as a space (a TTS model's input, for logs)."""
        syms = [self.vocab[i] for i in ids if 2 <= i < len(self.vocab)]
        return "".join(" " if s == self.SPECIALS[2] else s for s in syms).strip()

    def to_json(self) -> str:
        return json.dumps({"type": "phoneme", "voice": self.voice, "vocab": self.vocab, "known": self.known},
                          ensure_ascii=False, indent=0)


def phonemize(texts: list[str], voice: str = "en-us", batch: int = 500) -> list[str]:
    """espeak-ng's IPA for each text (``_`` between phonemes, a space between words), one process per
    ``batch`` texts (one paragraph each: espeak-ng reads lines without end punctuation as one clause;
    a text of one clause gives one line back)."""
    import subprocess

    from .english import espeak_binary

    binary = espeak_binary(f"model.tokenizer.phonemes={voice}: phonemizing text needs espeak-ng")
    out: list[str] = []
    for start in range(0, len(texts), batch):
        chunk = [" ".join(t.split()) for t in texts[start:start + batch]]
        proc = subprocess.run([binary, "-q", "--ipa", "--sep=_", "-v", voice, "--stdin"],
                              input="\n\n".join(chunk) + "\n", capture_output=True, text=True)
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0:
            raise RuntimeError(f"espeak-ng -v {voice} --ipa failed on {chunk[0]!r}...: {proc.stderr[-300:]}")
        if len(chunk) == 1:
            lines = [" ".join(lines)]  # a text of several clauses comes back as several lines
        elif len(lines) != len(chunk):  # a line split into clauses: one call per text instead
            lines = [phonemize([t], voice, batch=1)[0] for t in chunk]
        out.extend(lines)
    return out


def cached_phonemize(texts: list[str], voice: str, cache_dir: str | Path) -> list[str]:
    """:func:`phonemize` with a cache per voice and espeak-ng version in ``cache_dir``
    (``phonemes_<voice>_<version digest>.json``): only texts it lacks are phonemized, and ranks
    that start together take turns (a file lock), so one phonemizes and the others read.

    Usage::

        cached_phonemize(["see the license"], "en-us", "data/phoneme_cache")  # ["s_ˈiː ð_ə l_ˈaɪ_s_ə_n_s"]
    """
    import fcntl
    import hashlib
    import os

    from .english import espeak_version

    version = espeak_version()  # another espeak-ng may phonemize differently: its own file
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"phonemes_{voice}_{hashlib.sha1(version.encode()).hexdigest()[:10]}.json"
    with open(cache_dir / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache: dict[str, str] = {}
        if path.exists():
            try:
                cache = json.loads(path.read_text(encoding="utf-8"))["phonemes"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a phoneme cache ({e}); move it away and the next run rebuilds it") from e
        missing = sorted({t for t in texts if t not in cache})
        if missing:
            cache.update(zip(missing, phonemize(missing, voice)))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"espeak_ng": version, "voice": voice, "phonemes": cache}, ensure_ascii=False),
                           encoding="utf-8")
            os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    return [cache[t] for t in texts]


class HFTokenizer:
    """A pretrained tokenizer with the audio placeholder added as a special token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if AUDIO_TOKEN not in self.tok.get_vocab():
            self.tok.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
        self.audio_id = self.tok.convert_tokens_to_ids(AUDIO_TOKEN)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str):
        """From a local directory, a hub id, or a GGUF file (the tokenizer GGUF files embed)."""
        from transformers import AutoTokenizer

        # trust_remote_code stays off: a recipe never runs code shipped with downloaded weights.
        path = Path(name_or_path)
        if path.suffix == ".gguf":
            return cls(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False))
        return cls(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def save(self, directory: str | Path) -> Path:
        self.tok.save_pretrained(directory)
        return Path(directory)


class SizedVocabulary:
    """A vocabulary of a given size and no text: what the planner and the preset parameter counts
    need to build a model's shapes (``model.about.vocab_size``) without its real tokenizer."""

    pad_id = blank_id = 0
    bos_id, eos_id, audio_id, unk_id = 1, 2, 3, 4
    shapes_only = True  # no real text: a chat prompt is approximated by its length (common.models.salm)

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return [self.unk_id] * len(text.split())

    def decode(self, ids: Iterable[int]) -> str:
        return ""


def load_tokenizer(directory: str | Path):
    directory = Path(directory)
    for cls in (WordTokenizer, BPETokenizer, PhonemeTokenizer):
        if (directory / cls.FILENAME).exists():
            return tokenizer_from_json((directory / cls.FILENAME).read_text())
    if (directory / "tokenizer_config.json").exists():
        return HFTokenizer.from_pretrained(str(directory))
    raise FileNotFoundError(
        f"no tokenizer in {directory} (expected word_tokenizer.json, bpe_tokenizer.json or tokenizer_config.json)"
    )


def tokenizer_from_json(text: str):
    """The inverse of ``to_json()`` (used for the copy of the tokenizer kept inside checkpoints)."""
    data = json.loads(text)
    if data.get("type") == "word":
        return WordTokenizer(data["vocab"])
    if data.get("type") == "phoneme":
        return PhonemeTokenizer(data["voice"], data["vocab"], data["known"])
    return BPETokenizer.from_json(text)
