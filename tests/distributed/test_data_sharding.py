"""Ranks of one TP group receive identical batches; ranks of different DP groups do not (real 2x2 mesh)."""

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT, TORCHRUN


def test_tp_group_shares_batches_dp_groups_differ(tiny_corpus, tmp_path):
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=4", str(Path(__file__).with_name("_dump_batches.py")),
           str(tmp_path), str(tiny_corpus["train"]), str(tiny_corpus["val"]), "2", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    # init_device_mesh lays ranks out row-major: rank = dp_rank * tp + tp_rank
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] and ranks[2]["batches"] == ranks[3]["batches"]
    assert len(ranks[0]["batches"]) == len(ranks[2]["batches"]) > 2
    for a, b in zip(ranks[0]["batches"], ranks[2]["batches"]):
        # disjoint shards; one is empty only for a one-utterance global batch (the longest bucket's)
        assert (a or b) and not set(a) & set(b) and (a and b or len(a) + len(b) == 1)
    assert sum(bool(a and b) for a, b in zip(ranks[0]["batches"], ranks[2]["batches"])) > 2
