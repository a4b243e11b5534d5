"""Every input format the data layer takes, on files the tests write: lhotse cuts, lhotse recipe
manifests (lhotse's own prepare_librispeech), Lhotse Shar, NeMo manifests, weighted mixes."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from common.data.__main__ import main as data_cli
from common.data.audio import load_mono
from common.data.sources import (
    SourceError,
    iter_texts,
    nemo_to_cuts,
    open_source,
    open_sources,
    parse_sources,
)
from tests.corpora import tone_cuts, write_librispeech_tree, write_nemo_corpus


@pytest.fixture(scope="module")
def originals(tiny_corpus):
    return tone_cuts(tiny_corpus["train"], 8)


def _dominant_hz(audio: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sr)[spectrum.argmax()])


def test_lhotse_cuts_manifest(tiny_corpus):
    (spec,) = parse_sources(str(tiny_corpus["train"]), "data.train")
    assert spec.format == "cuts"
    cuts = list(open_source(spec))
    assert len(cuts) == tiny_corpus["spec"]["num_train"]
    assert all(len(c.supervisions) == 1 for c in cuts)
    assert list(iter_texts([spec])) == [c.supervisions[0].text for c in cuts]


def test_librispeech_prepared_by_lhotse_recipe(tmp_path, originals):
    from lhotse.recipes import prepare_librispeech

    corpus = write_librispeech_tree(tmp_path, originals)
    prepare_librispeech(corpus, dataset_parts=["dev-clean"], output_dir=tmp_path / "manifests")
    item = {"recordings": str(tmp_path / "manifests" / "librispeech_recordings_dev-clean.jsonl.gz"),
            "supervisions": str(tmp_path / "manifests" / "librispeech_supervisions_dev-clean.jsonl.gz")}
    (spec,) = parse_sources([item], "data.train")
    assert spec.format == "recordings+supervisions"
    cuts = sorted(open_source(spec), key=lambda c: c.id)
    assert [c.supervisions[0].text for c in cuts] == [o.supervisions[0].text.upper() for o in originals]
    for cut, original in zip(cuts, originals):
        np.testing.assert_allclose(load_mono(cut, 16000), original.load_audio()[0], atol=1e-4)  # FLAC: lossless


def test_long_recording_with_several_supervisions_is_cut_per_supervision(tmp_path, originals):
    import soundfile as sf
    from lhotse import CutSet, Recording, SupervisionSegment

    audio = np.concatenate([c.load_audio()[0] for c in originals[:3]])
    sf.write(tmp_path / "lecture.wav", audio, 16000)
    rec = Recording.from_file(tmp_path / "lecture.wav")
    start, sups = 0.0, []
    for i, c in enumerate(originals[:3]):
        sups.append(SupervisionSegment(f"seg{i}", rec.id, start, c.duration, text=c.supervisions[0].text))
        start += c.duration
    cut = rec.to_cut()
    cut.supervisions = sups
    CutSet.from_cuts([cut]).to_file(tmp_path / "lecture_cuts.jsonl.gz")
    cuts = list(open_source(parse_sources(str(tmp_path / "lecture_cuts.jsonl.gz"), "data.val")[0]))
    assert [c.supervisions[0].text for c in cuts] == [c.supervisions[0].text for c in originals[:3]]
    for cut, original in zip(cuts, originals[:3]):
        np.testing.assert_allclose(load_mono(cut, 16000), original.load_audio()[0], atol=1e-4)


def test_shar_export_and_read_back(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "shar"
    assert data_cli(["to-shar", str(tiny_corpus["val"]), str(out), "--shard-size", "5"]) == 0
    assert "4 shard(s)" in capsys.readouterr().out  # 16 validation cuts, 5 per shard
    (spec,) = parse_sources(str(out), "data.train")
    assert spec.format == "shar"
    originals = {c.id: c for c in open_source(parse_sources(str(tiny_corpus["val"]), "data.val")[0])}
    shar = list(open_source(spec))
    assert sorted(c.id for c in shar) == sorted(originals)
    for cut in shar[:4]:
        assert cut.supervisions[0].text == originals[cut.id].supervisions[0].text
        np.testing.assert_allclose(load_mono(cut, 16000), originals[cut.id].load_audio()[0], atol=1e-4)
    assert sorted(iter_texts([spec])) == sorted(c.supervisions[0].text for c in originals.values())


def test_nemo_manifest_rates_stereo_offsets_in_place(tmp_path, originals):
    manifest, entries = write_nemo_corpus(tmp_path, originals)
    (spec,) = parse_sources(str(manifest), "data.train")
    assert spec.format == "nemo"
    cuts = list(open_source(spec))
    assert [c.supervisions[0].text for c in cuts] == [e["text"] for e in entries]
    kinds = Counter(e["kind"] for e in entries)
    assert kinds["long"] == 2 and kinds["stereo44k"] == 2
    for cut, entry, original in zip(cuts, entries, originals):
        # The audio is read in place from the user's files (not copied).
        assert cut.recording.sources[0].source.startswith(str(tmp_path / "nemo"))
        audio = load_mono(cut, 16000)
        assert abs(len(audio) / 16000 - original.duration) < 0.01, entry
        # Same content as the original utterance: dominant tone and correlation.
        ref = original.load_audio()[0]
        n = min(len(audio), len(ref))
        assert abs(_dominant_hz(audio[:n], 16000) - _dominant_hz(ref[:n], 16000)) < 10, entry
        assert np.corrcoef(audio[:n], ref[:n])[0, 1] > 0.9, entry
    stereo = next(c for c, e in zip(cuts, entries) if e["kind"] == "stereo44k")
    assert stereo.num_channels == 2 and stereo.sampling_rate == 44100


def test_nemo_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"audio_filepath": "a.wav", "text": "x"}) + "\n")
    with pytest.raises(SourceError, match=r"m.json:1: .*'duration'"):
        nemo_to_cuts(bad)
    bad.write_text("{not json\n")
    with pytest.raises(SourceError, match=r"m.json:1: not a JSON object"):
        nemo_to_cuts(bad)


def test_weighted_mix_draws_by_weight_the_same_on_every_rank(tmp_path, tiny_corpus, originals):
    manifest, _ = write_nemo_corpus(tmp_path, originals)
    specs = parse_sources([{"path": str(tiny_corpus["train"]), "weight": 3}, {"path": str(manifest), "weight": 1}],
                          "data.train")

    def stream():
        return [c.recording.sources[0].source for c in islice(open_sources(specs, seed=7, mix=True), 800)]

    drawn = stream()
    share = sum("nemo" in src for src in drawn) / len(drawn)
    assert 0.18 < share < 0.32  # weight 1 of 4; the small source repeats endlessly
    assert drawn == stream()    # same seed, same stream: every rank draws the same global batches


@pytest.mark.parametrize("value, message", [
    ([{"path": "/nope/cuts.jsonl.gz"}], r"data.train\[0\]: no such file or directory: /nope/cuts.jsonl.gz"),
    ([{"pth": "x"}], r"data.train\[0\]: unknown key\(s\) \['pth'\]"),
    ([{"path": "TRAIN", "weight": 0}], r"data.train\[0\]: weight must be > 0"),
    ([{"path": "TRAIN", "format": "kaldi"}], r"format 'kaldi' is not known"),
    ([{"recordings": "TRAIN"}], r"give both 'recordings' and 'supervisions'"),
])
def test_source_errors_name_setting_and_file(tiny_corpus, value, message):
    value = [{k: (str(tiny_corpus["train"]) if v == "TRAIN" else v) for k, v in item.items()} for item in value]
    with pytest.raises(SourceError, match=message):
        parse_sources(value, "data.train")


def test_recording_set_alone_is_explained(tmp_path, originals):
    from lhotse import RecordingSet

    RecordingSet.from_recordings([c.recording for c in originals]).to_file(tmp_path / "recs.jsonl.gz")
    with pytest.raises(SourceError, match="RecordingSet; give it as 'recordings' together with its 'supervisions'"):
        parse_sources(str(tmp_path / "recs.jsonl.gz"), "data.train")
