"""Slurm launch against a real Slurm cluster on this machine (slurmctld + slurmd n1, n2 + slurmdbd):
salm_tp_fsdp2 on 2 nodes x 2 CPU processes (TP 2 inside each node, FSDP2 over the nodes), preempted
by Slurm's warning signal, checkpointed, requeued, and resumed to the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ci_guard import in_ci, require_tool
from tests.conftest import ROOT, jsonl_rows, run_recipe
from tests.slurm_cluster import INSTALL, SlurmCluster, can_be_root, missing_tools

STEPS = 12
LOG_EVERY = 2  # ranks agree on a signal at log steps
SHORT = ["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "data.num_workers=1", "logger.wandb=false",
         "data.generated.num_train=120", "data.generated.num_val=16", f"trainer.log_every_n_steps={LOG_EVERY}"]
RUN = [f"trainer.max_steps={STEPS}", "data.max_tokens=216", *SHORT]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    for tool in missing_tools():
        require_tool(tool, INSTALL)
    if not can_be_root():
        message = "the test cluster's daemons run as root (munged, slurmd): root or password-less sudo"
        pytest.fail(message + " under CI=true", pytrace=False) if in_ci() else pytest.skip(message)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def render(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.tools.slurm", "render", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "RUN_NAME": "r1", **(env or {})})


def test_render_checks_the_layout_before_submitting():
    bad = render("salm_tp_fsdp2", "--nodes", "2", "--gpus-per-node", "3")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: tensor_parallel_size (2) does not divide GPUS_PER_NODE / trainer.devices (3): a tensor-parallel "
        "group would span nodes; use a multiple of 2 GPUs per node"), bad.stderr
    preset = render("asr_ddp", "--model", "canary_qwen_2p5b")
    assert preset.returncode == 2 and "MODEL 'canary_qwen_2p5b' is not a model preset of RECIPE=asr_ddp" in preset.stderr
    dp = render("salm_tp_fsdp2", "--nodes", "2", "--gpus-per-node", "8", "trainer.strategy.data_parallel_size=3")
    assert dp.returncode == 2 and "data_parallel_size (3) x tensor_parallel_size (2) = 6 != world size 16" in dp.stderr
    image = render("asr_ddp", "--container", "pyxis")
    assert image.returncode == 2 and "CONTAINER=pyxis needs IMAGE" in image.stderr

    gpu = render("salm_tp_fsdp2", "--nodes", "16", "--gpus-per-node", "8", "--model", "canary_qwen_2p5b",
                 "--data", "librispeech", "--container", "pyxis", "--image", "reg.io/speech-recipes:0.1.0",
                 "--sbatch", "--partition=gpu --time=24:00:00")
    assert gpu.returncode == 0, gpu.stderr
    text = gpu.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
                 "data parallel 64 x tensor parallel 2", "--container-image reg.io/speech-recipes:0.1.0",
                 "python -m common.tools.launch salm_tp_fsdp2 --slurm --nproc 8 model=canary_qwen_2p5b data=librispeech "
                 "trainer.strategy.data_parallel_size=auto"):
        assert line in text, line
    apptainer = render("asr_ddp", "--nodes", "2", "--container", "apptainer", "--image", "/images/sr.sif")
    assert "apptainer exec --nv --pwd /workspace --bind" in apptainer.stdout and "/images/sr.sif python -m" in apptainer.stdout
    cpu = render("asr_ddp", "--nodes", "2", "--gpus-per-node", "2", "--cpu")
    assert "#SBATCH --gpus-per-node" not in cpu.stdout and f"{sys.executable} -m common.tools.launch asr_ddp --slurm" in cpu.stdout


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_losses(slurm, tiny_corpus, tmp_path):
    data = [f"data.dir={tiny_corpus['dir']}"]
    # The same run without Slurm: one machine, 4 processes, the same 2 x 2 mesh.
    reference = tmp_path / "reference"
    proc = run_recipe("salm_tp_fsdp2", 4, ["trainer.devices=4", *RUN, *data], reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = jsonl_rows(reference / "metrics.jsonl")

    out = tmp_path / "outputs"
    run_name = f"slurm-{os.getpid()}"
    run_dir = out / "salm_tp_fsdp2" / run_name
    script = tmp_path / "job.sbatch"
    rendered = render("salm_tp_fsdp2", "--nodes", "2", "--gpus-per-node", "2", "--cpu", "--max-requeues", "2",
                      f"run.output_dir={run_dir}", "checkpoint.every_n_steps=4", *RUN, *data, env={"RUN_NAME": run_name})
    assert rendered.returncode == 0, rendered.stderr
    # The job log goes beside the test's outputs, not into the checkout's outputs/.
    script.write_text(rendered.stdout.replace(f"--output={ROOT}/outputs/slurm/", f"--output={tmp_path}/"))
    job = slurm.submit(script, cwd=tmp_path)

    metrics = run_dir / "metrics.jsonl"
    _wait_for_step(slurm, job, metrics, 2, tmp_path, run_name)
    # Slurm's warning signal, as --signal=B:USR1@... sends it before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm.env, check=True)
    # The requeued job resumes; then a rank dies (SIGKILL: a lost node). The job is requeued again and
    # resumes from its newest complete checkpoint.
    _wait_for_step(slurm, job, metrics, 5, tmp_path, run_name)
    assert int(slurm.job(job)["Restarts"]) == 1
    os.kill(_rank_pids(run_dir)[0], 9)
    info = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=600)
    log = _log(tmp_path, run_name, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", (info, log)
    assert "USR1: checkpoint, then requeue" in log and "preempted (USR1): requeued (requeue 1 of 2)" in log, log
    assert "the launch failed with status 1" in log and "requeued (requeue 2 of 2)" in log, log

    attempts = jsonl_rows(run_dir / "attempts.jsonl")
    ends = [a for a in attempts if a["event"] == "end"]
    assert [a["status"] for a in ends][0] == "preempted" and ends[-1]["status"] == "completed", attempts
    assert len([a for a in attempts if a["event"] == "start"]) == 3, attempts  # the killed attempt started too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 2 <= ends[0]["steps"] < 5 and summary["resumed_from"].endswith("step000004.ckpt"), summary
    assert (summary["world_size"], summary["data_parallel_size"], summary["tensor_parallel_size"]) == (4, 2, 2)
    got = jsonl_rows(metrics)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for mine, ref in zip(got, expected):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6), (mine, ref)
    # Every rank started with the hang-surfacing NCCL settings (common.cluster.RANK_ENV), per node's log.
    launch_log = (run_dir / "launch-node0.log").read_text()
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in launch_log and "TORCH_NCCL_DUMP_ON_TIMEOUT=1" in launch_log
    assert "--rdzv-backend=c10d" in launch_log and "trainer.num_nodes=2" in launch_log

    states = slurm.sacct(job)
    assert [s for s in states if s[0] == str(job)] == [(str(job), "REQUEUED"), (str(job), "REQUEUED"),
                                                        (str(job), "COMPLETED")], states


def test_make_slurm_submit_keeps_its_script_and_requeues_are_bounded(slurm, tiny_corpus, tmp_path):
    """`make slurm-submit` writes outputs/slurm/<run name>.sbatch and submits it; a job that keeps failing is
    requeued MAX_REQUEUES times (here 0), then ends failed, saying so in its log."""
    run_name = f"test-bounded-{os.getpid()}-{time.time_ns()}"
    run_dir = tmp_path / "outputs" / "bounded"
    args = (f"run.output_dir={run_dir} data.dir={tiny_corpus['dir']} trainer.max_steps=200 data.max_duration_s=8 "
            + " ".join(SHORT))
    made = [ROOT / "outputs" / "slurm" / f"{run_name}.sbatch"]
    try:
        proc = subprocess.run(["make", "-s", "slurm-submit", "RECIPE=asr_ddp", "NODES=2", "GPUS_PER_NODE=1", "CPU=1",
                               "MAX_REQUEUES=0", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True,
                              env={**slurm.env, "RUN_NAME": run_name}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        job = int(proc.stdout.split("submitted job ")[1].split(":")[0])
        assert f"log: outputs/slurm/{run_name}-{job}.out" in proc.stdout and made[0].is_file()
        made.append(ROOT / "outputs" / "slurm" / f"{run_name}-{job}.out")
        _wait_for_step(slurm, job, run_dir / "metrics.jsonl", 1, made[1].parent, run_name)
        os.kill(_rank_pids(run_dir)[0], 9)
        info = slurm.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=300)
        log = _log(made[1].parent, run_name, job)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
        assert "not requeued: the job was requeued 0 time(s) already (MAX_REQUEUES=0)" in log, log
    finally:
        for path in made:  # what this test wrote into the checkout's outputs/slurm/
            path.unlink(missing_ok=True)


def _wait_for_step(slurm, job: int, metrics, step: int, tmp_path, run_name: str, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        info = slurm.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED"), (
            info, _log(tmp_path, run_name, job))
        assert time.monotonic() < deadline, _log(tmp_path, run_name, job)
        time.sleep(0.5)


def _rank_pids(run_dir) -> list[int]:
    """The training ranks of this run (children of a torchrun whose command names the run directory)."""
    ranks = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            parent = (Path("/proc") / (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"common.train" in cmd and f"run.output_dir={run_dir}".encode() in cmd and b"torchrun" in parent:
            ranks.append(int(proc.name))
    assert ranks, f"no rank of {run_dir} found"
    return sorted(ranks)


def _log(tmp_path, run_name: str, job: int) -> str:
    path = tmp_path / f"{run_name}-{job}.out"
    return path.read_text() if path.exists() else f"(no {path})"
