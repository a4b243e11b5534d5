import pytest

from common.data.tokenizer import AUDIO_TOKEN, WordTokenizer, load_tokenizer


def test_round_trip_save_load(tmp_path):
    tok = WordTokenizer.build(["alpha bravo", "charlie alpha"], extra_words=["transcribe"], pad_to_multiple_of=8)
    assert tok.vocab_size % 8 == 0
    assert tok.vocab[tok.audio_id] == AUDIO_TOKEN
    ids = tok.encode("charlie alpha bravo")
    assert tok.decode(ids) == "charlie alpha bravo"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "charlie alpha bravo"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab == tok.vocab and again.encode("alpha") == tok.encode("alpha")


def test_unknown_words_map_to_unk():
    tok = WordTokenizer.build(["alpha"])
    assert tok.encode("zulu") == [tok.unk_id]


def test_bpe_round_trip_save_load_and_embedded_copy(tmp_path):
    from common.data.tokenizer import BPETokenizer, tokenizer_from_json

    texts = ["alpha bravo charlie", "delta echo alpha", "november oscar bravo"] * 5
    tok = BPETokenizer.build(texts, vocab_size=48)
    assert tok.vocab_size <= 48 and tok.blank_id == tok.pad_id == 0 and tok.eos_id is None
    ids = tok.encode("november alpha echo")
    assert 0 not in ids and tok.decode(ids) == "november alpha echo"
    # Blanks (CTC) are dropped in decoding; unseen characters become <unk> and are dropped too.
    assert tok.decode([0, *ids, 0]) == "november alpha echo"
    assert tok.unk_id in tok.encode("zulu")
    tok.save(tmp_path)
    for again in (load_tokenizer(tmp_path), tokenizer_from_json(tok.to_json())):
        assert isinstance(again, BPETokenizer) and again.encode("bravo delta") == tok.encode("bravo delta")


def test_bpe_at_alphabet_size_is_a_character_tokenizer():
    from common.data.tokenizer import BPETokenizer

    tok = BPETokenizer.build(["ab ba", "abba"], vocab_size=2)
    assert tok.decode(tok.encode("abba ab")) == "abba ab"
    assert len(tok.encode("abba")) == 5  # "▁" + four characters: no merges


def test_bpe_normalizes_text_and_keeps_normalization_when_saved(tmp_path):
    from common.data.tokenizer import BPETokenizer, load_tokenizer

    tok = BPETokenizer.build(["alpha bravo", "charlie"], vocab_size=2)
    assert tok.normalize("  Alpha,  BRAVO!\tcharlie. ") == "alpha bravo charlie"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("ALPHA -- Bravo") == tok.encode("alpha bravo")
    assert again.decode(again.encode("Charlie?")) == "charlie"


def test_phonemes_are_espeak_ngs_one_id_each_and_the_training_texts_phonemes_travel_with_it(tmp_path, monkeypatch):
    from common.data import tokenizer as module
    from common.data.tokenizer import PhonemeTokenizer, load_tokenizer, tokenizer_from_json

    tok = PhonemeTokenizer.build(["Though the cough...", "through the rough", "see the license"], voice="en-us")
    assert tok.pad_id == tok.blank_id == 0 and tok.vocab[:3] == ["<blank>", "<unk>", "\u2581"]
    # One symbol per sound: "though" and "through" share their spelling's "ough", not their sounds.
    assert tok.phonemes("though") != tok.phonemes("through").removeprefix("θ_ɹ_")
    ids = tok.encode("Through the ROUGH!")  # normalized as every text of the project is
    assert ids == tok.encode("through the rough") and tok.unk_id not in ids
    assert [tok.vocab[i] for i in ids].count("\u2581") == 3  # a word boundary before each word
    assert "ˈ" in tok.vocab and not any(s.startswith(("ˈ", "ˌ")) and len(s) > 1 for s in tok.vocab)  # stress: own id
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab == tok.vocab and again.known == tok.known
    # Training texts are not phonemized again (what the model learned stays fixed); new text is.
    calls = []
    monkeypatch.setattr(module, "phonemize", lambda texts, voice: calls.append(texts) or ["n_ˈuː"] * len(texts))
    copy = tokenizer_from_json(tok.to_json())
    assert copy.encode("see the license") == tok.encode("see the license") and calls == []
    assert copy.decode(copy.encode("new")) == "nˈuː" and calls == [["new"]]


def test_phonemize_keeps_one_result_per_text_even_when_espeak_splits_a_line():
    from common.data.tokenizer import phonemize

    texts = ["hello world", "one two, three; four: five", "", "x"]
    batched = phonemize([t for t in texts if t], "en-us")
    assert batched == [phonemize([t], "en-us", batch=1)[0] for t in texts if t] and len(batched) == 3


def test_phonemizing_without_espeak_ng_names_the_setting_and_the_install(monkeypatch, tmp_path):

    from common.data.tokenizer import phonemize

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on this PATH
    with pytest.raises(RuntimeError, match=r"model.tokenizer.phonemes=en-us: .*espeak-ng.*apt-get install espeak-ng"):
        phonemize(["hello"], "en-us")


def test_phonemes_are_cached_per_voice_and_espeak_version_and_ranks_starting_together_phonemize_once(tmp_path,
                                                                                                    monkeypatch):
    import multiprocessing
    import shutil

    from common.data.tokenizer import PhonemeTokenizer

    # An espeak-ng on PATH that logs each call, then runs the real one.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "espeak-ng").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("espeak-ng")} "$@"\n')
    (bin_dir / "espeak-ng").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def phonemizing_calls() -> int:
        return sum("--ipa" in line for line in log.read_text().splitlines()) if log.exists() else 0

    texts, cache = ["see the license", "through the rough", "Though the cough"], tmp_path / "cache"
    # Two ranks starting at once: one phonemizes, the other waits for it and reads.
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=PhonemeTokenizer.build, args=(texts, "en-us", cache)) for _ in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    assert [p.exitcode for p in ranks] == [0, 0] and phonemizing_calls() == 1
    built = PhonemeTokenizer.build(texts, "en-us", cache_dir=cache)  # a relaunch: nothing phonemized
    assert phonemizing_calls() == 1
    assert built.known == PhonemeTokenizer.build(texts, "en-us").known  # the same phonemes as without a cache
    more = PhonemeTokenizer.build([*texts, "a new sentence"], "en-us", cache_dir=cache)  # only the new text
    assert phonemizing_calls() == 3 and more.known["a new sentence"] == built.phonemes("a new sentence")
    [cached] = cache.glob("phonemes_en-us_*.json")
    cached.write_text("{not json")
    with pytest.raises(ValueError, match=f"{cached}: not a phoneme cache"):
        PhonemeTokenizer.build(texts, "en-us", cache_dir=cache)
