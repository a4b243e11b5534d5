"""common.cluster, the one launch plan: shapes from make run, Kubernetes and Slurm; the ranks'
environment; the checks every renderer and the dry run apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import cluster
from common.errors import ConfigError


def test_each_scheduler_gives_its_shape_and_torchrun_arguments():
    local = cluster.local(4)
    assert (local.nodes, local.procs_per_node, local.world_size) == (1, 4, 4)
    assert local.torchrun_args == ("--standalone", "--nproc-per-node=4")

    pods = cluster.kubernetes({"PET_NPROC_PER_NODE": "8", "PET_NNODES": "2:4", "PET_NODE_RANK": "3"})
    assert (pods.nodes, pods.procs_per_node, pods.node_rank, pods.torchrun_args) == (4, 8, 3, ())

    task = cluster.slurm(8, {"SLURM_JOB_NUM_NODES": "16", "SLURM_JOB_ID": "77", "SLURM_PROCID": "5",
                             "RDZV_ENDPOINT": "n001:29577"})
    assert (task.nodes, task.world_size, task.node_rank) == (16, 128, 5)
    assert task.torchrun_args == ("--nnodes=16", "--nproc-per-node=8", "--rdzv-backend=c10d",
                                  "--rdzv-endpoint=n001:29577", "--rdzv-id=slurm-77", "--max-restarts=0")
    assert task.trainer_overrides() == ["trainer.devices=8", "trainer.num_nodes=16"]


@pytest.mark.parametrize("make,message", [
    (lambda: cluster.kubernetes({"PET_NPROC_PER_NODE": "two"}), "PET_NPROC_PER_NODE must be a positive integer"),
    (lambda: cluster.slurm(8, {"SLURM_JOB_NUM_NODES": "2"}), "RDZV_ENDPOINT is not set"),
    (lambda: cluster.slurm(8, {"RDZV_ENDPOINT": "h:1"}), r"SLURM_JOB_NUM_NODES must be a positive integer \(nodes of the allocation\), got ''"),
    (lambda: cluster.requested(0, 8), "NODES must be >= 1, got 0"),
])
def test_a_bad_shape_is_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_ranks_get_the_hang_surfacing_environment_without_the_schedulers_task_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a user's own choice is kept
    env = cluster.slurm(2, {"SLURM_JOB_NUM_NODES": "2", "RDZV_ENDPOINT": "h:1"}).rank_env(Path(tmp_path))
    assert "SLURM_NTASKS" not in env  # else Lightning would take its Slurm environment, one rank per task
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "nccl_trace" / "rank_")
    assert "SLURM_NTASKS" in cluster.local(2).rank_env(Path(tmp_path))  # only Slurm tasks hide it


def test_check_shape_is_the_layout_rule_of_every_launcher():
    cfg, checked = cluster.check_shape("salm_tp_fsdp2", cluster.requested(16, 8), model="canary_qwen_2p5b")
    assert (checked.layout.data_parallel_size, checked.layout.tensor_parallel_size) == (64, 2)
    assert cfg.data.max_duration_s == 1000 * 128  # per GPU x GPUs
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(2\) does not divide GPUS_PER_NODE"):
        cluster.check_shape("salm_tp_fsdp2", cluster.requested(2, 3))
    with pytest.raises(ConfigError, match="DATA 'libri' is not a data preset"):
        cluster.check_shape("asr_ddp", cluster.requested(1, 8), data="libri")
