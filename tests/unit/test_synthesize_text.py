"""What the synthesizer says about text its model cannot say (common.tools.synthesize.unsayable)."""

from common.data.tokenizer import BPETokenizer
from common.tools.synthesize import unsayable


def test_words_and_characters_without_tokens_are_named():
    tok = BPETokenizer.build(["alpha bravo charlie delta echo foxtrot"] * 20, vocab_size=40)
    assert unsayable(tok, "Alpha, BRAVO? echo!") == []  # case and punctuation are not words to say
    assert unsayable(tok, "alpha zulu") == ["'zulu' (no token for 'u', 'z')"]
    assert unsayable(tok, "alpha €5") == ["'5' (no token for '5')", "'€5' (dropped: '€')"]
    assert unsayable(tok, "日本 bravo") == ["'日本' (no token for '日', '本')"]
