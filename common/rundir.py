"""A run directory keeps the record of every launch, and has one writer at a time.

``outputs/<recipe>/<run.name>/`` holds the run's current record (``config.yaml``,
``metrics.jsonl``, ``validation.jsonl``, ``summary.json``, ``skipped_items.jsonl``) and its
checkpoints. Launching the same run name again (a resume, a relaunch, ``run.resume=false``)
never erases what an earlier launch wrote:

* ``run.lock``: held (``flock``) by rank 0 of the launch that writes here. A second launch on
  the same directory fails at once, naming the holder (host, pid, start time). The kernel
  drops the lock when its holder dies, so a crashed or killed run never leaves it stuck.
* ``attempts.jsonl``: append-only, one row when a launch starts and one when it ends
  (attempt number, host, pid, command-line overrides, resumed checkpoint, who restarted it and how
  often, status, the error, wall time). An attempt killed without warning (SIGKILL) writes no end: the
  next one writes it for it, ``killed`` at the step its summary.json last said (``status: running``,
  rewritten every minute and at every checkpoint while a run trains), and marks that summary ``killed``.
  A run whose last ``run.max_failures_at_step`` attempts failed at one step is not started again
  (:func:`check_restart_budget`).
* ``history/attempt-<N>/``: before launch N+1 changes anything, the record as launch N left it
  (config, summary, skipped items; the step logs too when launch N+1 will cut rows from them,
  i.e. it resumes from an earlier step or starts afresh) is copied here. Then, and only then, the
  step logs lose the rows after the resumed step (:meth:`RunDirectory.begin_attempt` does both, in
  that order).

Every file name of a run directory is declared here (``*_FILE``, ``*_DIR``); nothing else spells one.

Usage (rank 0 of ``common/train.py``)::

    rundir = RunDirectory(run_dir)
    rundir.lock()                         # RunDirectoryBusy (a ConfigError) if another launch holds it
    attempt = rundir.begin_attempt(sys.argv[1:], resume_step=3)   # None: a fresh start
    rundir.earlier_rows[METRICS_FILE]     # the rows up to step 3 this attempt continues
    ...
    unwritten = rundir.end_attempt("completed", summary, skipped_items={})   # [] when all was written
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from common.errors import ConfigError

LOCK_FILE = "run.lock"                  # the one writer's lock
ATTEMPTS_FILE = "attempts.jsonl"        # a start row and an end row per launch, append-only
HISTORY_DIR = "history"                 # attempt-<N>/: the record as launch N left it
CONFIG_FILE = "config.yaml"             # the resolved config of the latest launch
METRICS_FILE = "metrics.jsonl"          # one row per optimizer step (common.recording)
VALIDATION_FILE = "validation.jsonl"    # one row per validation
SUMMARY_FILE = "summary.json"           # the whole run, as the run contract says (common.recording.summarize)
SKIPPED_FILE = "skipped_items.jsonl"    # bad data items skipped, one row each
CHECKPOINTS_DIR = "checkpoints"         # common.checkpoint
TOKENIZER_DIR = "tokenizer"             # the tokenizer the model was trained with
WORD_LM_FILE = "word_lm.json"           # the word LM of the training text (eval.word_lm)
WANDB_ID_FILE = "wandb_run_id"          # a resumed run continues the same wandb run
WATCHDOG_DIR = "watchdog"               # rank<N>.json: each rank's heartbeat (common.watchdog)
STALLS_DIR = "stalls"                   # rank<N>.txt: Python stacks of the ranks that answered at a stall
RECORD_FILES = (CONFIG_FILE, METRICS_FILE, VALIDATION_FILE, SUMMARY_FILE, SKIPPED_FILE)
STEP_LOGS = (METRICS_FILE, VALIDATION_FILE)  # one row per step; a resume cuts the rows after its step


# Who restarted this launch, and how often (recorded in each start row of attempts.jsonl).
RESTART_COUNTERS = {"slurm_requeues": "SLURM_RESTART_COUNT", "torchrun_restarts": "TORCHELASTIC_RESTART_COUNT"}


class RunDirectoryBusy(ConfigError):
    """Another launch holds this run directory's lock."""


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created = False
        self.attempt = 0
        self.previous_summary: dict | None = None
        # begin_attempt: the step-log rows this attempt continues ({METRICS_FILE: [...], VALIDATION_FILE: [...]}).
        self.earlier_rows: dict[str, list[dict]] = {name: [] for name in STEP_LOGS}

    # --- one writer -------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run directory's lock for this process's lifetime (released by the kernel at exit)."""
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"run directory {self.path} cannot be written ({exc.strerror or exc}): run.output_dir "
                              "must be on a writable file system with free space; nothing was written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirectoryBusy(
                f"run directory {self.path} is in use by another launch ({holder}; lock {self.path / LOCK_FILE}): "
                "wait for it to end, stop it, or choose another run.name / RUN_NAME") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._lock_fd = fd

    def release_if_unused(self) -> None:
        """After a launch failed its checks before writing anything: remove the directory this
        launch created for nothing (only its lock file in it); an existing directory stays."""
        if self._lock_fd is None or self.attempt:
            return
        os.close(self._lock_fd)
        self._lock_fd = None
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            self.path.rmdir()

    # --- every launch's record --------------------------------------------------------------
    def begin_attempt(self, argv: list[str], resume_step: int | None = None) -> int:
        """Number this launch, copy the record the previous launch left into ``history/``, cut the
        step logs to ``resume_step`` (:attr:`earlier_rows` keeps what is left), and append a start
        row to ``attempts.jsonl``. Returns the attempt number (1 for a new run).

        ``resume_step``: the step this launch continues from (``None``: a fresh start, the step logs
        start empty). The step logs are copied only when this launch will cut them (rows after that
        step); a resume at their last row only appends, so a job preempted many times does not copy
        its whole log at every restart.
        """
        rows = read_attempts(self.path)
        self.attempt = 1 + max((r.get("attempt", 0) for r in rows), default=0)
        existing = [name for name in RECORD_FILES if (self.path / name).is_file()
                    and (name not in STEP_LOGS or resume_step is None or _last_step(self.path / name) > resume_step)]
        if existing:
            kept = self.path / HISTORY_DIR / f"attempt-{self.attempt - 1}"
            kept.mkdir(parents=True, exist_ok=True)
            for name in existing:
                shutil.copy2(self.path / name, kept / name)
        for name in STEP_LOGS:  # after the copy above: a row cut here is in history/ first
            self.earlier_rows[name] = _keep_rows_up_to(self.path / name, resume_step)
        summary = self.path / SUMMARY_FILE
        self.previous_summary = json.loads(summary.read_text()) if summary.is_file() else None
        restarts = {name: int(os.environ[var]) for name, var in RESTART_COUNTERS.items()
                    if os.environ.get(var, "").isdigit()}
        # The previous attempt started but wrote no end row: it was killed (SIGKILL, the OOM killer, a lost node).
        unrecorded = bool(rows) and rows[-1].get("event") == "start"
        if unrecorded:
            self._record_killed(rows[-1].get("attempt", self.attempt - 1))
        self._append({"event": "start", "attempt": self.attempt, "time": _now(), "host": socket.gethostname(),
                      "pid": os.getpid(), "argv": list(argv), "resume_step": resume_step,
                      **({"restarts": restarts} if restarts else {}),
                      **({"previous_attempt": "killed (no end recorded)"} if unrecorded else {})})
        return self.attempt

    def _record_killed(self, attempt: int) -> None:
        """The end the killed ``attempt`` could not write: an end row ``killed`` at the step its running
        summary last reported (its summary, as it left it, is in history/ already), and summary.json
        says ``killed`` from now on."""
        running = self.previous_summary if (self.previous_summary or {}).get("status") == "running" else None
        step = running["steps"] if running else None
        error = ("killed without recording its end (SIGKILL: the OOM killer, a lost node, a cancelled job) "
                 + (f"after step {step}" if running else "before its first step was recorded")
                 + f"; recorded by attempt {self.attempt}")
        self._append({"event": "end", "attempt": attempt, "time": _now(), "status": "killed",
                      "wall_s": running.get("attempt_wall_s") if running else None, "steps": step, "error": error})
        if running:
            self.previous_summary = {**running, "status": "killed", "error": error}
            self.write_summary(self.previous_summary)

    def end_attempt(self, status: str, summary: dict, skipped_items: dict, error: str | None = None) -> list[str]:
        """However the attempt ended: the skipped items, ``summary.json`` and the end row of
        ``attempts.jsonl``, each tried on its own. Returns what could not be written, with why (a full
        disk, a vanished directory), for the caller to say; ``[]`` when all was written."""
        unwritten = []
        for name, write in ((SKIPPED_FILE, lambda: self._write_skipped(skipped_items)),
                            (SUMMARY_FILE, lambda: self.write_summary(summary)),
                            (ATTEMPTS_FILE, lambda: self._append(
                                {"event": "end", "attempt": self.attempt, "time": _now(), "status": status,
                                 "wall_s": round(summary["attempt_wall_s"], 2), "steps": summary["steps"],
                                 "error": error}))):
            try:
                write()
            except OSError as exc:
                unwritten.append(f"{name} ({exc.strerror or exc})")
        return unwritten

    def write_summary(self, summary: dict) -> Path:
        """``summary.json``, replaced atomically: a reader never sees a half-written one."""
        path = self.path / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            os.replace(tmp, path)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half summary beside the last complete one
            except OSError:
                pass
            raise
        return path

    def _write_skipped(self, skipped_items: dict) -> None:
        if skipped_items:
            with open(self.path / SKIPPED_FILE, "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in skipped_items.values())

    def _append(self, row: dict) -> None:
        with open(self.path / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def replace_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` (a name beside it) atomically: a reader sees the old
    target or the new one, never no link (``latest``, ``checkpoints/last.ckpt``)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def is_run_directory(path: str | Path) -> bool:
    """A run's output directory (``checkpoints/`` or ``summary.json`` in it), not a checkpoint."""
    path = Path(path)
    return path.is_dir() and ((path / CHECKPOINTS_DIR).is_dir() or (path / SUMMARY_FILE).is_file())


def check_restart_budget(run_dir: str | Path, max_failures_at_step: int, count_unrecorded: bool = False) -> None:
    """Refuse to start a run whose last ``max_failures_at_step`` attempts all failed at the same step:
    they resumed from the same checkpoint and met the same fault, so an automatic restart (torchrun,
    a Kubernetes pod, a Slurm requeue) would only repeat it. ``ConfigError`` naming the step, the
    error and how to go on once the cause is fixed; every rank reads the same file, so all agree.
    ``count_unrecorded`` (the launcher, before any rank starts): an attempt that started, wrote no end
    and holds no lock was killed, and counts now rather than once the next attempt has recorded it.

    >>> check_restart_budget("/nonexistent", 3)  # a new run: nothing to refuse
    """
    if not max_failures_at_step:
        return
    rows = read_attempts(run_dir)
    ends = [r for r in rows if r.get("event") == "end"]
    if count_unrecorded and rows and rows[-1].get("event") == "start" and not _lock_held(Path(run_dir)):
        # The last attempt was killed (no end, and nobody holds the lock): this launch will record it so.
        summary = read_summary(run_dir)
        ends.append({"status": "killed", "steps": summary.get("steps") if summary.get("status") == "running" else None,
                     "error": "killed without recording its end"})
    last = ends[-max_failures_at_step:]
    # A killed attempt counts: the OOM killer at the same step every time is a loop too.
    if len(last) < max_failures_at_step or any(r.get("status") not in ("failed", "killed") for r in last):
        return
    steps = {r.get("steps") for r in last}
    if len(steps) == 1 and None not in steps:
        step = steps.pop()
        raise ConfigError(
            f"the last {max_failures_at_step} attempts of {run_dir} failed at step {step} "
            f"({last[-1].get('error') or 'no error recorded'}): not starting it again, a restart would fail "
            f"there too (run.max_failures_at_step={max_failures_at_step}); once the cause is fixed, relaunch "
            f"with run.max_failures_at_step={max_failures_at_step + 1} (attempts.jsonl has every attempt)")


def _lock_held(run_dir: Path) -> bool:
    """Another live launch holds the run directory's lock (its last start row is not a killed attempt)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock taken for the test


def read_summary(run_dir: str | Path) -> dict:
    """A run directory's summary.json (``{}``: none yet, or unreadable)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}


def read_attempts(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_rows_up_to(path: Path, step: int | None) -> list[dict]:
    """Drop the rows after ``step`` (all rows for ``None``), atomically; returns the rows kept."""
    if not path.exists():
        return []
    rows = [json.loads(row) for row in path.read_text().splitlines() if row.strip()] if step is not None else []
    kept = [row for row in rows if row["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)
    return kept


def _last_step(path: Path) -> int:
    """The step of a step log's last row (-1: none); reads only the file's tail."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        lines = [line for line in f.read().splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
