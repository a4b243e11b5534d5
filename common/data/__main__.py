"""Data tools: validate a manifest before training, export one to Lhotse Shar.

Usage::

    python -m common.data check data/train_cuts.jsonl.gz                      # lhotse cuts
    python -m common.data check /data/nemo/train.json --tokenizer outputs/asr_ddp/latest/tokenizer
    python -m common.data check --recordings recs.jsonl.gz --supervisions sups.jsonl.gz --max-duration-s 20
    python -m common.data to-shar data/train_cuts.jsonl.gz /data/shar/train --shard-size 1000
    python -m common.data to-shar s3://corpus/nemo/train.json /data/shar/train     # remote input
    python -m common.data shar-index /data/shar/from_elsewhere   # offsets for a Shar dir lhotse wrote

Manifests may be local paths, ``s3://`` or ``http(s)://`` URLs or ``pipe:`` commands (credentials from
the environment, :mod:`common.data.remote`). ``to-shar`` writes locally, with the offset index that
lets each rank read only its own items (:mod:`common.data.shar`); upload the directory whole
(``aws s3 sync /data/shar/train s3://corpus/shar/train``).

(``make data-check MANIFEST=...`` and ``make to-shar MANIFEST=... OUT=...`` run the same.)

``check`` reads every item's audio and prints, per kind of problem, how many items have it and
the first few offenders by path; it exits with status 1 when anything is wrong, 2 when the
manifest itself cannot be read, 0 when all is well.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from .checks import KINDS, BadItem, load_checked, metadata_problem
from .remote import RemoteError, is_remote, redact
from .shar import SharError, materialize, write_index
from .sources import SourceError, SourceSpec, open_source, parse_sources


def _source_from_args(args) -> SourceSpec:
    if args.recordings or args.supervisions:
        item = {"recordings": args.recordings, "supervisions": args.supervisions}
    elif args.manifest:
        item = {"path": args.manifest}
    else:
        raise SourceError("give a manifest (cuts .jsonl.gz, Shar directory, NeMo .json) or "
                          "--recordings and --supervisions")
    if args.format:
        item["format"] = args.format
    return parse_sources([item], setting="manifest")[0]


def check(args) -> int:
    spec = _source_from_args(args)
    tokenizer = None
    if args.tokenizer:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    problems: dict[str, list[BadItem]] = defaultdict(list)
    total, audio_s, t0, last_report = 0, 0.0, time.monotonic(), time.monotonic()
    for cut in open_source(spec):
        total += 1
        bad = metadata_problem(cut, tokenizer, args.max_duration_s)
        if bad is None and not args.skip_audio:
            try:
                load_checked(cut, args.sample_rate)
            except BadItem as exc:
                bad = exc
        if bad is not None:
            problems[bad.kind].append(bad)
        else:
            audio_s += cut.duration
        if time.monotonic() - last_report > 10:  # progress on long manifests, on stderr
            last_report = time.monotonic()
            print(f"... {total} items checked, {sum(map(len, problems.values()))} bad, "
                  f"{total / (last_report - t0):.0f} items/s", file=sys.stderr, flush=True)

    num_bad = sum(len(v) for v in problems.values())
    print(f"{spec.name} ({spec.format}): {total} items, {total - num_bad} good ({audio_s / 3600:.2f} h), "
          f"{num_bad} bad")
    for kind, label in KINDS.items():
        found = problems.get(kind, [])
        print(f"  {kind:<20} {len(found):>7}   {label}")
        for item in found[: args.num_examples]:
            print(f"      {item.path}  [{item.cut_id}]  {item.detail}")
    if total == 0:
        print("  the manifest has no items")
        return 1
    return 1 if num_bad else 0


def _local_only(path: str, name: str, why: str) -> None:
    if is_remote(path):
        raise SourceError(f"{name} {redact(path)}: {why}")


def to_shar(args) -> int:
    _local_only(args.out_dir, "SHAR/out_dir", "to-shar writes a local directory (with its offset index); upload it "
                "afterwards, e.g. aws s3 sync <dir> s3://bucket/prefix (nothing was written)")
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: SHAR/out_dir {out} exists and is not an empty directory; to-shar writes a new directory "
              "and overwrites nothing (nothing was changed)", file=sys.stderr)
        return 2
    spec = _source_from_args(args)
    cuts = open_source(spec)
    out.mkdir(parents=True, exist_ok=True)
    # A Shar or remote source's items are fetched as they are written (materialize: one ranged read each).
    written = cuts.map(materialize).to_shar(args.out_dir, fields={"recording": args.audio_format},
                                           shard_size=args.shard_size, num_jobs=args.num_jobs)
    shards = len(written.get("cuts", []))
    write_index(out)
    print(f"wrote {shards} shard(s) of at most {args.shard_size} items, with their offset index, to {args.out_dir} "
          f"(train with data.train={args.out_dir})")
    return 0


def shar_index(args) -> int:
    _local_only(args.shar_dir, "SHAR_DIR", "shar-index indexes a local copy (it reads the tar headers); upload the "
                "recording_index.*.jsonl.gz files it writes beside the tars")
    written = write_index(args.shar_dir)
    print(f"indexed {written} shard(s) of {args.shar_dir} (shards already indexed are left as they are)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "to-shar"):
        p = sub.add_parser(name)
        p.add_argument("manifest", nargs="?", help="lhotse cuts .jsonl.gz, Shar directory or NeMo JSON lines")
        if name == "to-shar":
            p.add_argument("out_dir")
            p.add_argument("--shard-size", type=int, default=1000)
            p.add_argument("--audio-format", default="flac", choices=("flac", "wav", "opus"))
            p.add_argument("--num-jobs", type=int, default=1)
        p.add_argument("--recordings", help="lhotse RecordingSet (with --supervisions), as lhotse recipes write")
        p.add_argument("--supervisions")
        p.add_argument("--format", choices=("cuts", "recordings+supervisions", "shar", "nemo"))
    i = sub.add_parser("shar-index", help="write the offset index of a local Shar directory lhotse wrote")
    i.add_argument("shar_dir")
    c = sub.choices["check"]
    c.add_argument("--tokenizer", help="a saved tokenizer directory (a run's tokenizer/): flags untokenizable text")
    c.add_argument("--max-duration-s", type=float, default=30.0, help="longer items are reported (default 30)")
    c.add_argument("--sample-rate", type=int, default=16000, help="the model's rate; audio is resampled to it")
    c.add_argument("--num-examples", type=int, default=5, help="offenders listed per kind")
    c.add_argument("--skip-audio", action="store_true", help="metadata checks only (no audio decoding)")
    args = parser.parse_args(argv)
    try:
        return {"check": check, "to-shar": to_shar, "shar-index": shar_index}[args.command](args)
    except (SourceError, SharError, RemoteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
