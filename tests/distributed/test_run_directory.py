"""Nothing lost under a user's mistakes, with real 2-process runs on one run directory: a
relaunch, a failed relaunch, a damaged newest checkpoint, ``run.resume=false``, and a second
launch while the first still runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from common.tools.check_run import check
from tests.conftest import jsonl_rows, run_recipe, start_recipe, tiny_overrides
from tests.processes import kill_tree

ASR = ("trainer.max_steps=6", "trainer.val_check_interval=6", "checkpoint.every_n_steps=3", "data.max_duration_s=8")




def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_every_launch_is_kept_and_the_summary_describes_the_whole_run(tiny_corpus, tmp_path):
    run_dir = tmp_path / "outputs" / "asr_ddp" / "exp"
    overrides = tiny_overrides(tiny_corpus, 2, *ASR)
    first = run_recipe("asr_ddp", 2, overrides, run_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    s1, metrics1 = _summary(run_dir), (run_dir / "metrics.jsonl").read_text()
    goals = {"max_wall_s": None, "max_wer": s1["val"]["wer"], "min_wer_drop": s1["val_first"]["wer"] - s1["val"]["wer"]}
    assert check(run_dir, **goals) == []

    # 1. The same command again: nothing left to train, and the summary still describes the run.
    again = run_recipe("asr_ddp", 2, overrides, run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    s2 = _summary(run_dir)
    assert (s2["status"], s2["steps"], s2["attempt"], s2["attempt_steps"]) == ("completed", 6, 2, 0)
    assert s2["val"] == s1["val"] and s2["val_first"] == s1["val_first"] and s2["throughput"] == s1["throughput"]
    assert check(run_dir, **goals) == []  # make quality judges it as it judged the first launch
    assert _summary(run_dir / "history" / "attempt-1") == s1
    # Nothing was cut from the step logs, so they were not copied (a job preempted many times does
    # not copy its whole log at every restart): they are still whole where they were.
    assert (run_dir / "metrics.jsonl").read_text() == metrics1
    assert not (run_dir / "history" / "attempt-1" / "metrics.jsonl").exists()
    config2 = (run_dir / "config.yaml").read_text()

    # 2. A relaunch with a bad value fails before touching anything.
    bad = run_recipe("asr_ddp", 2, [*overrides, "trainer.max_steps=abc"], run_dir, timeout=120)
    assert bad.returncode != 0 and "error: trainer.max_steps must be an integer >= 1, got 'abc'" in bad.stderr
    assert (run_dir / "config.yaml").read_text() == config2 and _summary(run_dir) == s2
    assert [r["attempt"] for r in jsonl_rows(run_dir / "attempts.jsonl")] == [1, 1, 2, 2]

    # 3. The newest checkpoint is damaged (a flipped byte): auto-resume sets it aside, says why and
    #    resumes from the one before; steps 4..6 repeat the first launch's losses.
    step6 = run_dir / "checkpoints" / "step000006.ckpt"
    data = bytearray(step6.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step6.write_bytes(bytes(data))
    resumed = run_recipe("asr_ddp", 2, overrides, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step000006.ckpt cannot be read (member" in resumed.stdout + resumed.stderr
    aside = list((run_dir / "checkpoints" / "unreadable").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step000006.ckpt.") and aside[0].read_bytes() == bytes(data)
    assert (run_dir / "history" / "attempt-2" / "metrics.jsonl").read_text() == metrics1  # kept before the cut
    s3 = _summary(run_dir)
    assert s3["resumed_from"].endswith("step000003.ckpt") and (s3["steps"], s3["attempt_steps"]) == (6, 3)
    assert s3["val_first"] == s1["val_first"] and s3["val"]["wer"] == pytest.approx(s1["val"]["wer"], abs=1e-6)
    assert s3["throughput"]["utterances_per_s"] > 0  # this attempt's, or the last that measured one
    for a, b in zip(jsonl_rows(run_dir / "metrics.jsonl"), [json.loads(x) for x in metrics1.splitlines()]):
        assert a["step"] == b["step"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "step000006.ckpt"

    # 4. run.resume=false starts afresh; the resumed attempt's record stays in history/.
    fresh = run_recipe("asr_ddp", 2, [*overrides, "run.resume=false"], run_dir)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert _summary(run_dir)["resumed_from"] is None and _summary(run_dir)["attempt"] == 4
    assert _summary(run_dir / "history" / "attempt-3")["resumed_from"].endswith("step000003.ckpt")
    ends = [r for r in jsonl_rows(run_dir / "attempts.jsonl") if r["event"] == "end"]
    assert [(r["attempt"], r["status"]) for r in ends] == [(n, "completed") for n in (1, 2, 3, 4)]
    assert len(list(run_dir.parent.glob("exp/checkpoints.replaced-*/step000003.ckpt"))) == 1


def _launch(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return start_recipe("asr_ddp", 2, run_dir, overrides, run_dir.parent / "first.log")


def test_one_writer_per_run_directory_and_a_killed_holder_frees_it(tiny_corpus, tmp_path):
    run_dir = tmp_path / "outputs" / "asr_ddp" / "busy"
    run_dir.parent.mkdir(parents=True)
    overrides = tiny_overrides(tiny_corpus, 2, "trainer.limit_val_batches=0", "checkpoint.every_n_steps=100000",
                               "data.max_duration_s=8", "trainer.max_steps=1000000")
    first = _launch(run_dir, overrides)  # trains until it is killed below
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        summary = run_dir / "summary.json"  # status "running" from the first log step on
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2 and summary.exists()):
            assert first.poll() is None and time.monotonic() < deadline, (run_dir.parent / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads((run_dir / "run.lock").read_text())
        # The event, not its time: the refusal is asserted whatever the machine's load makes it take.
        second = run_recipe("asr_ddp", 2, overrides, run_dir, timeout=600)
        assert second.returncode != 0
        assert (f"error: run directory {run_dir} is in use by another launch (pid {holder['pid']} on "
                f"{holder['host']}") in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # the first run goes on, alone
        steps = [r["step"] for r in jsonl_rows(metrics)]
        assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows
    finally:
        kill_tree(first.pid)  # SIGKILL to torchrun and every rank (the OOM killer): no clean exit, no unlock call
        first.wait(timeout=60)
    # Killed without warning, the run is still described: summary.json says how far it got.
    left = _summary(run_dir)
    assert left["status"] == "running" and left["steps"] >= 1 and left["attempt"] == 1
    # The kernel dropped the dead holder's lock: the same run name starts again at once, and records
    # the killed attempt's end for it, at the step its summary reported.
    third = run_recipe("asr_ddp", 2, [*overrides, "trainer.max_steps=2"], run_dir)
    assert third.returncode == 0, third.stderr[-3000:]
    rows = jsonl_rows(run_dir / "attempts.jsonl")
    assert [(r["event"], r["attempt"]) for r in rows] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert (rows[1]["status"], rows[1]["steps"]) == ("killed", left["steps"]) and "SIGKILL" in rows[1]["error"]
    assert _summary(run_dir / "history" / "attempt-1") == left  # as the killed attempt left it
    assert (run_dir / "history" / "attempt-1" / "metrics.jsonl").exists()
