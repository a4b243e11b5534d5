"""Under ``CI=true`` a skipped test fails the run: CI installs every tool and asset the suite needs
(``make setup``: kubectl, hadolint; ``.ci/run``: podman for the container test), so a skip there
means a missing install step, which would otherwise pass unseen behind pytest's ``-ra`` line.

``ALLOWED`` lists the tests that may skip in CI, with why; it is empty. A developer's machine without
a tool still skips (``require_tool``), with the install command in the reason.

Loaded by ``tests/conftest.py``; ``pytest -p tests.ci_guard`` loads it for any other test tree.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ALLOWED: dict[str, str] = {}  # test node id -> why it may skip on CI


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, install: str) -> str:
    """The path of ``name`` (the venv's ``bin/`` first, then PATH); if absent: fail under CI, else skip."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}: CI must run this test, not skip it", pytrace=False)
    pytest.skip(message)


_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus) -> None:
    unexpected = [(nodeid, reason) for nodeid, reason in _skipped if nodeid not in ALLOWED]
    if in_ci() and unexpected:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"error: {len(unexpected)} test(s) skipped under CI=true (install what they need in make setup "
                 "or .ci/run, or list them in tests/ci_guard.py ALLOWED with the reason):"]
        lines += [f"  {nodeid}: {reason}" for nodeid, reason in unexpected]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line("\n".join(lines), red=True)
        else:
            print("\n".join(lines), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
