"""A short real run of each SALM recipe writes everything the run contract promises.

One run per layout (a module fixture), read by one test per concern: the record files, summary.json's
schema and figures, throughput, the sharded checkpoint, logging, transcription from the checkpoint."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, jsonl_rows, run_recipe

SUMMARY_KEYS = {"recipe", "status", "world_size", "data_parallel_size", "tensor_parallel_size", "strategy",
                "accelerator", "precision", "steps", "train_loss_first", "train_loss_last", "val", "throughput",
                "memory", "wall_s", "checkpoint", "device", "derived_settings"}
LAYOUTS = {"salm_fsdp2": (2, 2, 1), "salm_tp_fsdp2": (4, 2, 2)}  # recipe: processes, dp, tp


@dataclass
class Contract:
    recipe: str
    nproc: int
    dp: int
    tp: int
    run_dir: Path
    stdout: str
    summary: dict
    metrics: list[dict]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def run(request, tiny_corpus, tmp_path_factory) -> Contract:
    recipe = request.param
    nproc, dp, tp = LAYOUTS[recipe]
    run_dir = tmp_path_factory.mktemp(recipe) / "outputs" / recipe / "contract"
    proc = run_recipe(recipe, nproc, [
        f"trainer.devices={nproc}", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "checkpoint.every_n_steps=2", "data.max_tokens=216", "data.num_workers=1",
        f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16",
        "logger.wandb=true",
    ], run_dir, extra_env={"WANDB_MODE": "online", **({  # salm_fsdp2: no API key, so offline
        # salm_tp_fsdp2: a key, but no wandb server answers (a closed port): offline after one warning
        "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
        if recipe == "salm_tp_fsdp2" else {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Contract(recipe, nproc, dp, tp, run_dir, proc.stdout, json.loads((run_dir / "summary.json").read_text()),
                    jsonl_rows(run_dir / "metrics.jsonl"))


def test_record_files(run):
    assert f"results in {run.run_dir}" in run.stdout
    assert "transcribe: python -m common.tools.transcribe" in run.stdout and "synthesize: python" not in run.stdout
    config = (run.run_dir / "config.yaml").read_text()
    assert "ModelParallelStrategy" in config and "use_distributed_sampler: false" in config and "${" not in config
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    assert all({"step", "train_loss", "lr"} <= m.keys() and m["train_loss"] > 0 for m in run.metrics)
    validations = jsonl_rows(run.run_dir / "validation.jsonl")
    assert [v["step"] for v in validations] == [0, 4]  # the untrained model first, then every val_check_interval
    assert run.summary["val_first"] == {"loss": validations[0]["val_loss"], "wer": validations[0]["val_wer"]}
    assert (run.run_dir / "tokenizer" / "word_tokenizer.json").exists()


def test_summary_describes_the_run(run):
    s = run.summary
    assert SUMMARY_KEYS <= s.keys()
    assert (s["recipe"], s["status"], s["steps"]) == (run.recipe, "completed", 4)
    assert (s["world_size"], s["data_parallel_size"], s["tensor_parallel_size"]) == (run.nproc, run.dp, run.tp)
    assert (s["strategy"], s["accelerator"], s["precision"]) == ("ModelParallelStrategy", "cpu", "32-true")
    assert s["derived_settings"]["trainer.precision"] == {"given": "auto", "used": "32-true"}  # resolved once, listed
    assert (s["device"]["type"], s["device"]["distributed_backend"]) == ("cpu", "gloo")
    assert s["device"]["torch"] == __import__("torch").__version__
    assert 0 <= s["val"]["wer"] and s["val"]["loss"] > 0
    assert s["bf16_compute"] is False and s["compile"] == {"graphs": 0, "graphs_after_warmup": 0}
    ranks = s["memory"]["per_rank"]
    assert len(ranks) == run.nproc and all(r["param_bytes"] > 0 and r["optimizer_state_bytes"] > 0 for r in ranks)
    assert s["train_loss_first"] == run.metrics[0]["train_loss"]
    assert s["train_loss_last"] == run.metrics[-1]["train_loss"]


def test_throughput_and_step_split(run):
    t = run.summary["throughput"]
    assert t["utterances_per_s"] > 0 and t["audio_s_per_s"] > 0 and t["tokens_per_s"] > t["utterances_per_s"]
    # The step-time split (data wait between steps + the step itself) adds up to the measured step.
    assert t["data_wait_s"] >= 0 and t["compute_s"] > 0
    assert 0.8 * t["step_time_s"] <= t["data_wait_s"] + t["compute_s"] <= 1.05 * t["step_time_s"] + 1e-3, t
    # Model FLOPs of every batch (common.flops), also for an FSDP2-wrapped model; no MFU without a bf16 peak.
    assert t["model_tflops_per_s"] > 0 and t["mfu"] is None and all(m["model_tflop"] > 0 for m in run.metrics)


def test_sharded_checkpoints_and_their_saves(run):
    s = run.summary
    # Each save of the attempt with how long the step loop stood still for it (every 2 steps: 2 and 4).
    assert [c["step"] for c in s["checkpoint_saves"]] == [2, 4] and all(c["stall_s"] > 0 for c in s["checkpoint_saves"])
    # checkpoint.async_save: auto saves synchronously on a CPU (bench/README.md: it does not pay there).
    assert all(c["mode"] == "sync" and c["write_s"] > 0 for c in s["checkpoint_saves"])
    assert s["derived_settings"]["checkpoint.async_save"] == {"given": "auto", "used": False}
    # Sharded checkpoint (a directory with per-rank shards), every 2 steps and at the end.
    assert s["checkpoint"] and os.path.isdir(s["checkpoint"]) and os.listdir(s["checkpoint"])
    assert (run.run_dir / "checkpoints" / "step000002.ckpt").exists()
    # The data position (epoch, global batches trained on) travels in the sharded checkpoint's metadata.
    import torch

    meta = torch.load(run.run_dir / "checkpoints" / "step000002.ckpt" / "meta.pt", weights_only=True)
    assert meta["SpeechDataModule"]["train_sampler"]["consumed"] == 2, meta.keys()


def test_wandb_logs_offline_without_a_key_or_a_server(run):
    reached = [line for line in run.stdout.splitlines() if "wandb server" in line]
    if run.recipe == "salm_tp_fsdp2":
        assert len(reached) == 1 and "cannot be reached" in reached[0] and "wandb sync" in reached[0], reached
    else:
        assert reached == []
    assert list((run.run_dir / "wandb").glob("offline-run-*")), \
        "wandb must log offline without an API key, or when its server cannot be reached"


def test_the_checkpoint_transcribes_in_one_process(run, tiny_corpus, tmp_path):
    """A sharded checkpoint (any layout) transcribes in one process, from the checkpoint alone."""
    from lhotse import CutSet

    audio = tmp_path / "utt.flac"
    CutSet.from_file(tiny_corpus["val"])[0].recording.to_cut().save_audio(audio)
    out = subprocess.run([sys.executable, "-m", "common.tools.transcribe", run.summary["checkpoint"], str(audio)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(f"{audio}\t"), out.stderr[-3000:]
    assert "Warning" not in out.stderr
