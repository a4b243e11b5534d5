"""The watchdog on its own: its timeout, its one line, and a real stall in a child process (the thread
notices, writes the stacks, records, exits with STALL_EXIT_CODE). Real ranks: tests/distributed/test_faults.py."""

import json
import socket
import subprocess
import sys
import time

from common.watchdog import MIN_STALL_S, STALL_EXIT_CODE, Watchdog, stall_message


def test_the_timeout_is_generous_before_the_first_step_then_follows_the_step_time(tmp_path):
    w = Watchdog(tmp_path, 0, 2, stall_timeout_s=None, collective_timeout_s=600)
    assert w.timeout_s() == 540  # before the first step: 0.9 x the collective timeout
    w.step_times.extend([0.5, 0.6, 0.4])
    w.phase = "data"
    assert w.timeout_s() == MIN_STALL_S  # 20 x 0.5 s = 10 s, but at least a minute
    w.step_times.extend([10.0] * 10)
    assert w.timeout_s() == 200
    w.step_times.extend([100.0] * 20)
    assert w.timeout_s() == 540  # never past the collective timeout's share
    w.phase = "validation"
    assert w.timeout_s() == 540
    assert Watchdog(tmp_path, 0, 2, 30, 600).timeout_s() == 540  # explicit, but generous before the first step


def test_the_line_names_the_frozen_rank_and_what_the_others_wait_in(tmp_path):
    now, host = time.time(), socket.gethostname()
    beats = {0: {"rank": 0, "step": 380, "phase": "step", "pid": 11, "host": host, "time": now},
             1: {"rank": 1, "step": 380, "phase": "data", "pid": 999999, "host": "other-node", "time": now - 100},
             2: {"rank": 2, "step": 379, "phase": "data", "pid": 13, "host": "n2", "time": now},
             3: {"rank": 3, "step": 380, "phase": "step", "pid": 14, "host": host, "time": now}}
    line = stall_message(beats, 0, 95, 90, None, 15, tmp_path / "stalls")
    assert line.startswith("stalled: no step for 95 s after step 380 (derived stall timeout 90 s); ")
    assert "rank 1 (node other-node, pid 999999) stopped answering at step 380, waiting for its next batch" in line
    assert "rank 2 (node n2, pid 13) is waiting for its next batch (data loading) at step 379" in line
    assert "ranks 0, 3 wait in the step's collectives for it" in line and line.endswith(f"{tmp_path / 'stalls'}/")


STALLING = """
import sys, time
from types import SimpleNamespace
from common.watchdog import Watchdog
w = Watchdog(sys.argv[1], 0, 1, stall_timeout_s=1.0, collective_timeout_s=600, poll_s=0.2,
             on_stall=lambda m: open(sys.argv[1] + "/recorded", "w").write(m))
w.setup(None, None, "fit")
for step in (1, 2, 3):
    w.on_train_batch_start(None, None, None, step)
    w.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, step)
def stuck_in_the_data_loader():
    time.sleep(60)
stuck_in_the_data_loader()
"""


def test_a_stalled_process_writes_its_stacks_records_and_exits(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STALLING, str(tmp_path)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == STALL_EXIT_CODE and time.monotonic() - t0 < 50, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[0]
    assert line.startswith("error: stalled: no step for ") and "(run.stall_timeout_s=1)" in line
    assert "rank 0 (node " in line and "is waiting for its next batch (data loading) at step 3" in line
    stacks = (tmp_path / "stalls" / "rank0.txt").read_text()
    assert "no progress for" in stacks and "stuck_in_the_data_loader" in stacks  # the main thread's frame
    assert (tmp_path / "recorded").read_text() == line.removeprefix("error: ")
    assert json.loads((tmp_path / "watchdog" / "rank0.json").read_text())["step"] == 3
