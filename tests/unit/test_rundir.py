"""RunDirectory owns a run directory's files and their order: the record goes to history/ before the
step logs are cut to the resumed step; the end of an attempt writes what it can and says what it could not."""

import json

from common.rundir import (
    ATTEMPTS_FILE,
    HISTORY_DIR,
    METRICS_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
    VALIDATION_FILE,
    RunDirectory,
    read_attempts,
)
from tests.conftest import jsonl_rows


def _rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0 / s}) + "\n" for s in steps))


def test_history_first_then_the_step_logs_are_cut_to_the_resumed_step(tmp_path):
    _rows(tmp_path / METRICS_FILE, range(1, 6))
    _rows(tmp_path / VALIDATION_FILE, (2, 4))
    (tmp_path / ATTEMPTS_FILE).write_text(json.dumps({"event": "start", "attempt": 1}) + "\n")
    rundir = RunDirectory(tmp_path)
    assert rundir.begin_attempt(["x=1"], resume_step=3) == 2
    kept = tmp_path / HISTORY_DIR / "attempt-1"
    assert [r["step"] for r in jsonl_rows(kept / METRICS_FILE)] == [1, 2, 3, 4, 5]  # whole, before the cut
    assert [r["step"] for r in jsonl_rows(kept / VALIDATION_FILE)] == [2, 4]
    assert [r["step"] for r in jsonl_rows(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert [r["step"] for r in rundir.earlier_rows[METRICS_FILE]] == [1, 2, 3]
    assert [r["step"] for r in rundir.earlier_rows[VALIDATION_FILE]] == [2]


def test_a_fresh_start_keeps_the_old_logs_in_history_and_starts_them_empty(tmp_path):
    _rows(tmp_path / METRICS_FILE, range(1, 4))
    rundir = RunDirectory(tmp_path)
    rundir.begin_attempt([], resume_step=None)
    assert len(jsonl_rows(tmp_path / HISTORY_DIR / "attempt-0" / METRICS_FILE)) == 3
    assert (tmp_path / METRICS_FILE).read_text() == "" and rundir.earlier_rows[METRICS_FILE] == []


def test_a_resume_at_the_last_row_copies_no_step_log(tmp_path):
    _rows(tmp_path / METRICS_FILE, range(1, 4))
    RunDirectory(tmp_path).begin_attempt([], resume_step=3)
    assert not (tmp_path / HISTORY_DIR).exists()  # nothing is cut: a preempted job does not copy its log again
    assert len(jsonl_rows(tmp_path / METRICS_FILE)) == 3


def test_end_attempt_writes_each_part_and_names_what_it_could_not(tmp_path):
    rundir = RunDirectory(tmp_path)
    rundir.begin_attempt([])
    summary = {"attempt_wall_s": 12.345, "steps": 7, "status": "failed"}
    skipped = {"c1": {"cut_id": "c1", "kind": "unreadable"}}
    assert rundir.end_attempt("failed", summary, skipped_items=skipped, error="RuntimeError: x") == []
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == summary
    assert jsonl_rows(tmp_path / SKIPPED_FILE) == [skipped["c1"]]
    end = read_attempts(tmp_path)[-1]
    assert (end["event"], end["status"], end["wall_s"], end["steps"], end["error"]) == ("end", "failed", 12.35, 7,
                                                                                        "RuntimeError: x")
    (tmp_path / (SUMMARY_FILE + ".tmp")).mkdir()  # the summary cannot be written (as a full disk, even for root)
    unwritten = rundir.end_attempt("completed", {**summary, "status": "completed"}, skipped_items={})
    assert [u.split(" ")[0] for u in unwritten] == [SUMMARY_FILE]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["status"] == "failed"  # the last complete one stays
    assert read_attempts(tmp_path)[-1]["status"] == "completed"  # the other parts are still written


def test_an_attempt_killed_without_warning_is_recorded_by_the_next(tmp_path):
    (tmp_path / ATTEMPTS_FILE).write_text(json.dumps({"event": "start", "attempt": 1}) + "\n")
    running = {"status": "running", "steps": 7, "attempt_wall_s": 30.5, "checkpoint": "checkpoints/step000006.ckpt"}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(running))
    rundir = RunDirectory(tmp_path)
    rundir.begin_attempt([], resume_step=6)
    killed, start = read_attempts(tmp_path)[1:]
    assert (killed["event"], killed["attempt"], killed["status"], killed["steps"], killed["wall_s"]) == (
        "end", 1, "killed", 7, 30.5)
    assert killed["error"].startswith("killed without recording its end (SIGKILL") and "after step 7" in killed["error"]
    assert start["previous_attempt"] == "killed (no end recorded)" and start["attempt"] == 2
    assert json.loads((tmp_path / HISTORY_DIR / "attempt-1" / SUMMARY_FILE).read_text()) == running  # as it was left
    now = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert (now["status"], now["steps"], now["error"]) == ("killed", 7, killed["error"])
    assert rundir.previous_summary == now  # what a resumed attempt adds its steps to


def test_an_attempt_killed_before_its_first_step_is_recorded_without_a_step(tmp_path):
    (tmp_path / ATTEMPTS_FILE).write_text(json.dumps({"event": "start", "attempt": 1}) + "\n")
    RunDirectory(tmp_path).begin_attempt([])
    killed = read_attempts(tmp_path)[1]
    assert (killed["status"], killed["steps"]) == ("killed", None) and "before its first step" in killed["error"]
    assert not (tmp_path / SUMMARY_FILE).exists()
