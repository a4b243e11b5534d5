"""`make dry-run`: ranks of a 64-rank job (dp 32 x tp 2 over 32 nodes of 2) on this CPU with a fake
process group: the real mesh, plans, batch and optimizer step, with the planner's bytes to 1%."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.errors import ConfigError
from common.tools.dry_run import parse_ranks
from tests.conftest import ROOT

JOB = ["salm_tp_fsdp2", "--nodes", "32", "--gpus-per-node", "2"]


def dry_run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.tools.dry_run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_ranks_of_a_64_rank_job_match_the_planner_and_name_their_collectives(tiny_corpus):
    proc = dry_run(*JOB, "--ranks", "0,5,last", "--json", f"data.dir={tiny_corpus['dir']}",
                   "data.generated.num_train=120", "data.generated.num_val=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert [(r["rank"], r["node"], r["dp_rank"], r["tp_rank"]) for r in results] == [
        (0, 0, 0, 0), (5, 2, 2, 1), (63, 31, 31, 1)]
    for r in results:
        assert (r["world_size"], r["dp"], r["tp"]) == (64, 32, 2)
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
            assert r["measured"][key] > 0 and r["measured"][key] == pytest.approx(r["predicted"][key], rel=0.01), key
        assert r["batch"]["utterances"] >= 1 and r["step_s"] and r["largest_gathered_unit_bytes"] > 0
        c = r["collectives"]
        # FSDP2 over dp (TP-split units) and over dp x tp (the encoder, projector), TP inside the node.
        assert set(c) == {"data_parallel", "tensor_parallel", "data_tensor_parallel"}, c
        assert c["data_parallel"]["ops"].get("allgather_base") and c["data_parallel"]["ops"].get("reduce_scatter_base")
        assert c["tensor_parallel"]["across_nodes"] is False and c["data_parallel"]["across_nodes"] is True
        assert c["tensor_parallel"]["group_size"] == 2 and c["data_tensor_parallel"]["group_size"] == 64
        assert all(row["bytes"] > 0 and row["time_s"] > 0 for row in c.values())
        ck = r["checkpoint"]
        assert ck["rank_bytes"] == r["measured"]["param_bytes"] + r["measured"]["optimizer_state_bytes"]
        assert ck["job_bytes"] > ck["rank_bytes"] * 32 and ck["rank_write_s"] == pytest.approx(ck["rank_bytes"] / 1e9)
    # TP peers hold different halves of the TP-split weights, the same number of bytes.
    assert results[0]["measured"]["param_bytes"] == pytest.approx(results[1]["measured"]["param_bytes"], rel=0.01)


@pytest.mark.parametrize("args,message", [
    (["--gpus-per-node", "3"], "tensor_parallel_size (2) does not divide GPUS_PER_NODE / trainer.devices (3)"),
    (["--model", "ctc_tiny"], "MODEL 'ctc_tiny' is not a model preset of RECIPE=salm_tp_fsdp2"),
    (["--ranks", "64"], "RANKS: '64' is not a rank of this 64-rank job (0..63 or 'last')"),
    (["trainer.strategy.data_parallel_size=5"], "data_parallel_size (5) x tensor_parallel_size (2) = 10 != world size 64"),
])
def test_a_job_that_cannot_work_at_that_size_is_one_line(args, message):
    job = [*JOB]
    if args[0] == "--gpus-per-node":
        job[-1] = args[1]
        args = []
    proc = dry_run(*job, *args, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert message in proc.stderr, proc.stderr


def test_a_tensor_parallel_size_the_model_cannot_be_split_by_is_named():
    # 4 query heads of salm_tiny's LLM cannot be split 8 ways; only a built model knows it.
    proc = dry_run("salm_tp_fsdp2", "--nodes", "2", "--gpus-per-node", "8", "--ranks", "0",
                   "trainer.strategy.tensor_parallel_size=8", timeout=300)
    assert proc.returncode == 2 and "tensor_parallel_size (8) must divide the backbone's" in proc.stderr, proc.stderr


def test_parse_ranks():
    assert parse_ranks("0,last", 1024) == [0, 1023] and parse_ranks("5,5", 8) == [5]
    with pytest.raises(ConfigError, match="'x' is not a rank"):
        parse_ranks("x", 8)


def test_a_ddp_recipe_is_refused_in_one_line():
    proc = dry_run("asr_ddp", "--nodes", "2", "--gpus-per-node", "2", "--ranks", "0", timeout=120)
    assert proc.returncode == 2 and "RECIPE=asr_ddp trains with DDP" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_corpus_smaller_than_one_step_names_the_make_variable_and_the_flag(tiny_corpus):
    # The tiny corpus cannot fill a global batch of 10,000 s; make users type SLICE_S, not --slice-s.
    proc = dry_run(*JOB, "--ranks", "0", f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120",
                   "data.generated.num_val=16", "data.max_duration_s=10000", timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: the training data forms no global batch"), proc.stderr
    assert "SLICE_S=4" in last and "--slice-s 4" in last and "DATA=<preset>" in last, last
