"""make profile-batches: the largest per-GPU batch of every 2-D bucket within a memory fraction
(on CPU against the planner's memory model; on a GPU the same search with real steps)."""

import json
import subprocess

import pytest

from common.data.buckets import PROFILE_FORMAT, load_bucket_profile
from common.errors import ConfigError
from common.run import ROOT
from common.tools.profile_batches import PlannerMemory, profile, search_largest


def test_search_finds_the_largest_fitting_batch():
    for limit in (1, 2, 3, 7, 8, 100, 1000):
        assert search_largest(lambda b, lim=limit: b <= lim) == limit
    assert search_largest(lambda b: False) == 0


@pytest.fixture(scope="module")
def asr_profile(tiny_corpus):
    overrides = [f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16",
                 "model=fastconformer_ctc_large", "data.max_utterance_s=4"]
    return profile("asr_ddp", overrides, memory_fraction=0.5, measure="planner", gpu_memory_gib=80), overrides


def test_profile_fills_the_fraction_bucket_by_bucket(asr_profile):
    from common.run import compose
    from common.tools.plan import build_meta_model

    result, overrides = asr_profile
    assert result["format"] == PROFILE_FORMAT and result["measured_by"] == "planner"
    cfg = compose("asr_ddp", overrides)
    model, _ = build_meta_model(cfg.copy())
    memory = PlannerMemory(cfg, model, "bf16-mixed")
    limit = 0.5 * result["capacity_bytes"]
    sizes = [b["batch_size_per_gpu"] for b in result["buckets"]]
    for b in result["buckets"]:  # the largest that fits: one more does not
        n, d, t = b["batch_size_per_gpu"], b["max_duration_s"], b["max_tokens"]
        assert memory(n, d, t) <= limit < memory(n + 1, d, t)
    durations = [b["max_duration_s"] for b in result["buckets"]]
    assert durations == sorted(durations) and sizes[0] > sizes[-1]  # short buckets hold more utterances
    assert max(sizes) > 100  # a 109 M model on 80 GB: real batches, not the tiny default


def test_runs_read_the_profile(asr_profile, tmp_path):
    result, _ = asr_profile
    path = tmp_path / "p.json"
    path.write_text(json.dumps(result))
    grid, data = load_bucket_profile(path, recipe="asr_ddp")
    assert [b for row in grid.batch_sizes for b in row] == [b["batch_size_per_gpu"] for b in data["buckets"]]
    assert grid.with_batch_sizes_scaled(8).batch_sizes[0][0] == 8 * grid.batch_sizes[0][0]
    with pytest.raises(ConfigError, match="measured for recipe 'asr_ddp', not 'tts_ddp'"):
        load_bucket_profile(path, recipe="tts_ddp")
    with pytest.raises(ConfigError, match="no such file"):
        load_bucket_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="format None"):
        load_bucket_profile(tmp_path / "bad.json")


@pytest.mark.slow  # make test-fast leaves it out
def test_make_profile_batches_writes_the_file(tiny_corpus, tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(["make", "-s", "profile-batches", "RECIPE=tts_ddp", f"PROFILE={out}", "FRACTION=0.3",
                           f"ARGS=data.dir={tiny_corpus['dir']} data.generated.num_train=120 data.generated.num_val=16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train with: data.bucket_profile=" in proc.stdout
    data = json.loads(out.read_text())
    assert data["recipe"] == "tts_ddp" and data["buckets"] and all(b["batch_size_per_gpu"] >= 1 for b in data["buckets"])
