"""tests/ci_guard.py: a skip fails a CI run (CI=true) and only there."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_some_tool.py").write_text(
        "from tests.ci_guard import require_tool\n"
        "def test_needs_a_tool():\n"
        "    require_tool('no-such-tool-xyz', 'apt-get install no-such-tool-xyz')\n"
        "def test_plain():\n"
        "    assert True\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_guard", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)


def test_a_missing_tool_skips_on_a_developer_machine(tmp_path):
    proc = _run(tmp_path, ci=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout


def test_a_missing_tool_fails_under_ci(tmp_path):
    proc = _run(tmp_path, ci="true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no-such-tool-xyz is not installed (apt-get install no-such-tool-xyz): CI must run this test" in proc.stdout


def test_any_skip_fails_the_session_under_ci(tmp_path):
    (tmp_path / "test_other.py").write_text("import pytest\n@pytest.mark.skip(reason='not today')\ndef test_x():\n    pass\n")
    proc = _run(tmp_path, ci="true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: 1 test(s) skipped under CI=true" in proc.stdout and "test_other.py::test_x: not today" in proc.stdout
