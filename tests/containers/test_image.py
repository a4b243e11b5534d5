"""The training image is built and run for real: the CPU variant of containers/Dockerfile.

Usage::

    make container-test        # what CI runs (.ci/run installs podman, mmdebstrap, runc, uidmap first)

Only BASE_IMAGE differs from the GPU image: a Debian bookworm + Python 3.11 + CPU torch base made by
containers/build-cpu-base.sh (mmdebstrap; no registry needed, cached once built). The image is built
with the user-facing `make docker-build`, then `make docker-run` trains salm_tp_fsdp2 with 4 processes
(TP 2 x FSDP2 dp 2, gloo) for a few steps, with outputs/ and data/ mounted from a temporary directory.
Cold: ~2 min base + ~3.5 min image + ~1 min run; warm (both images exist): ~1.5 min.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.ci_guard import require_tool
from tests.conftest import ROOT

CPU_BASE_IMAGE = os.environ.get("CPU_BASE_IMAGE", "localhost/speech-recipes-cpu-base:bookworm-py311-torch2.13.0")
IMAGE = "localhost/speech-recipes:0.1.0-cpu"
STEPS = 3

pytestmark = pytest.mark.slow
INSTALL = "CI installs it: apt-get install -y podman mmdebstrap runc uidmap; then make container-test"


@pytest.fixture(autouse=True, scope="module")
def _podman() -> str:
    return require_tool("podman", INSTALL)


def make(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args, "CONTAINER_TOOL=podman"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def ulimits() -> list[str]:
    """The same explicit limits as the Makefile's PODMAN_ULIMITS (podman's defaults are refused here)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    nproc = 32768 if nproc == resource.RLIM_INFINITY or nproc > 32768 else nproc
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={nproc}:{nproc}"]


def podman(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    if args[0] == "run":
        args = ("run", *ulimits(), *args[1:])
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    exists = podman("image", "exists", CPU_BASE_IMAGE).returncode == 0
    if not exists:
        require_tool("mmdebstrap", f"{CPU_BASE_IMAGE} is absent and mmdebstrap bootstraps it; {INSTALL}")
    proc = make("cpu-base", f"CPU_BASE_IMAGE={CPU_BASE_IMAGE}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = make("docker-build", f"IMAGE={IMAGE}", f"BASE_IMAGE={CPU_BASE_IMAGE}", timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return IMAGE


def test_image_runs_as_non_root_and_keeps_the_base_torch(image):
    out = podman("run", "--rm", image, "sh", "-c", "id -u; python -c 'import torch; print(torch.__version__)'")
    assert out.returncode == 0, out.stderr
    uid, torch_version = out.stdout.split()
    assert uid == "10001"
    base = podman("run", "--rm", CPU_BASE_IMAGE, "python", "-c", "import torch; print(torch.__version__)")
    assert torch_version == base.stdout.strip() == "2.13.0+cpu"


def test_image_has_no_secrets_and_loads_nothing_from_a_hub(image):
    cfg = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert not {"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & env.keys()
    assert env["HF_HUB_OFFLINE"] == "1" and env["WANDB_MODE"] == "offline"
    assert cfg["User"] == "10001:10001"
    # No credentials, virtualenv or run outputs travelled in the build context (.dockerignore).
    ls = podman("run", "--rm", image, "sh", "-c", "ls -A /app; test ! -e /app/.venv && test ! -e /app/.git")
    assert ls.returncode == 0 and sorted(ls.stdout.split()) == ["README.md", "common", "constraints.txt",
                                                                "pyproject.toml", "recipes"], ls.stdout


def test_salm_tp_fsdp2_trains_in_the_container(image, tmp_path):
    # The container generates the small corpus into the mounted data/ itself (lhotse manifests hold
    # absolute paths, so a corpus generated on the host would not resolve inside).
    outputs, data = tmp_path / "outputs", tmp_path / "data"
    args = " ".join([f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                     f"checkpoint.every_n_steps={STEPS}", "logger.wandb=false", "data.max_duration_s=12",
                     "data.generated.num_train=120", "data.generated.num_val=16"])
    proc = make("docker-run", "RECIPE=salm_tp_fsdp2", "NPROC=4", f"IMAGE={image}", "RUN_NAME=container-test",
                f"OUTPUTS_DIR={outputs}", f"DATA_DIR={data}", f"ARGS={args}", timeout=900)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + (proc.stdout + proc.stderr)[-3000:]
    run_dir = outputs / "salm_tp_fsdp2" / "container-test"
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["status"], s["steps"], s["world_size"]) == ("completed", STEPS, 4)
    assert (s["data_parallel_size"], s["tensor_parallel_size"]) == (2, 2)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    if os.getuid() == 0:  # written by the image's user, not by root
        assert (run_dir / "summary.json").stat().st_uid == 10001


def test_cpu_base_script_names_a_bad_wheel(tmp_path):
    require_tool("mmdebstrap", INSTALL)
    proc = subprocess.run([str(ROOT / "containers" / "build-cpu-base.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FORCE": "1", "TORCH_WHEEL": str(tmp_path / "nope.whl"),
                               "CPU_BASE_IMAGE": "localhost/speech-recipes-cpu-base:never-built"})
    assert proc.returncode == 2 and f"error: TORCH_WHEEL={tmp_path / 'nope.whl'} is not a file" in proc.stderr
