"""Data at cluster scale: each rank reads only its share, from local disk, HTTP or S3; bad remote input
is one line naming the URL, or a counted skip; nothing hangs.

Bytes are counted by the server that serves the corpus (bench.http_corpus), so the counts include
DataLoader workers and anything else that reads."""

from __future__ import annotations

import gzip
import json
import shutil
import time

import numpy as np
import pytest

from bench.data_reads import AUDIO_SUFFIXES, corpus_forms, measure
from common.data import remote
from common.data.__main__ import main as data_cli
from common.data.audio import load_mono
from common.data.sources import SourceError, iter_texts, open_sources, parse_sources
from tests.conftest import free_port
from tests.object_store import SECRET_KEY, s3_store


@pytest.fixture(scope="module")
def forms(tiny_corpus, tmp_path_factory):
    with corpus_forms(tmp_path_factory.mktemp("served"), num_utterances=96, manifest=tiny_corpus["train"],
                      shard_size=24) as served:
        yield served


@pytest.mark.parametrize("kind", ["shar", "cuts"])
def test_each_rank_reads_about_its_share_with_any_number_of_workers(kind, forms):
    """One pass of every rank's loader at dp 1, 2, 4 with 0, 1, 2 workers: all ranks together read
    each item's audio about once (<= 1.15x the corpus; carried tails are read in the next pass), and
    train about all of it."""
    rows = [measure(forms, kind, dp, workers, max_duration_s=8.0) for dp in (1, 2, 4) for workers in (0, 1, 2)]
    for row in rows:
        assert row["read_amplification"] <= 1.15, row
        assert row["audio_bytes_read"] == row["trained_audio_bytes"], row  # each trained item read once, nothing else
        assert row["items_trained"] >= 0.7 * 96, row  # the rest is carried into the next pass, not dropped
        assert row["metadata_bytes_per_rank"] > 0, row
    assert len({r["audio_bytes_read"] for r in rows if r["dp_size"] == 4}) == 1  # workers do not change what is read


def test_planning_reads_metadata_only(forms):
    """Bucket bins, the 2-D grid and every global batch of a pass come from the cuts and index files:
    no audio byte is read, and the cuts the sampler buffers hold no audio (only where it is)."""
    from common.data.loading import LoaderConfig, make_loader
    from common.data.shar import location
    from common.data.tokenizer import WordTokenizer

    server = forms["server"]
    before = dict(server.bytes_by_path)
    loader = make_loader(open_sources(parse_sources(forms["shar"], "data.train"), seed=0, mix=True),
                         WordTokenizer.build(forms["texts"]), LoaderConfig(max_duration_s=32.0, shuffle=True, seed=0),
                         dp_rank=0, dp_size=4)
    batches = list(loader.sampler)
    assert len(batches) > 3
    sent = {p: n - before.get(p, 0) for p, n in server.bytes_by_path.items() if n != before.get(p, 0)}
    assert sent and not [p for p in sent if p.endswith(AUDIO_SUFFIXES)], sent
    for batch in batches:
        for cut in batch.cuts:
            tar, offset, size = location(cut)
            assert tar.startswith(forms["shar"]) and size > 1000
            assert cut.recording.sources[0].type == "shar"  # no bytes in memory


def test_items_read_by_index_equal_lhotses_own_reader(tiny_corpus, tmp_path):
    """make to-shar writes an offset index that lhotse's reader still accepts; an item fetched by its
    offset decodes to the samples lhotse's streaming reader gives; a Shar directory lhotse wrote
    (no index) is indexed from its tar headers, locally on the fly or by `shar-index`."""
    from lhotse import CutSet

    cuts = CutSet.from_file(tiny_corpus["train"]).subset(first=30)
    ours = tmp_path / "ours"
    manifest = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(manifest)
    assert data_cli(["to-shar", str(manifest), str(ours), "--shard-size", "12"]) == 0
    assert len(list(ours.glob("recording_index.*.jsonl.gz"))) == 3
    streamed = {c.id: c.load_audio() for c in CutSet.from_shar(in_dir=ours)}  # lhotse reads it as before
    lhotse_dir = tmp_path / "lhotse"
    lhotse_dir.mkdir()
    cuts.to_shar(lhotse_dir, fields={"recording": "flac"}, shard_size=12)
    for directory in (ours, lhotse_dir):
        indexed = list(open_sources(parse_sources(str(directory), "data.train"), seed=0, mix=False))
        assert [c.id for c in indexed] == [c.id for c in cuts]
        for cut in indexed:
            np.testing.assert_array_equal(load_mono(cut, cut.sampling_rate), streamed[cut.id][0])
    assert data_cli(["shar-index", str(lhotse_dir)]) == 0
    assert sorted(gzip.open(p, "rt").read() for p in lhotse_dir.glob("recording_index.*.jsonl.gz")) == sorted(
        gzip.open(p, "rt").read() for p in ours.glob("recording_index.*.jsonl.gz"))


def test_sources_from_s3_http_and_pipe(forms, tiny_corpus, tmp_path):
    """Shar directories and manifests from an S3-compatible store (credentials from the environment),
    manifests over HTTP and through pipe: commands: the same items and texts as on local disk."""
    from lhotse import CutSet

    local = tmp_path / "cuts.jsonl.gz"
    CutSet.from_file(tiny_corpus["train"]).subset(first=96).to_file(local)
    expected = [c.id for c in CutSet.from_file(local)]
    shar_local = tmp_path / "shar"
    assert data_cli(["to-shar", str(local), str(shar_local), "--shard-size", "24"]) == 0
    with s3_store() as store:
        shar = store.upload(shar_local, "corpus", "shar/train")
        cuts_url = store.upload(local, "corpus", "manifests/train_cuts.jsonl.gz")
        for value in (shar, cuts_url, forms["cuts"], f"pipe:gunzip -c {local}"):
            specs = parse_sources(value, "data.train")
            assert [c.id for c in open_sources(specs, seed=0, mix=False)] == expected, value
            assert len(list(iter_texts(specs))) == 96
        first = next(iter(open_sources(parse_sources(shar, "data.train"), seed=0, mix=False)))
        reference = next(iter(CutSet.from_file(local)))
        np.testing.assert_allclose(load_mono(first, 16000), load_mono(reference, 16000), atol=1e-4)  # flac of the wav
        # make data-check reads a remote Shar directory, every item's audio by its range; make to-shar
        # exports a remote one (here back to local disk, with its index): the same items
        assert data_cli(["check", shar, "--max-duration-s", "30"]) == 0
        assert data_cli(["to-shar", shar, str(tmp_path / "again"), "--shard-size", "48"]) == 0
        again = list(open_sources(parse_sources(str(tmp_path / "again"), "data.train"), seed=0, mix=False))
        assert [c.id for c in again] == expected and len(list((tmp_path / "again").glob("recording_index.*"))) == 2
        assert data_cli(["to-shar", cuts_url, "s3://corpus/out"]) == 2  # writes locally, says how to upload


def _shar_copy(forms, tmp_path, name: str):
    served = forms["server"].root
    copy = served / name
    if not copy.exists():
        shutil.copytree(served / "shar", copy)
    return copy


def test_bad_remote_input_is_one_line_naming_the_url(forms, tmp_path, monkeypatch):
    """Missing shard, missing index, 403/404 and an unreachable endpoint stop before training with one
    line naming the URL; a transient 500 is retried; a slow server times out within bounds."""
    server = forms["server"]
    copy = _shar_copy(forms, tmp_path, "shar_missing")
    (copy / "recording.000002.tar").unlink()
    with pytest.raises(SourceError, match=r"recording\.000002\.tar is missing"):
        parse_sources(server.url("shar_missing"), "data.train")
    copy = _shar_copy(forms, tmp_path, "shar_noindex")
    for p in copy.glob("recording_index.*"):
        p.unlink()
    with pytest.raises(SourceError, match=r"recording_index\.000000\.jsonl\.gz is missing.*make to-shar writes the index"):
        parse_sources(server.url("shar_noindex"), "data.train")

    server.faults.update({"/cuts.jsonl.gz": "403"})
    try:
        with pytest.raises(SourceError, match=r"^data\.train\[0\]: cannot look up http://127\.0\.0\.1:\d+/cuts\.jsonl\.gz: "
                                              r".*403"):
            parse_sources(forms["cuts"] + "?X-Amz-Signature=secret", "data.train")
    finally:
        server.faults.clear()
    with pytest.raises(SourceError, match="no such file or directory: http://.*/nothing.jsonl.gz"):
        parse_sources(server.url("nothing.jsonl.gz"), "data.train")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=rf"cannot look up http://127\.0\.0\.1:{port}/c\.jsonl\.gz: cannot reach"):
        parse_sources(f"http://127.0.0.1:{port}/c.jsonl.gz", "data.train")
    assert time.monotonic() - t0 < 60  # bounded retries, not a hang

    tar = "/shar/recording.000001.tar"
    data = remote.read_range(server.url(tar), 512, 100)
    server.faults[tar] = "500-once"
    server._seen.discard(tar)
    try:
        assert remote.read_range(server.url(tar), 512, 100) == data  # retried after the 500
        server.faults[tar] = "no-range"
        with pytest.raises(remote.RemoteError, match="ignores Range requests"):
            remote.read_range(server.url(tar), 512, 100)
        server.faults[tar] = "slow"
        monkeypatch.setattr(remote, "TIMEOUT_S", (1.0, 0.3))
        monkeypatch.setattr(remote, "RETRIES", 1)
        with pytest.raises(remote.RemoteError, match=r"no answer within 0 s .*after 2 tries"):
            remote.read_range(server.url(tar), 512, 100)
    finally:
        server.faults.clear()


def test_unreadable_remote_items_are_counted_skips(forms, tmp_path):
    """A truncated tar: its items past the cut fail to fetch; the loader skips and counts each, naming
    the tar's URL, and trains on the rest (on_bad_item=error stops on the first, naming it)."""
    from common.data.checks import BadItemError
    from common.data.loading import LoaderConfig, make_loader
    from common.data.tokenizer import WordTokenizer

    copy = _shar_copy(forms, tmp_path, "shar_truncated")
    tar = copy / "recording.000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    url = forms["server"].url("shar_truncated")
    tokenizer = WordTokenizer.build(forms["texts"])
    loader = make_loader(open_sources(parse_sources(url, "data.train"), seed=0, mix=True), tokenizer,
                         LoaderConfig(max_duration_s=16.0, shuffle=True, seed=0),
                         dp_rank=0, dp_size=1)
    bad = [item for batch in loader for item in batch["bad_items"]]
    assert 5 <= len(bad) <= 13, len(bad)  # about half of shard 0's 24 items
    assert all(b["path"].startswith(url + "/recording.000000.tar@") for b in bad), bad[:2]
    assert all("truncated" in b["detail"] or "416" in b["detail"] for b in bad), bad[:2]
    strict = make_loader(open_sources(parse_sources(url, "data.train"), seed=0, mix=True), tokenizer,
                         LoaderConfig(max_duration_s=16.0, shuffle=True, seed=0, on_bad_item="error"),
                         dp_rank=0, dp_size=1)
    with pytest.raises(BadItemError, match=r"recording\.000000\.tar@"):
        for _ in strict:
            pass


def test_s3_credentials_come_from_the_environment_and_are_never_printed(tiny_corpus, tmp_path, monkeypatch):
    """Wrong credentials or an unreachable S3 endpoint: one line naming the s3:// URL and what to
    check; the secret key appears in no message."""
    with s3_store() as store:
        url = store.upload(tiny_corpus["train"], "corpus", "train_cuts.jsonl.gz")
        with store.requiring_auth(), pytest.raises(SourceError) as wrong:
            parse_sources(url, "data.train")
        assert "s3://corpus/train_cuts.jsonl.gz" in str(wrong.value) and "403" in str(wrong.value)
        assert SECRET_KEY not in str(wrong.value) and "\n" not in str(wrong.value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setattr(remote, "RETRIES", 1)
        remote._S3.clear()
        with pytest.raises(SourceError, match=r"s3://corpus/train_cuts\.jsonl\.gz: cannot reach the endpoint"):
            parse_sources(url, "data.train")
    assert remote.redact("https://user:pw@host:9/a/b.tar?X-Amz-Signature=abc") == "https://host:9/a/b.tar"
    assert json.dumps(remote.redact("s3://b/k")) == '"s3://b/k"'
