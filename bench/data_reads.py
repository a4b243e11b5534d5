"""Bytes each rank's training loader reads over one pass, counted by the server that serves the corpus.

The corpus (``n`` utterances of the generated corpus) is served over HTTP on loopback
(:class:`bench.http_corpus.CorpusServer`) in two forms: Lhotse Shar with its offset index, and a cut
manifest whose recordings are the audio files' URLs. For each form, data-parallel size and loader
worker count, one training pass of every rank's loader runs (the recipes' ``make_loader``: 2-D
buckets, carry-over, dp shards) and the server's byte counts give

* ``read_amplification``: audio bytes sent to all ranks together / the corpus's audio bytes
  (1.0: every item read once, by the rank that trains it; a little less when a pass carries its
  buckets' tails into the next, which reads them there), and ``trained_audio_bytes``: the audio
  bytes of the items the pass trained (equal to what was read when nothing is read twice);
* ``metadata_bytes_per_rank``: manifest and index bytes one rank reads per pass (every rank plans
  the same global batches from them);
* ``audio_s_per_s``: audio seconds per second one rank's loader delivers from that source.

Usage::

    from bench.data_reads import corpus_forms, measure
    with corpus_forms(tmp, num_utterances=200) as forms:
        row = measure(forms, "shar", dp_size=4, num_workers=2)   # {'read_amplification': 1.0, ...}
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import time
from pathlib import Path

from .http_corpus import CorpusServer

AUDIO_SUFFIXES = (".tar", ".wav", ".flac")


@contextlib.contextmanager
def corpus_forms(workdir: Path, num_utterances: int = 200, data_dir: Path | None = None, shard_size: int = 50,
                 manifest: Path | None = None):
    """Serves ``num_utterances`` of the generated corpus (or of the cut ``manifest``) as Shar and as a
    URL cut manifest; yields
    ``{"server", "shar": url, "cuts": url, "texts", "audio_bytes": {"shar": n, "cuts": n}}``."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    from common.data.__main__ import main as data_tool
    from common.data.corpus import ensure_tone_corpus

    workdir = Path(workdir)
    manifest = manifest or ensure_tone_corpus(data_dir or workdir / "generated")["train"]
    cuts = CutSet.from_file(manifest).subset(first=num_utterances).to_eager()
    (workdir / "served" / "audio").mkdir(parents=True, exist_ok=True)
    local = workdir / "local_cuts.jsonl.gz"
    cuts.to_file(local)
    if data_tool(["to-shar", str(local), str(workdir / "served" / "shar"), "--shard-size", str(shard_size)]) != 0:
        raise RuntimeError("to-shar failed")
    with CorpusServer(workdir / "served") as server:
        remote = []
        for cut in cuts:
            src = Path(cut.recording.sources[0].source)
            shutil.copy(src, workdir / "served" / "audio" / src.name)
            source = fastcopy(cut.recording.sources[0], type="url", source=server.url(f"audio/{src.name}"))
            remote.append(fastcopy(cut, recording=fastcopy(cut.recording, sources=[source])))
        CutSet.from_cuts(remote).to_file(workdir / "served" / "cuts.jsonl.gz")
        shar_items = {(e := json.loads(line))["cut_id"]: e["recording_index"]["size"]
                      for p in sorted((workdir / "served" / "shar").glob("recording_index.*.jsonl.gz"))
                      for line in gzip.open(p, "rt")}
        cuts_items = {c.id: (workdir / "served" / "audio" / Path(c.recording.sources[0].source).name).stat().st_size
                      for c in cuts}
        from common.data.shar import shards

        yield {"server": server, "shar": server.url("shar"), "cuts": server.url("cuts.jsonl.gz"),
               "shar_shards": shards(server.url("shar")),
               "texts": [c.supervisions[0].text for c in cuts], "item_bytes": {"shar": shar_items, "cuts": cuts_items},
               "audio_bytes": {"shar": sum(shar_items.values()), "cuts": sum(cuts_items.values())}}


def measure(forms: dict, kind: str, dp_size: int, num_workers: int, max_duration_s: float = 30.0) -> dict:
    """One pass of every rank's loader over ``forms[kind]`` ("shar", "cuts", or "shar_stream": the same
    Shar through lhotse's streaming reader, as this repository read it before); the server's counts."""
    from common.data.loading import LoaderConfig, make_loader
    from common.data.sources import open_sources, parse_sources
    from common.data.tokenizer import WordTokenizer

    server = forms["server"]
    tokenizer = WordTokenizer.build(forms["texts"])

    def cuts():
        if kind == "shar_stream":  # the baseline: lhotse's reader, tars streamed whole with the cuts files
            from lhotse import CutSet

            return CutSet.from_shar(fields={"cuts": [s["cuts"] for s in forms["shar_shards"]],
                                            "recording": [s["recording"] for s in forms["shar_shards"]]})
        return open_sources(parse_sources(forms[kind], setting="data.train"), seed=0, mix=True)

    audio_bytes, metadata_bytes, items, audio_s, seconds, trained_bytes = 0, [], 0, 0.0, 0.0, 0
    for dp_rank in range(dp_size):
        before = dict(server.bytes_by_path)
        loader = make_loader(cuts(), tokenizer,
                             LoaderConfig(max_duration_s=max_duration_s * dp_size, shuffle=True, seed=0,
                                          num_workers=num_workers),
                             dp_rank=dp_rank, dp_size=dp_size)
        t0 = time.perf_counter()
        for batch in loader:
            items += len(batch["ids"])
            trained_bytes += sum(forms["item_bytes"][kind.split("_")[0]][i] for i in batch["ids"])
            audio_s += float(batch["audio"].lengths.sum()) / 16000
        seconds += time.perf_counter() - t0
        sent = {p: n - before.get(p, 0) for p, n in server.bytes_by_path.items()}
        audio_bytes += sum(n for p, n in sent.items() if p.endswith(AUDIO_SUFFIXES))
        metadata_bytes.append(sum(n for p, n in sent.items() if not p.endswith(AUDIO_SUFFIXES)))
    return {"source": kind, "dp_size": dp_size, "num_workers": num_workers, "items_trained": items,
            "corpus_audio_bytes": forms["audio_bytes"][kind.split("_")[0]], "audio_bytes_read": audio_bytes,
            "trained_audio_bytes": trained_bytes,  # of the items this pass trained (tails carried out: next pass)
            "read_amplification": round(audio_bytes / forms["audio_bytes"][kind.split("_")[0]], 4),
            "metadata_bytes_per_rank": max(metadata_bytes), "audio_s_per_s": round(audio_s / seconds, 1)}


def write_metadata_corpus(directory: Path, num_utterances: int, shard_size: int = 10_000, seed: int = 0) -> Path:
    """A Shar directory of ``num_utterances`` generated cuts, metadata only (cuts files and offset
    indexes; the tars are empty): what planning reads, at any size."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2000)]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, num_utterances, shard_size)):
        n = min(shard_size, num_utterances - start)
        with gzip.open(directory / f"cuts.{shard:06d}.jsonl.gz", "wt", compresslevel=1) as cuts, \
                gzip.open(directory / f"recording_index.{shard:06d}.jsonl.gz", "wt", compresslevel=1) as index:
            offset = 512
            for i in range(start, start + n):
                d = round(rng.uniform(1.0, 20.0), 2)
                text = " ".join(rng.choice(words) for _ in range(max(1, int(d * 2.5))))
                samples = int(d * 16000)
                cuts.write(json.dumps({
                    "id": f"u{i}", "start": 0, "duration": d, "channel": 0,
                    "supervisions": [{"id": f"u{i}", "recording_id": f"u{i}", "start": 0, "duration": d, "channel": 0,
                                      "text": text}],
                    "recording": {"id": f"u{i}", "sources": [{"type": "shar", "channels": [0], "source": ""}],
                                  "sampling_rate": 16000, "num_samples": samples, "duration": d, "channel_ids": [0]},
                    "type": "MonoCut"}) + "\n")
                size = samples // 2
                index.write(json.dumps({"cut_id": f"u{i}", "recording_index": {"offset": offset, "size": size}}) + "\n")
                offset += size + 1536
        (directory / f"recording.{shard:06d}.tar").touch()
    return directory


def plan_pass_time(directory: Path, dp_size: int = 128, max_duration_s: float = 3200.0) -> dict:
    """Seconds one rank takes to plan a whole pass (bucket bins, 2-D grid, every global batch) of a
    metadata-only Shar directory, and the metadata bytes it reads."""
    from common.data.loading import LoaderConfig, make_loader
    from common.data.sources import open_sources, parse_sources
    from common.data.tokenizer import WordTokenizer

    tokenizer = WordTokenizer.build([" ".join(f"w{i}" for i in range(2000))])
    t0 = time.perf_counter()
    loader = make_loader(open_sources(parse_sources(str(directory), "data.train"), seed=0, mix=True), tokenizer,
                         LoaderConfig(max_duration_s=max_duration_s, shuffle=True, seed=0, num_buckets=24,
                                      num_token_buckets=2),
                         dp_rank=0, dp_size=dp_size)
    batches = items = 0
    for batch in loader.sampler:
        batches += 1
        items += len(batch.cuts)
    seconds = time.perf_counter() - t0
    metadata = sum(p.stat().st_size for p in Path(directory).iterdir() if not p.name.endswith(".tar"))
    return {"utterances": items, "global_batches": batches, "plan_pass_s": round(seconds, 1),
            "metadata_bytes": metadata, "dp_size": dp_size}


if __name__ == "__main__":  # python -m bench.data_reads <dir> <num_utterances>: the planning time at that size
    import sys

    target, count = Path(sys.argv[1]), int(sys.argv[2])
    if not target.exists():
        t = time.perf_counter()
        write_metadata_corpus(target, count)
        print(f"wrote {count} utterances of metadata in {time.perf_counter() - t:.0f} s", flush=True)
    print(json.dumps(plan_pass_time(target)), flush=True)
