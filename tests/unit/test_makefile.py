"""The user-facing make targets: idempotent setup, clear error for an unknown recipe."""

import subprocess

from tests.conftest import ROOT


def test_setup_is_up_to_date_after_setup():
    # `make -q` exits 0 only when the target needs no work: a second `make setup` redoes nothing.
    proc = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "make setup would run again; was pyproject.toml/constraints.txt edited after setup?"


def test_unknown_recipe_is_a_clear_error():
    proc = subprocess.run(["make", "run", "RECIPE=nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown RECIPE 'nope': no recipes/nope/config.yaml" in proc.stderr
    assert "salm_tp_fsdp2" in proc.stderr  # lists what exists
