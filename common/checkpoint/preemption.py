"""SIGTERM and Ctrl-C: every rank saves at the same step boundary, within a grace period, then stops.

Lightning's own SIGTERM handler broadcasts from inside the handler, i.e. at an arbitrary point of a
collective on whichever rank got the signal. This one only notes the signal; the ranks agree on it
at a step boundary with one tiny all-reduce (:meth:`StopSignal.agreed`), so that they all save the
same step and stop together. A second Ctrl-C stops at once (KeyboardInterrupt), keeping the last
complete checkpoint; a save that does not finish within the grace period exits 1.

Usage (what :class:`common.checkpoint.RunCheckpoint` does)::

    stop = StopSignal(grace_s=60)
    stop.install()                              # on_train_start, main thread
    if stop.agreed(device):                     # a step boundary, every rank
        ...save...
        raise stop.preempted(step, checkpoint)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

GO_ON, SIGTERM, SIGINT = 0, 1, 2  # what the ranks agree on: the largest of their codes


class Preempted(Exception):
    """Raised on every rank after the checkpoint of a SIGTERM (``status`` preempted) or a Ctrl-C
    (SIGINT, ``status`` interrupted) is written."""

    def __init__(self, message: str, status: str = "preempted"):
        super().__init__(message)
        self.status = status


class StopSignal:
    """SIGTERM / SIGINT noted on this rank, agreed across ranks at step boundaries."""

    def __init__(self, grace_s: float):
        self.grace_s = float(grace_s)
        self.name: str | None = None  # "SIGTERM" | "SIGINT" once one arrived on this rank
        self._at: float | None = None

    def install(self) -> None:
        """Replace the handlers (Lightning registers its SIGTERM one just before on_train_start)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._at is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._at = time.monotonic()
        self.name = signal.Signals(signum).name
        print(f"{self.name}: saving a checkpoint at the next step boundary, then exiting "
              f"(grace {self.grace_s:g}s)", file=sys.stderr, flush=True)
        timer = threading.Timer(self.grace_s, _grace_expired, args=(self.grace_s,))
        timer.daemon = True
        timer.start()

    def agreed(self, device) -> int:
        """On every rank at the same step: GO_ON, SIGTERM (some rank got one) or SIGINT (some rank got
        Ctrl-C). A collective when a process group exists."""
        mine = GO_ON if self.name is None else (SIGINT if self.name == "SIGINT" else SIGTERM)
        flag = torch.tensor([float(mine)], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def preempted(code: int, step: int, checkpoint: str | None) -> Preempted:
        name = "SIGINT (Ctrl-C)" if code == SIGINT else "SIGTERM"
        return Preempted(f"stopped by {name} after step {step}; checkpoint {checkpoint}; the same command resumes",
                         status="interrupted" if code == SIGINT else "preempted")


def _grace_expired(grace_s: float) -> None:
    print(f"error: no checkpoint within checkpoint.preemption_grace_s={grace_s:g}s of SIGTERM; exiting "
          "(the last complete checkpoint is kept)", file=sys.stderr, flush=True)
    os._exit(1)
