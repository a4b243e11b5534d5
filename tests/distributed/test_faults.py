"""A rank killed with SIGKILL (a lost node, the OOM killer): under `torchrun --max-restarts` the
group restarts and resumes from the last complete checkpoint, repeating the uninterrupted run's
losses; without restarts the whole job fails fast instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import jsonl_rows, recipe_config, run_recipe, start_recipe, tiny_overrides
from tests.processes import children, kill_tree

ASR = ("trainer.max_steps=10", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=3", "data.max_duration_s=8")


def _metrics(run_dir: Path) -> list[dict]:
    return jsonl_rows(run_dir / "metrics.jsonl")


def _launch(run_dir: Path, overrides: list[str], max_restarts: int, extra_env: dict | None = None) -> subprocess.Popen:
    """`make run`'s torchrun command, with an elastic restart budget (what a job would pass)."""
    return start_recipe("asr_ddp", 2, run_dir, overrides, run_dir.parent / f"{run_dir.name}.log",
                        torchrun_args=(f"--max-restarts={max_restarts}", "--monitor-interval=1"), extra_env=extra_env)


def _output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text()[-6000:]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)




def _worker(agent_pid: int, rank: int) -> int | None:
    """The training process of ``rank`` launched by torchrun (not one of its DataLoader workers)."""
    stack = [(agent_pid, False)]
    while stack:
        pid, parent_is_rank = stack.pop()
        env = _environ(pid)
        is_rank = env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env
        if is_rank and not parent_is_rank:
            return pid
        stack += [(c, is_rank) for c in children(pid)]
    return None


def _kill_rank_after(proc: subprocess.Popen, run_dir: Path, ckpt_name: str, rank: int,
                     deadline_s: float) -> tuple[int, int | None]:
    """SIGKILL ``rank`` (of 2) once ``ckpt_name`` is complete: (steps recorded then, the other rank's pid)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        assert proc.poll() is None, "the run ended before the rank could be killed:\n" + _output(run_dir)
        if (run_dir / "checkpoints" / ckpt_name).exists():
            pid = _worker(proc.pid, rank)
            if pid is not None:
                survivor = _worker(proc.pid, 1 - rank)
                os.kill(pid, signal.SIGKILL)
                return len((run_dir / "metrics.jsonl").read_text().splitlines()), survivor
        time.sleep(0.05)
    raise AssertionError(f"no {ckpt_name} within {deadline_s}s")


def test_a_sigkilled_rank_restarts_the_group_and_the_run_resumes_exactly(tiny_corpus, tmp_path):
    full_dir = tmp_path / "full"
    full = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *ASR), full_dir)
    assert full.returncode == 0, full.stderr[-4000:]
    expected = _metrics(full_dir)
    assert [m["step"] for m in expected] == list(range(1, 11))

    run_dir = tmp_path / "faulted"
    # A budget like a real job's (README: --max-restarts=3): on a loaded 2-core machine a restarted
    # group's gloo connect can time out once before both ranks are up.
    proc = _launch(run_dir, tiny_overrides(tiny_corpus, 2, *ASR), max_restarts=3)
    try:
        rows_at_kill, _ = _kill_rank_after(proc, run_dir, "step000003.ckpt", rank=1, deadline_s=300)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, _output(run_dir)
    assert rows_at_kill < 10  # killed mid-run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumed_from"] and summary["resumed_from"].endswith(("step000003.ckpt", "step000006.ckpt",
                                                                        "step000009.ckpt"))
    got = _metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, 11))  # every step once
    assert [m["batch"] for m in got] == [m["batch"] for m in expected]
    for x, y in zip(expected, got):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-6), x["step"]


def test_a_sigkilled_rank_fails_the_job_fast_without_restarts(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, tiny_overrides(tiny_corpus, 2, *ASR, "trainer.max_steps=1000",
                                           "run.collective_timeout_s=30"), max_restarts=0)
    try:
        _, survivor = _kill_rank_after(proc, run_dir, "step000003.ckpt", rank=1, deadline_s=300)
        # The event, with a bound no load reaches but a hang would: a survivor left waiting in a
        # collective would wait torch's default 30 minutes (run.collective_timeout_s here: 30 s).
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode != 0, _output(run_dir)
    assert survivor and not _alive(survivor)  # no rank left behind


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie is dead, not yet reaped
    except OSError:
        return False


def test_collective_timeout_reaches_the_strategy():
    from common.parallel import build_strategy

    for recipe in ("asr_ddp", "salm_tp_fsdp2"):
        cfg = recipe_config(recipe, ["run.collective_timeout_s=42"])
        assert build_strategy(cfg.trainer.strategy, cfg.run.collective_timeout_s)._timeout == timedelta(seconds=42)
    assert recipe_config("asr_ddp").run.collective_timeout_s == 600




def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""




def test_a_job_killed_before_a_written_checkpoint_is_renamed_resumes_from_the_last_complete_one(tiny_corpus, tmp_path):
    """SIGKILL to every process at the one moment atomicity is for: the step-4 checkpoint is fully
    written but not yet renamed (rank 0 holds there, common.checkpoint.HOLD_STEP_ENV). The
    previous complete checkpoint is intact, and the restarted run takes it, not the un-renamed
    one, which it replaces, and records every step once."""
    import torch

    from common.checkpoint import HELD_MESSAGE, HOLD_STEP_ENV

    overrides = tiny_overrides(tiny_corpus, 2, "trainer.max_steps=8", "trainer.limit_val_batches=0",
                               "checkpoint.every_n_steps=2", "checkpoint.keep_last=3", "data.max_duration_s=4")
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, overrides, max_restarts=0, extra_env={HOLD_STEP_ENV: "4"})
    try:
        deadline = time.monotonic() + 600  # a generous bound on the event, not a timing check
        while HELD_MESSAGE not in (run_dir.parent / "run.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, _output(run_dir)
            time.sleep(0.05)
        kill_tree(proc.pid)  # torchrun starts each rank in its own session: not one killpg
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    gone = time.monotonic() + 60
    while [p for p in Path("/proc").glob("[0-9]*") if str(run_dir) in _cmdline(p)]:
        assert time.monotonic() < gone, "a process survived SIGKILL"
        time.sleep(0.1)
    partial = run_dir / "checkpoints" / ".partial-step000004.ckpt"
    assert partial.exists() and torch.load(partial, weights_only=True)["global_step"] == 4  # whole, but not named
    (last_complete,) = sorted((run_dir / "checkpoints").glob("step*.ckpt"))
    assert last_complete.name == "step000002.ckpt" and torch.load(last_complete, weights_only=True)["global_step"] == 2

    resumed = run_recipe("asr_ddp", 2, overrides, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert Path(summary["resumed_from"]).name == last_complete.name
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 9))
    assert not partial.exists() and (run_dir / "checkpoints" / "step000004.ckpt").exists()


def test_a_job_killed_while_an_async_checkpoint_is_written_resumes_from_the_previous_one(tiny_corpus, tmp_path):
    """checkpoint.async_save with keep_last=1: the step-4 checkpoint's writer thread has written it and
    holds before it reports done (HOLD_STEP_ENV), while the step loop trains on (steps 5.. are
    recorded): then SIGKILL to every process. The step-2 checkpoint, which keep_last would drop once
    step 4 is complete, is still there and `last`; the relaunch resumes from it, not from the
    unpublished step 4, and removes that one."""
    import torch

    from common.checkpoint import HELD_MESSAGE, HOLD_STEP_ENV

    overrides = tiny_overrides(tiny_corpus, 2, "trainer.max_steps=8", "trainer.limit_val_batches=0",
                               "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last=1",
                               "checkpoint.async_save=true", "data.max_duration_s=4")
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, overrides, max_restarts=0, extra_env={HOLD_STEP_ENV: "4"})
    try:
        deadline = time.monotonic() + 600  # a generous bound on the event, not a timing check
        while HELD_MESSAGE not in _output(run_dir) or not (run_dir / "metrics.jsonl").exists() \
                or _metrics(run_dir)[-1]["step"] < 5:
            assert proc.poll() is None and time.monotonic() < deadline, _output(run_dir)
            time.sleep(0.05)
        kill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    ckpts = run_dir / "checkpoints"
    partial = ckpts / ".partial-step000004.ckpt"
    assert partial.exists() and torch.load(partial, weights_only=True)["global_step"] == 4  # whole, never named
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step000002.ckpt"]
    assert (ckpts / "last.ckpt").resolve().name == "step000002.ckpt"

    resumed = run_recipe("asr_ddp", 2, overrides, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and Path(summary["resumed_from"]).name == "step000002.ckpt"
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 9))
    assert not partial.exists()
    # keep_last=1 pruned steps 4 and 6; the checkpoint a run resumed from is never deleted by it (Lightning).
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step000002.ckpt", "step000008.ckpt"]
    assert [s["mode"] for s in summary["checkpoint_saves"]] == ["async", "async", "sync"]  # steps 4, 6; 8 the last


def test_a_frozen_rank_is_named_and_the_run_ends_within_the_stall_timeout(tiny_corpus, tmp_path):
    """SIGSTOP to rank 1 (a rank stuck on a storage read, a dead link, a GPU hang looks the same to the
    others): rank 0's watchdog names it, writes the stacks, records the stall and ends the job. The
    bound is what only a hang reaches: the collective timeout is 600 s here."""
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, tiny_overrides(tiny_corpus, 2, *ASR, "trainer.max_steps=100000",
                                           "checkpoint.every_n_steps=3", "run.stall_timeout_s=20",
                                           "run.collective_timeout_s=600", "trainer.log_every_n_steps=1"),
                   max_restarts=0)
    frozen = None
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step000003.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, _output(run_dir)
            time.sleep(0.1)
        time.sleep(3)  # a few steps on: the steps' times are measured
        frozen = _worker(proc.pid, 1)
        os.kill(frozen, signal.SIGSTOP)
        proc.wait(timeout=400)
    finally:
        if frozen and _alive(frozen):  # torchrun kills the group's last rank itself
            os.kill(frozen, signal.SIGKILL)
        if proc.poll() is None:
            kill_tree(proc.pid)
    out = _output(run_dir)
    assert proc.returncode != 0, out
    line = next(x for x in out.splitlines() if x.startswith("error: stalled: no step for"))
    assert f"rank 1 (node {os.uname().nodename}, pid {frozen}) stopped answering at step" in line, line
    assert "its state: T (stopped)" in line and "ranks 0 wait in the step's collectives" in line
    assert (run_dir / "stalls" / "rank0.txt").read_text().count("File ") > 3  # rank 0's Python stacks
    summary = json.loads((run_dir / "summary.json").read_text())
    end = jsonl_rows(run_dir / "attempts.jsonl")[-1]
    assert (summary["status"], end["event"], end["status"]) == ("stalled", "end", "stalled")
    assert summary["error"] == end["error"] == line.removeprefix("error: ")
    assert end["steps"] == summary["steps"] >= 3
