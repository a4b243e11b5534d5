"""The rendered manifests really train: each pod's command, exactly as written in the PyTorchJob, runs
as local processes with the environment the Kubeflow operator injects (tests/k8s/operator_emulation.py).

Two pods x two processes on CPU/gloo (nprocPerNode reduced from the GPU count to 2), master/rendezvous
host 127.0.0.1, a tiny config appended as Hydra overrides, a temporary directory as the volume:

* salm_tp_fsdp2, fixed size (static rendezvous from PET_MASTER_ADDR/PORT, PET_NNODES=2): TP 2 inside a
  pod x FSDP2 dp 2 across the pods;
* asr_ddp, elastic (elasticPolicy: c10d rendezvous at <job>-worker-0, PET_NNODES=1:2).

Each run costs ~40 CPU-seconds of imports for 4 processes; the training itself is 2 steps.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.k8s.operator_emulation import free_port, launch, pod_specs, wait_all

sys.path.insert(0, str(ROOT / "k8s"))
import render  # noqa: E402
import validate  # noqa: E402

pytestmark = pytest.mark.slow


TINY_PRESET = {"salm_tp_fsdp2": "salm_tiny", "salm_fsdp2": "salm_tiny", "asr_ddp": "ctc_tiny", "tts_ddp": "fastspeech_tiny"}


def run_job(recipe: str, tiny_corpus, tmp_path, elastic: bool = False, more: tuple = (), expect: int = 0,
            **render_kwargs):
    # The GPU manifests default to real-size presets on LibriSpeech; on CPU the job runs the tiny model on the
    # generated corpus, chosen the way a user would: make k8s-render MODEL=... DATA=...
    text = render.render(recipe, nodes=2, gpus_per_node=8, image="registry.example.com/speech-recipes:0.1.0",
                         job=f"{recipe.replace('_', '-')}-emu", elastic=elastic, model=TINY_PRESET[recipe],
                         data="generated", **render_kwargs)
    assert validate.validate_stream(text) == []
    (job,) = validate.pytorchjobs(text)
    pods = pod_specs(job, nproc_per_node=2, port=free_port())
    volume = tmp_path / "pvc"
    # The tiny config; trainer.devices / num_nodes stay the manifest's (they follow what torchrun started).
    extra = [o for o in tiny_overrides(tiny_corpus, 2) if not o.startswith("trainer.devices=")]
    extra += ["trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
              "checkpoint.every_n_steps=2", "data.num_workers=0", *more]
    procs = launch(pods, volume, extra_args=extra, extra_env={"OMP_NUM_THREADS": "1"}, log_dir=tmp_path)
    codes = wait_all(procs, timeout=420)
    logs = {p.name: (tmp_path / f"{p.name}.log").read_text() for p in pods}
    assert codes == [expect] * len(pods), {k: v[-3000:] for k, v in logs.items()}
    return job, pods, volume, logs


def test_fixed_size_job_trains_across_two_pods(tiny_corpus, tmp_path):
    job, pods, volume, logs = run_job("salm_tp_fsdp2", tiny_corpus, tmp_path)
    assert [p.name for p in pods] == ["salm-tp-fsdp2-emu-master-0", "salm-tp-fsdp2-emu-worker-0"]
    master, worker = (p.env for p in pods)
    # What torchrun read: the operator's variables, never flags in the manifest.
    assert (master["PET_NNODES"], master["PET_NODE_RANK"], worker["PET_NODE_RANK"]) == ("2", "0", "1")
    assert master["PET_NPROC_PER_NODE"] == "2" and master["WORLD_SIZE"] == "4"
    assert master["PET_MASTER_ADDR"] == "127.0.0.1" and master["RUN_NAME"] == "salm-tp-fsdp2-emu"
    assert "WANDB_API_KEY" not in master  # optional Secret absent: not set, the pod still starts
    # One run directory on the volume, named after the job: what a restarted pod finds again.
    run_dir = volume / "outputs" / "salm_tp_fsdp2" / "salm-tp-fsdp2-emu"
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["status"], s["steps"], s["world_size"]) == ("completed", 2, 4)
    assert (s["data_parallel_size"], s["tensor_parallel_size"]) == (2, 2)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    # Every pod's ranks started with the hang-surfacing NCCL settings of common.cluster (launch-node<N>.log).
    for node in (0, 1):
        launched = (run_dir / f"launch-node{node}.log").read_text()
        assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in launched and "TORCH_NCCL_DUMP_ON_TIMEOUT=1" in launched


def test_elastic_job_trains_with_c10d_rendezvous(tiny_corpus, tmp_path):
    job, pods, volume, logs = run_job("asr_ddp", tiny_corpus, tmp_path, elastic=True, min_nodes=1)
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    for p in pods:
        assert p.env["PET_RDZV_BACKEND"] == "c10d" and p.env["PET_NNODES"] == "1:2"
        assert p.env["PET_RDZV_ENDPOINT"].startswith("127.0.0.1:")
    run_dir = volume / "outputs" / "asr_ddp" / "asr-ddp-emu"
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["status"], s["steps"], s["world_size"]) == ("completed", 2, 4)


def test_a_mistake_is_one_line_in_each_pods_log(tiny_corpus, tmp_path):
    """The pods run common.tools.launch --cluster: a bad setting is one error line in each pod's log,
    before torchrun starts (no launcher or rank traceback), and the pod exits 2."""
    job, pods, volume, logs = run_job("salm_tp_fsdp2", tiny_corpus, tmp_path, more=("trainer.max_steps=0",), expect=2)
    for name, log in logs.items():
        assert [line for line in log.splitlines() if line.startswith("error")] == [
            "error: trainer.max_steps must be an integer >= 1, got 0"], log[-3000:]
        assert "Traceback" not in log and "torchrun" not in log, name
