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
