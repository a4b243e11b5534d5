"""`python -m common.data check` finds each kind of bad item; training's filter finds the same ones."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from common.data.__main__ import main as data_cli
from common.data.checks import BadItem, BadItemError, load_checked
from common.data.loading import MetadataFilter
from common.data.sources import open_source, parse_sources
from common.data.tokenizer import BPETokenizer
from tests.conftest import ROOT
from tests.corpora import BAD_KINDS, tone_cuts, write_bad_items, write_nemo_corpus


@pytest.fixture(scope="module")
def bad_manifest(tiny_corpus, tmp_path_factory):
    return write_bad_items(tmp_path_factory.mktemp("bad"), tone_cuts(tiny_corpus["train"], 1)[0])


def test_check_reports_each_kind_with_its_file(bad_manifest, capsys):
    manifest, paths = bad_manifest
    assert data_cli(["check", str(manifest), "--max-duration-s", "30"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"7 items, 0 good .* 7 bad", out), out
    for kind in BAD_KINDS:
        count = re.search(rf"^  {kind}\s+(\d+)", out, re.M)
        assert count and int(count.group(1)) == 1, (kind, out)
        assert paths[kind] in out, (kind, out)
    assert re.search(r"^  no_transcript\s+0", out, re.M)


def test_check_passes_a_clean_manifest_and_exit_codes(tiny_corpus, tmp_path, capsys):
    manifest, _ = write_nemo_corpus(tmp_path, tone_cuts(tiny_corpus["train"], 8))
    assert data_cli(["check", str(manifest)]) == 0
    assert "8 items, 8 good" in capsys.readouterr().out
    assert data_cli(["check", str(tmp_path / "nope.json")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_check_with_a_tokenizer_flags_text_it_cannot_encode(tiny_corpus, tmp_path, capsys):
    from lhotse import CutSet

    cut = tone_cuts(tiny_corpus["train"], 1)[0]
    cut.supervisions[0].text = "日本語"
    CutSet.from_cuts([cut]).to_file(tmp_path / "cuts.jsonl.gz")
    BPETokenizer.build(["alpha bravo charlie"], vocab_size=16).save(tmp_path / "tok")
    assert data_cli(["check", str(tmp_path / "cuts.jsonl.gz"), "--tokenizer", str(tmp_path / "tok")]) == 1
    assert re.search(r"^  untokenizable_text\s+1", capsys.readouterr().out, re.M)


def test_make_data_check(bad_manifest):
    proc = subprocess.run(["make", "-s", "data-check", f"MANIFEST={bad_manifest[0]}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "missing_file" in proc.stdout, proc.stdout + proc.stderr


def test_training_filter_and_loader_find_the_same_items(bad_manifest):
    manifest, paths = bad_manifest
    keep = MetadataFilter(tokenizer=None, max_duration_s=30)
    cuts = [c for c in open_source(parse_sources(str(manifest), "data.train")[0]) if keep(c)]
    found = {item["kind"] for item in keep.bad_items.values()}
    assert found == {"bad_duration", "duration_mismatch", "empty_text", "untokenizable_text", "too_long"}
    # What only reading the audio reveals:
    audio_kinds = set()
    for cut in cuts:
        with pytest.raises(BadItem) as exc:
            load_checked(cut, 16000)
        audio_kinds.add(exc.value.kind)
        assert exc.value.path == paths[exc.value.kind]
    assert audio_kinds == {"missing_file", "unreadable_audio"}


def test_error_mode_names_the_file(bad_manifest):
    keep = MetadataFilter(tokenizer=None, max_duration_s=30, on_bad_item="error")
    with pytest.raises(BadItemError, match=re.escape(bad_manifest[1]["bad_duration"])):
        [c for c in open_source(parse_sources(str(bad_manifest[0]), "data.train")[0]) if keep(c)]


def test_cli_runs_as_a_module(bad_manifest):
    proc = subprocess.run([sys.executable, "-m", "common.data", "check", str(bad_manifest[0])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "unreadable_audio" in proc.stdout


def test_make_to_shar_writes_where_shar_says(tiny_corpus, tmp_path):
    out = tmp_path / "shar"
    proc = subprocess.run(["make", "-s", "to-shar", f"MANIFEST={tiny_corpus['val']}", f"SHAR={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("cuts.*.jsonl.gz")) == ["cuts.000000.jsonl.gz"]
    # Again into the same (now non-empty) directory: refused, nothing overwritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(["make", "-s", "to-shar", f"MANIFEST={tiny_corpus['val']}", f"SHAR={out}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and f"{out} exists and is not an empty directory" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
