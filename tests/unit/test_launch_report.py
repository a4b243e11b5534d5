"""The launcher's last lines after the ranks ended badly (common.tools.launch.closing_lines): what a
user reads first, so it says what happened and where the run stands."""

import json

from common.rundir import ATTEMPTS_FILE, SUMMARY_FILE
from common.tools.launch import TerminalFilter, closing_lines


def _said(capsys, rc, run_dir, forwarded=False) -> list[str]:
    assert closing_lines(rc, forwarded, TerminalFilter(), run_dir, run_dir / "launch.log") == rc
    return capsys.readouterr().err.splitlines()


def test_ranks_killed_without_warning_are_said_with_the_step_and_the_checkpoint(tmp_path, capsys):
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"status": "running", "steps": 380,
                                                     "checkpoint": "/o/checkpoints/step000250.ckpt"}))
    first, second = _said(capsys, 1, tmp_path)
    assert first.startswith("killed: the ranks stopped without recording their end (SIGKILL")
    assert "after step 380; newest complete checkpoint: /o/checkpoints/step000250.ckpt; the same command resumes" in first
    assert second.startswith(f"  the run's record: {tmp_path / SUMMARY_FILE}")


def test_a_run_that_started_but_recorded_no_step_says_so(tmp_path, capsys):
    (tmp_path / ATTEMPTS_FILE).write_text('{"event": "start", "attempt": 1}\n')
    lines = _said(capsys, 1, tmp_path)
    assert lines[0] == "error: the ranks exited with status 1"
    assert "the run started" in lines[1] and "ended before its first step was recorded" in lines[1]
    assert "no record was written" in _said(capsys, 1, tmp_path / "missing")[1]


def test_a_preemption_is_said_as_one_and_a_success_says_nothing(tmp_path, capsys):
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"status": "preempted", "error": "stopped by SIGTERM after step 4"}))
    assert _said(capsys, 1, tmp_path, forwarded=True) == [
        "preempted: stopped by SIGTERM after step 4 (exit status 1: a restart policy resumes it)"]
    assert _said(capsys, 0, tmp_path) == []
