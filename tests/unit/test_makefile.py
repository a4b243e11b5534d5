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


def test_ddp_recipes_take_every_gpu_of_the_node(tmp_path):
    fake = tmp_path / "nvidia-smi"  # stands in for the driver tool on an 8-GPU node
    fake.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    fake.chmod(0o755)
    import os

    def dry_run(recipe, path):
        out = subprocess.run(["make", "-n", "run", f"RECIPE={recipe}"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PATH": path}, timeout=60).stdout
        return out

    gpu_path = f"{tmp_path}:{os.environ['PATH']}"
    assert "--nproc-per-node=8" in dry_run("asr_ddp", gpu_path) and "trainer.devices=8" in dry_run("asr_ddp", gpu_path)
    assert "--nproc-per-node=4" in dry_run("salm_tp_fsdp2", gpu_path)  # its YAML layout is dp 2 x tp 2
    cpu_path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "nvidia-smi")))
    assert "--nproc-per-node=2" in dry_run("asr_ddp", cpu_path)
