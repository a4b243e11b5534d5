import hashlib

import soundfile as sf
from lhotse import CutSet

from common.data.corpus import WORDS, ensure_tone_corpus, word_patterns


def _digest(manifest):
    h = hashlib.sha1()
    for cut in CutSet.from_file(manifest):
        h.update(cut.supervisions[0].text.encode())
        h.update(cut.load_audio().tobytes())
    return h.hexdigest()


def test_corpus_is_deterministic_and_seeded(tmp_path):
    a = ensure_tone_corpus(tmp_path / "a", seed=3, num_train=12, num_val=4)
    b = ensure_tone_corpus(tmp_path / "b", seed=3, num_train=12, num_val=4)
    c = ensure_tone_corpus(tmp_path / "c", seed=4, num_train=12, num_val=4)
    assert _digest(a["train"]) == _digest(b["train"])
    assert _digest(a["train"]) != _digest(c["train"])


def test_corpus_content(tiny_corpus):
    train = CutSet.from_file(tiny_corpus["train"])
    val = CutSet.from_file(tiny_corpus["val"])
    assert len(train) == 120 and len(val) == 16
    assert not set(train.ids) & set(val.ids)
    for cut in train:
        words = cut.supervisions[0].text.split()
        assert 1 <= len(words) <= 8 and set(words) <= set(WORDS)
        audio, sr = sf.read(cut.recording.sources[0].source)
        assert sr == 16000 and abs(len(audio) / sr - cut.duration) < 1e-3


def test_second_call_reuses_the_corpus(tiny_corpus):
    before = tiny_corpus["train"].stat().st_mtime_ns
    again = ensure_tone_corpus(tiny_corpus["dir"], **tiny_corpus["spec"])
    assert again["train"] == tiny_corpus["train"] and again["train"].stat().st_mtime_ns == before


def test_every_word_has_a_distinct_sound():
    patterns = word_patterns()
    assert len(set(patterns.values())) == len(WORDS)
