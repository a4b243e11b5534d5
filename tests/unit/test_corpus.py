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


def test_word_alignments_are_written_and_give_token_spans(tiny_corpus):
    import torch

    from common.data.loading import LoaderConfig, featurized, make_loader
    from common.data.tokenizer import BPETokenizer

    cuts = CutSet.from_file(tiny_corpus["train"])
    for cut in list(cuts)[:20]:
        sup = cut.supervisions[0]
        words = sup.alignment["word"]
        assert [w.symbol for w in words] == sup.text.split()
        assert all(a.end <= b.start for a, b in zip(words, words[1:])) and words[-1].end <= cut.duration
    tok = BPETokenizer.build((c.supervisions[0].text for c in cuts), vocab_size=128)  # one piece per word
    batch = next(featurized(make_loader(cuts, tok,
                                        LoaderConfig(max_duration_s=8, shuffle=False, seed=0,
                                                     token_alignment=True),
                                        dp_rank=0, dp_size=1)))
    ends, lens, frames = batch["token_end_frames"], batch["target_lens"], batch["feature_mask"].sum(1)
    for e, n, f in zip(ends, lens, frames):
        e = e[:n]
        assert torch.all(e[1:] > e[:-1]) and abs(int(e[-1]) - int(f)) <= 1  # the last token ends with the audio
