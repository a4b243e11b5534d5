"""A rank that stops advancing is found, named and recorded within a bound, instead of a silent wait
for the collective timeout.

Every rank's watchdog thread writes a heartbeat (``<run_dir>/watchdog/rank<N>.json``: step, phase,
pid, host, time) every ``poll_s`` and checks its own progress. When this rank's steps have not
advanced for the stall timeout, it writes its Python stacks to ``<run_dir>/stalls/rank<N>.txt``; the
lowest rank whose thread still answers reads every heartbeat, names the rank(s) that stopped (a
heartbeat gone stale: a frozen or dead process, whose kernel state it reads from /proc when it runs
on this host) or lag (waiting for their data, a checkpoint write, fewer steps), prints one line, and
the record says ``stalled``; then every stalled rank exits with :data:`STALL_EXIT_CODE`, so that
torchrun ends the group and Slurm requeues / Kubernetes restarts it (bounded by
``run.max_failures_at_step``).

The stall timeout (``run.stall_timeout_s``; null: derived) is generous before the first step, in
validation and in a checkpoint save (0.9 x ``run.collective_timeout_s``: compilation, a long first
batch), and otherwise a multiple of the measured step time (20 x the median of the last steps, at
least 60 s), always below the collective timeout, which would otherwise end the run first, unnamed.

Usage (what ``common/train.py`` does)::

    Watchdog(run_dir, rank, world_size, stall_timeout_s=None, collective_timeout_s=600, on_stall=record)
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from common.rundir import STALLS_DIR, WATCHDOG_DIR

STALL_EXIT_CODE = 75  # a stall, not a crash: torchrun ends the group, the restart policy resumes it
GENEROUS_SHARE = 0.9  # of the collective timeout: before the first step, validation, checkpoint saves
STEP_MULTIPLE, MIN_STALL_S = 20, 60.0
PHASES = {"start": "starting (before its first step)", "data": "waiting for its next batch (data loading)",
          "step": "in the training step (forward, backward, optimizer, their collectives)",
          "validation": "in validation", "checkpoint": "writing a checkpoint"}


class Watchdog(Callback):
    def __init__(self, run_dir: Path, rank: int, world_size: int, stall_timeout_s: float | None,
                 collective_timeout_s: float | None, on_stall: Callable[[str], None] | None = None,
                 poll_s: float | None = None):
        self.dir, self.stalls = Path(run_dir) / WATCHDOG_DIR, Path(run_dir) / STALLS_DIR
        self.rank, self.world_size = rank, world_size
        # Heartbeats every 2 s on a few ranks, every 10 s at 500 ranks and more: at most ~100 small writes
        # per second to a shared run directory.
        self.poll_s = poll_s or min(10.0, max(2.0, world_size / 50))
        self.explicit_s = stall_timeout_s
        self.generous_s = GENEROUS_SHARE * float(collective_timeout_s or 600)
        self.on_stall = on_stall  # rank 0: records the stall (summary.json, attempts.jsonl)
        self.step, self.phase, self.progress_at = 0, "start", time.monotonic()
        self.step_times: deque[float] = deque(maxlen=50)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the main thread is doing ---------------------------------------------------------
    def _note(self, phase: str, progressed: bool = False) -> None:
        if progressed:
            self.progress_at = time.monotonic()
        self.phase = phase

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._thread is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.progress_at = time.monotonic()
            self._beat()  # at once: an earlier attempt's heartbeat of this rank is never read as this one's
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop.set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._note("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self.step:
            self.step_times.append(now - self.progress_at)
        self.step = trainer.global_step
        self._note("data", progressed=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._note("validation", progressed=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._note("data", progressed=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._note("checkpoint", progressed=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop.set()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop.set()

    # --- the thread ----------------------------------------------------------------------------
    def timeout_s(self) -> float:
        """How long this rank may go without progress in its current phase."""
        if self.phase in ("start", "validation", "checkpoint") or not self.step_times:
            return max(self.generous_s, self.explicit_s or 0.0)
        if self.explicit_s:
            return self.explicit_s
        return min(self.generous_s, max(MIN_STALL_S, STEP_MULTIPLE * statistics.median(self.step_times)))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._beat()
            waited = time.monotonic() - self.progress_at
            if waited > self.timeout_s() and not self._stop.is_set():
                self._stalled(waited)
                return

    def _beat(self) -> None:
        beat = {"rank": self.rank, "step": self.step, "phase": self.phase, "pid": os.getpid(),
                "host": socket.gethostname(), "time": time.time()}
        tmp = self.dir / f".rank{self.rank}.json.tmp"
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, self.dir / f"rank{self.rank}.json")
        except OSError:
            pass  # a full disk must not end the run here; the stall check still runs

    def _stalled(self, waited_s: float) -> None:
        self.stalls.mkdir(parents=True, exist_ok=True)
        with open(self.stalls / f"rank{self.rank}.txt", "w") as f:
            f.write(f"rank {self.rank} (pid {os.getpid()}), step {self.step}, {PHASES[self.phase]}, "
                    f"no progress for {waited_s:.0f} s\n")
            faulthandler.dump_traceback(f, all_threads=True)
        beats = read_heartbeats(self.dir, self.world_size)
        # A heartbeat this old: that rank's process stopped (its thread writes every poll_s).
        stale_after = min(5 * self.poll_s, 0.8 * self.timeout_s())
        answering = [r for r, b in beats.items() if b and time.time() - b["time"] < stale_after]
        if answering and min(answering) == self.rank:  # the reporter: the lowest rank that still answers
            time.sleep(2 * self.poll_s)  # the other stalled ranks write their stacks meanwhile
            message = stall_message(beats, self.rank, waited_s, self.timeout_s(), self.explicit_s, stale_after,
                                    self.stalls)
            print(f"error: {message}", file=sys.stderr, flush=True)
            if self.on_stall is not None:
                try:
                    self.on_stall(message)
                except Exception as exc:  # noqa: BLE001 - the exit below must happen
                    print(f"warning: the stall could not be recorded: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(4 * self.poll_s)  # the reporter names us first
        sys.stderr.flush()
        os._exit(STALL_EXIT_CODE)


def read_heartbeats(directory: Path, world_size: int) -> dict[int, dict | None]:
    beats = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads((Path(directory) / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            beats[rank] = None
    return beats


def stall_message(beats: dict[int, dict | None], me: int, waited_s: float, timeout_s: float,
                  explicit_s: float | None, stale_after_s: float, stalls: Path) -> str:
    """One line: how long, which rank(s) stopped and how, what the others wait in, where the stacks are."""
    now = time.time()
    top = max((b["step"] for b in beats.values() if b), default=0)
    culprits, waiting = [], []
    for rank, b in sorted(beats.items()):
        if b is None:
            culprits.append(f"rank {rank} (no heartbeat: it never started training)")
        elif now - b["time"] >= stale_after_s:
            state = _process_state(b["pid"]) if b["host"] == socket.gethostname() else None
            culprits.append(f"rank {rank} (node {b['host']}, pid {b['pid']}) stopped answering at step {b['step']}, "
                            f"{PHASES.get(b['phase'], b['phase'])}" + (f"; its state: {state}" if state else ""))
        elif b["phase"] in ("data", "checkpoint", "start") or b["step"] < top:
            culprits.append(f"rank {rank} (node {b['host']}, pid {b['pid']}) is {PHASES.get(b['phase'], b['phase'])} "
                            f"at step {b['step']}")
        else:
            waiting.append(rank)
    limit = f"run.stall_timeout_s={explicit_s:g}" if explicit_s else f"derived stall timeout {timeout_s:.0f} s"
    others = (f"; ranks {_ranges(waiting)} wait in the step's collectives for it" if waiting else "")
    return (f"stalled: no step for {waited_s:.0f} s after step {top} ({limit}); "
            + ("; ".join(culprits) or "no rank stands out") + others
            + f"; Python stacks of the ranks that answer: {stalls}/")


def _process_state(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return "gone"
    return None


def _ranges(ranks: list[int]) -> str:
    if len(ranks) <= 8:
        return ", ".join(map(str, ranks))
    return f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
