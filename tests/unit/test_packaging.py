"""The installed package carries every file the code reads at run time.

Containers install /app non-editable, so a config the wheel leaves out works in the checkout and
fails only inside the image ("Could not find 'model/salm_tiny'"). Building the wheel here catches
that in seconds instead of in the container test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_the_wheel_holds_every_tracked_data_file_of_common(tmp_path):
    # Build from the committed-or-staged tree (a fresh copy, as the image's COPY does): a build in the
    # checkout would reuse its build/ and *.egg-info, which can hold files the config leaves out.
    src = tmp_path / "src"
    src.mkdir()
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("speech_recipes-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    data_files = [f for f in tracked if f.startswith("common/") and not f.endswith(".py")]
    assert any(f.startswith("common/conf/model/") for f in data_files)
    missing = sorted(set(data_files) - in_wheel)
    assert not missing, f"pyproject.toml [tool.setuptools.package-data] leaves out: {missing}"
