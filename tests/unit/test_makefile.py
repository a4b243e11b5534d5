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
    assert "common.tools.launch asr_ddp --nproc 8" in dry_run("asr_ddp", gpu_path)  # it passes trainer.devices=8
    assert "--nproc 4" in dry_run("salm_tp_fsdp2", gpu_path)  # its YAML layout is dp 2 x tp 2
    cpu_path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "nvidia-smi")))
    assert "--nproc 2" in dry_run("asr_ddp", cpu_path)


def test_container_and_k8s_targets_are_listed_and_wired(tmp_path):
    import os

    help_text = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for target in ("docker-build", "docker-run", "cpu-base", "container-test", "k8s-render", "k8s-apply"):
        assert f"make {target}" in help_text, target
    fake = tmp_path / "nvidia-smi"  # an 8-GPU node, as above
    fake.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    fake.chmod(0o755)

    def dry(*args, path=os.environ["PATH"]):
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": path}).stdout

    gpu = dry("docker-run", "RECIPE=asr_ddp", "IMAGE=reg.io/sr:1", path=f"{tmp_path}:{os.environ['PATH']}")
    assert "--gpus all" in gpu and "python -m common.tools.launch asr_ddp --nproc 8" in gpu
    cpu_path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "nvidia-smi")))
    cpu = dry("docker-run", "RECIPE=asr_ddp", "IMAGE=reg.io/sr:1", "CONTAINER_TOOL=podman", path=cpu_path)
    assert "--gpus" not in cpu and "--nproc 2" in cpu and "--ulimit nofile=" in cpu
    build = dry("docker-build", "IMAGE=reg.io/sr:1", "BASE_IMAGE=localhost/base:1", "CONTAINER_TOOL=podman")
    assert "--build-arg BASE_IMAGE=localhost/base:1" in build and "--format docker" in build
    apply = dry("k8s-apply", "RECIPE=asr_ddp", "NODES=2", "IMAGE=reg.io/sr:1")
    assert "k8s/render.py --recipe asr_ddp --nodes 2 --gpus-per-node 8" in apply and "kubectl apply -f" in apply


def test_bench_and_plan_targets_are_wired(tmp_path):
    import os

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    cpu_path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "nvidia-smi")))

    def dry_run(*args, path=cpu_path):
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": path}).stdout

    cpu_only = dry_run("bench", "BENCH_LABEL=lab")
    assert "-m bench.cpu --out bench/results/lab" in cpu_only and "bench.gpu" not in cpu_only
    assert "-m bench.gpu --out bench/results/lab" in dry_run("bench", "BENCH_LABEL=lab", path=f"{tmp_path}:{cpu_path}")
    plan = dry_run("plan", "RECIPE=salm_fsdp2", "GPUS_PER_NODE=4", "NODES=2", "ARGS=model.llm.num_hidden_layers=4")
    assert "-m common.tools.plan --recipe salm_fsdp2 --gpus-per-node 4 --nodes 2 model.llm.num_hidden_layers=4" in plan


def test_every_launcher_gives_torchrun_restarts_a_fresh_store():
    # Without it a group restarted by torchrun --max-restarts hangs (tests/distributed/test_faults.py).
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE := 1" in (ROOT / "Makefile").read_text()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (ROOT / "containers" / "Dockerfile").read_text()
    proc = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show"], cwd=ROOT,
                          input="show:\n\t@echo $$TORCH_DISABLE_SHARE_RDZV_TCP_STORE\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "1", proc.stderr
