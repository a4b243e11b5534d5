"""data.bucket_profile: a run takes its buckets and per-GPU batch sizes (x the world size)."""

import json

from common.data.buckets import PROFILE_FORMAT
from tests.conftest import jsonl_rows, run_recipe, tiny_overrides


def test_a_run_uses_the_profiled_batch_sizes(tiny_corpus, tmp_path):
    profile = {"format": PROFILE_FORMAT, "recipe": "asr_ddp", "measured_by": "hand", "buckets": [],
               "grid": {"duration_edges": [1.0, 30.0], "token_edges": [[100], [100]], "batch_sizes": [[5], [3]]}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    run_dir = tmp_path / "run"
    proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=8", "trainer.limit_val_batches=0",
                                                   f"data.bucket_profile={path}"), run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = jsonl_rows(run_dir / "metrics.jsonl")
    assert len(rows) == 8
    assert {r["utterances"] for r in rows} <= {10, 6}  # 5 or 3 per GPU x 2 GPUs
    assert {r["utterances"] for r in rows} == {10, 6}  # both buckets trained


def test_a_profile_of_another_recipe_is_refused_before_training(tiny_corpus, tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": PROFILE_FORMAT, "recipe": "tts_ddp", "grid": {}}))
    proc = run_recipe("asr_ddp", 1, tiny_overrides(tiny_corpus, 1, f"data.bucket_profile={path}"), tmp_path / "run",
                      timeout=120)
    assert proc.returncode != 0
    assert any(line.startswith("error:") and "measured for recipe 'tts_ddp', not 'asr_ddp'" in line
               for line in proc.stderr.splitlines()), proc.stderr[-2000:]
