"""Check a finished run against its goals; exit non-zero (with the numbers) when one is missed.

Usage::

    python -m common.tools.check_run outputs/salm_tp_fsdp2/latest --max-wall-s 600 --max-wer 0.20
    python -m common.tools.check_run outputs/asr_ddp/latest --max-test-wer unseen_sentences.wer_lm=0.15 --require-test unseen_voices
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.rundir import SUMMARY_FILE, read_summary


def check(run_dir: Path, max_wall_s: float | None, max_wer: float | None, min_wer_drop: float | None,
          min_mel_loss_drop_ratio: float | None = None, max_asr_cer: float | None = None,
          max_test_wer: dict | None = None, require_test: tuple = ()) -> list[str]:
    path = run_dir / SUMMARY_FILE
    if not path.exists():
        return [f"{path}: no summary.json (did the run start?)"]
    s = json.loads(path.read_text())
    problems = []
    if s["status"] != "completed":
        problems.append(f"status is {s['status']!r} ({s.get('error')})")
    if max_wall_s is not None and s["wall_s"] > max_wall_s:
        problems.append(f"wall_s {s['wall_s']:.0f} > {max_wall_s:.0f}")
    wer = s.get("val", {}).get("wer")
    if max_wer is not None and (wer is None or wer > max_wer):
        problems.append(f"val.wer {wer} > {max_wer}")
    first = s.get("val_first", {}).get("wer")
    if min_wer_drop is not None and (wer is None or first is None or first - wer < min_wer_drop):
        problems.append(f"val.wer fell from {first} to {wer}: less than {min_wer_drop}")
    mel, mel_first = s.get("val", {}).get("mel_loss"), s.get("val_first", {}).get("mel_loss")
    if min_mel_loss_drop_ratio is not None and (
        mel is None or mel_first is None or mel > (1 - min_mel_loss_drop_ratio) * mel_first
    ):
        problems.append(f"val.mel_loss fell from {mel_first} to {mel}: less than {min_mel_loss_drop_ratio:.0%}")
    if max_asr_cer is not None:
        val = s.get("val", {})
        cer = val.get("asr_cer")
        if cer is None:
            problems.append("no val.asr_cer: the run had no eval.asr_checkpoint (train a recognizer first: "
                            "make quality RECIPE=asr_ddp)")
        elif cer > max_asr_cer:
            problems.append(f"val.asr_cer {cer:.3f} > {max_asr_cer}")
        # Synthesis must end on its own: no sentence cut at the frame limit, none shorter than its text.
        for key in ("synthesis_hit_frame_limit", "synthesis_too_short"):
            if val.get(key):
                problems.append(f"val.{key}: {val[key]} of {val.get('asr_num_sentences')} sentences")
    tests = s.get("test", {})
    for name, limit in (max_test_wer or {}).items():
        name, _, key = name.partition(".")  # unseen_sentences or unseen_sentences.wer_lm
        got = tests.get(name, {}).get(key or "wer")
        if got is None or got > limit:
            problems.append(f"test.{name}.{key or 'wer'} {got} > {limit}" if got is not None else
                            f"no test.{name}.{key or 'wer'} in summary.json (data.test sets: {sorted(tests)})")
    problems += [f"no test.{name} in summary.json (data.test sets: {sorted(tests)})"
                 for name in require_test if name not in tests]
    return problems


def _limit(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME[.KEY]=WER, e.g. unseen_sentences=0.15 or "
                                         f"unseen_sentences.wer_lm=0.15, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--max-wall-s", type=float)
    p.add_argument("--max-wer", type=float)
    p.add_argument("--min-wer-drop", type=float)
    p.add_argument("--min-mel-loss-drop-ratio", type=float, help="e.g. 0.6: val.mel_loss at most 40%% of the first")
    p.add_argument("--max-asr-cer", type=float,
                   help="TTS: the recognizer's CER on the synthesized held-out sentences (val.asr_cer), and every "
                        "sentence's synthesis ended on its own")
    p.add_argument("--max-test-wer", type=_limit, action="append", default=[], metavar="NAME[.KEY]=WER",
                   help="a data.test set's WER (summary.json test.NAME.KEY, KEY wer by default; wer_lm: with the "
                        "word LM) at most this; repeatable")
    p.add_argument("--require-test", action="append", default=[], metavar="NAME",
                   help="a data.test set that must have been scored (reported, no goal); repeatable")
    a = p.parse_args(argv)
    problems = check(a.run_dir, a.max_wall_s, a.max_wer, a.min_wer_drop, a.min_mel_loss_drop_ratio, a.max_asr_cer,
                     dict(a.max_test_wer), tuple(a.require_test))
    summary = read_summary(a.run_dir)
    print(json.dumps({k: summary.get(k) for k in ("recipe", "status", "steps", "wall_s", "val", "val_first", "test", "throughput")}, indent=2))
    for problem in problems:
        print(f"FAIL {a.run_dir}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
