"""A run that keeps failing at the same step is not restarted again (common.rundir.check_restart_budget)."""

from __future__ import annotations

import json

import pytest

from common.errors import ConfigError
from common.rundir import check_restart_budget


def _attempts(tmp_path, *ends):
    rows = []
    for i, (status, steps) in enumerate(ends, 1):
        rows += [{"event": "start", "attempt": i}, {"event": "end", "attempt": i, "status": status, "steps": steps,
                                                     "error": f"RuntimeError: boom {i}"}]
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("ends", [
    [("failed", 40), ("failed", 40)],                        # fewer than the budget
    [("failed", 40), ("failed", 44), ("failed", 40)],        # not the same step: progress in between
    [("failed", 40), ("preempted", 40), ("failed", 40)],     # a preemption is not a failure
    [("killed", 40), ("killed", 40), ("completed", 40)],
    [("failed", 40), ("failed", 40), ("failed", 40), ("completed", 60)],
])
def test_starts_unless_the_last_attempts_failed_at_one_step(tmp_path, ends):
    _attempts(tmp_path, *ends)
    check_restart_budget(tmp_path, 3)


def test_refuses_the_next_restart_naming_step_error_and_way_out(tmp_path):
    _attempts(tmp_path, ("completed", 10), ("failed", 40), ("failed", 40), ("failed", 40))
    with pytest.raises(ConfigError) as exc:
        check_restart_budget(tmp_path, 3)
    assert str(exc.value).startswith(f"the last 3 attempts of {tmp_path} failed at step 40 (RuntimeError: boom 4): "
                                     "not starting it again")
    assert "relaunch with run.max_failures_at_step=4" in str(exc.value)
    check_restart_budget(tmp_path, 0)  # 0: no limit
    check_restart_budget(tmp_path, 4)


def test_each_attempt_says_who_restarted_it_and_whether_the_one_before_was_killed(tmp_path, monkeypatch):
    from common.rundir import RunDirectory, read_attempts

    run = RunDirectory(tmp_path)
    run.begin_attempt(["a=1"])  # then killed: no end row
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    RunDirectory(tmp_path).begin_attempt(["a=1"], resume_step=4)
    first, killed, second = read_attempts(tmp_path)
    assert "previous_attempt" not in first and "restarts" not in first
    assert (killed["event"], killed["attempt"], killed["status"]) == ("end", 1, "killed")  # written by attempt 2
    assert second["previous_attempt"] == "killed (no end recorded)"
    assert second["restarts"] == {"slurm_requeues": 1, "torchrun_restarts": 0} and second["resume_step"] == 4


def test_attempts_killed_at_one_step_count_as_failures(tmp_path):
    """The OOM killer at the same step every time: each kill is recorded by the next attempt, and a
    restart loop stops as it does for failures."""
    _attempts(tmp_path, ("killed", 40), ("failed", 40), ("killed", 40))
    with pytest.raises(ConfigError, match="the last 3 attempts of .* failed at step 40"):
        check_restart_budget(tmp_path, 3)


def test_the_killed_attempt_not_yet_recorded_counts_too(tmp_path):
    """The attempt before this launch was killed at step 40 (its summary still says running): with two
    recorded kills at 40 the launcher finds the budget of 3 spent now, not one launch later."""
    _attempts(tmp_path, ("killed", 40), ("killed", 40))
    with open(tmp_path / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "attempt": 3}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "steps": 40}))
    check_restart_budget(tmp_path, 3)  # the ranks: the next attempt records the kill, then it counts
    with pytest.raises(ConfigError, match="the last 3 attempts of .* failed at step 40"):
        check_restart_budget(tmp_path, 3, count_unrecorded=True)  # the launcher, before any rank starts
    import fcntl

    with open(tmp_path / "run.lock", "w") as holder:  # the attempt still runs: its start row is no kill
        fcntl.flock(holder, fcntl.LOCK_EX)
        check_restart_budget(tmp_path, 3, count_unrecorded=True)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "steps": 44}))  # it got further
    check_restart_budget(tmp_path, 3, count_unrecorded=True)
