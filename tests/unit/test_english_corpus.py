"""The spoken English corpus (data=english): real text, split by sentence, many voices, and the one
text normalizer every WER goes through. The small corpora here are made for real with espeak-ng."""

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf
from lhotse import CutSet

from common.data import english
from common.data.english import EnglishCorpusSpec, ensure_english_corpus, plan, speakable_sentences
from common.data.text import hf_normalizer, normalize_text
from tests.conftest import ROOT

CASES = ["It's the \u201cGNU\u201d License, isn't it?", "'quoted' words\tand\nlines --  x", "Caf\u00e9 \uff21BC",
         "  ALPHA,  bravo!  ", "rock'n'roll, the dogs' bones", "e.g. this; that: (the other)", ""]


def test_normalizer_rules_and_the_tokenizers_copy_agree():
    assert normalize_text(CASES[0]) == "it's the gnu license isn't it"
    assert normalize_text(CASES[1]) == "quoted words and lines x"
    assert normalize_text(CASES[3]) == "alpha bravo"
    assert normalize_text(CASES[4]) == "rock'n'roll the dogs bones"
    hf = hf_normalizer()
    for text in CASES:
        assert hf.normalize_str(text) == normalize_text(text), text
        assert normalize_text(normalize_text(text)) == normalize_text(text)  # idempotent


def test_bpe_tokenizer_normalizes_with_the_project_normalizer():
    from common.data.tokenizer import BPETokenizer

    tok = BPETokenizer.build(["the gnu license isn't it"], vocab_size=40)
    for text in CASES:
        assert tok.normalize(text) == normalize_text(text)


def test_validation_wer_ignores_casing_and_punctuation():
    from torchmetrics.text import WordErrorRate

    from common.module import normalize_text as module_normalizer

    assert module_normalizer is normalize_text  # the module scores through the same function
    wer = WordErrorRate()
    wer.update([module_normalizer("hello world")], [module_normalizer("Hello, World!")])
    assert float(wer.compute()) == 0.0


def test_only_sentences_a_reader_says_as_written_are_kept():
    text = ("Return the value of the named attribute.\n\nSee PEP 8 for details. Call foo() then bar.\n\n"
            "This is e.g. an abbreviation here. The os.path module joins paths today. "
            "Use TypeError in this case now. Too short. You can't undo that change easily.")
    assert list(speakable_sentences(text)) == ["Return the value of the named attribute.",
                                              "You can't undo that change easily."]


@pytest.fixture(scope="module")
def sentences():
    return english.english_sentences()  # ~10 s: Python's standard library is parsed for its docstrings


def test_this_machine_has_enough_text_and_no_sentence_twice(sentences):
    keys = [s[0] for s in sentences]
    assert len(keys) == len(set(keys)) and len(keys) >= 5000
    assert all(k == normalize_text(k) for k in keys)
    assert {s[2] for s in sentences} >= {"python_reference", "python_docstrings"}


def test_dev_and_test_sentences_never_occur_in_training_and_test_voices_are_new(sentences):
    spec = EnglishCorpusSpec()
    items = plan(spec, sentences)
    by_split = {s: [i for i in items if i.split == s] for s in english.SPLITS}
    train = {i.text for i in by_split["train"]}
    assert train and not train & {i.text for i in by_split["dev"]} and not train & {i.text for i in by_split["test"]}
    assert [i.text for i in by_split["test"]] == [i.text for i in by_split["test_voices"]]
    variant = lambda i: i.voice.split("+")[1]  # noqa: E731
    heard = {variant(i) for s in ("train", "dev", "test") for i in by_split[s]}
    assert heard and not heard & {variant(i) for i in by_split["test_voices"]}
    assert {i.voice.split("+")[0] for i in by_split["train"]} == set(english.ACCENTS)
    assert len(heard) >= 40  # many voices, not a handful
    assert plan(spec, sentences) == items  # seeded: the same plan again


def test_one_voice_reads_the_same_sentences_in_one_manner_for_tts(sentences):
    """data.english.voice: the same sentences and splits, train/dev/test by that voice at one rate,
    pitch and level (a single-speaker TTS corpus); test_voices still by the unseen voices; its own cache."""
    many, one = plan(EnglishCorpusSpec(), sentences), plan(EnglishCorpusSpec(voice="en-us+m3"), sentences)
    assert [(i.uid, i.split, i.text) for i in one] == [(i.uid, i.split, i.text) for i in many]
    read = [i for i in one if i.split != "test_voices"]
    assert {(i.voice, i.rate_wpm, i.pitch, i.gain) for i in read} == {("en-us+m3", 167, 50, 0.6)}
    assert [i.voice for i in one if i.split == "test_voices"] == [i.voice for i in many if i.split == "test_voices"]
    keys = [s[0] for s in sentences]
    assert EnglishCorpusSpec(voice="en-us+m3").digest(keys) != EnglishCorpusSpec().digest(keys)
    with pytest.raises(english.EnglishCorpusError, match=r"data.english.voice='m3' is not <accent>\+<variant>"):
        EnglishCorpusSpec(voice="m3")


def test_a_small_slice_is_made_for_real_and_reused(tmp_path, sentences):
    (tmp_path / "english_corpus").mkdir()
    (tmp_path / "english_corpus" / f"sentences-{english.texts_fingerprint()}.json").write_text(json.dumps(sentences))
    made = ensure_english_corpus(tmp_path, max_sentences=4)
    root = made["train"].parent
    info = json.loads((root / "spec.json").read_text())
    assert info["utterances"] == {"train": 4, "dev": 4, "test": 4, "test_voices": 4}
    for split in english.SPLITS:
        cuts = CutSet.from_file(made[split])
        assert len(cuts) == 4
        for cut in cuts:
            sup = cut.supervisions[0]
            assert sup.text == normalize_text(sup.custom["original_text"]) and len(sup.text.split()) >= 4
            audio, sr = sf.read(cut.recording.sources[0].source)
            assert sr == 16000 and abs(len(audio) / sr - cut.duration) < 1e-3
            assert 0.5 < cut.duration < 30 and 0.01 < abs(audio).max() <= 1.0
    before = made["train"].stat().st_mtime_ns
    again = ensure_english_corpus(tmp_path, max_sentences=4)
    assert again["train"] == made["train"] and made["train"].stat().st_mtime_ns == before
    # make data-check passes on it
    check = subprocess.run([sys.executable, "-m", "common.data", "check", str(made["train"])], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_real_recordings_are_a_test_set_read_in_place(tmp_path):
    manifest = english.real_recordings_manifest(tmp_path)
    cuts = CutSet.from_file(manifest)
    assert len(cuts) == 10 and {c.supervisions[0].speaker for c in cuts} == {"pocketsphinx-librivox",
                                                                            "pocketsphinx-cards"}
    texts = {c.id: c.supervisions[0].text for c in cuts}
    assert texts["real-librivox-sense_and_sensibility_01_austen_64kb-0880"] == "he was not an ill disposed young man"
    assert all(str(english.REAL_RECORDINGS_DIR) in c.recording.sources[0].source for c in cuts)


@pytest.mark.slow  # make test-fast leaves it out
def test_without_espeak_ng_the_run_stops_in_one_line_naming_the_install(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no espeak-ng on this PATH
    proc = subprocess.run([sys.executable, "-m", "common.tools.launch", "asr_ddp", "--nproc", "1", "data=english",
                           f"data.dir={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "espeak-ng" in errors[0] and "apt-get install espeak-ng" in errors[0], proc.stderr


@pytest.mark.parametrize("recipe", ["asr_ddp", "salm_fsdp2", "tts_ddp"])
def test_the_preset_composes_for_every_recipe(recipe):
    from common.run import check_run, compose

    cfg = compose(recipe, ["data=english", "trainer.devices=2"])
    assert cfg.data.generate == "english" and cfg.data.english.max_sentences is None
    check_run(cfg)
