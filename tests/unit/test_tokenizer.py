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
