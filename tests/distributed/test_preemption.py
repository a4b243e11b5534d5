"""Preemption and Ctrl-C: a real SIGTERM (what Kubernetes sends to the pod) or SIGINT (Ctrl-C) to
torchrun during training."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.conftest import recipe_command, recipe_env, run_recipe, tiny_overrides

STEPS = 30
CHECK_EVERY = 3  # ranks agree on a signal at log steps only (no host sync in the others)
# Asynchronous saves every 2 steps, the newest kept: the signal's save waits for the one in flight,
# is itself synchronous (the ranks exit after it) and is the one checkpoint left.
OVERRIDES = (f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=2",
             "checkpoint.keep_last=1", "checkpoint.async_save=true",
             "data.max_duration_s=8", "logger.wandb=true", f"trainer.log_every_n_steps={CHECK_EVERY}")


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "preempted"), (signal.SIGINT, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_a_step_boundary_and_the_same_command_resumes(sig, status, tiny_corpus, tmp_path):
    run_dir = tmp_path / "preempted"
    cmd = recipe_command("asr_ddp", 2, run_dir, tiny_overrides(tiny_corpus, 2, *OVERRIDES))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=recipe_env({"WANDB_MODE": "offline"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
        time.sleep(0.2)
    proc.send_signal(sig)  # to torchrun, which forwards it to every rank's process group
    out, err = proc.communicate(timeout=600)  # the event: it stops; a bound only a hang reaches
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == status, err[-4000:]
    stopped_at = summary["steps"]
    assert 3 <= stopped_at < STEPS and stopped_at % CHECK_EVERY == 0
    # Every rank stopped after the same step, and the checkpoint of that step is complete.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", f"step{stopped_at:06d}.ckpt"]
    saves = summary["checkpoint_saves"]
    assert saves[-1]["step"] == stopped_at and saves[-1]["mode"] == "sync", saves
    assert {s["mode"] for s in saves[:-1]} == {"async"} and len(saves) >= 2, saves
    assert f"{sig.name}: saving a checkpoint at the next step boundary" in err
    assert "KeyboardInterrupt" not in err  # no rank died of the signal
    # The ranks saved and exited 0; torchrun itself exits non-zero after the signal (README), so that
    # a pod's restartPolicy OnFailure restarts it and the relaunch resumes.
    assert proc.returncode != 0, f"torchrun exited {proc.returncode} after {sig.name}"
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()

    resumed = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *OVERRIDES), run_dir,
                         extra_env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith(f"step{stopped_at:06d}.ckpt")
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, STEPS + 1))
    # The resumed run continues the same wandb run (offline: one run directory per attempt, one id).
    assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs), runs
