"""Process-tree helpers for the fault tests (a killed node, a frozen rank): read from /proc.

Usage::

    kill_tree(proc.pid)              # SIGKILL torchrun and every rank at once, as a lost node loses them
    descendants(proc.pid)            # every pid below it
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        found = children(stack.pop())
        out += found
        stack += found
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a lost node would lose them."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
