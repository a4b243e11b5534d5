"""tts_ddp: DDP loss parity with one process, the run contract, synthesis, and the intelligibility check."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_recipe

STEPS = 6


def _overrides(tiny_corpus, nproc, *extra):
    return [f"trainer.devices={nproc}", "logger.wandb=false", "data.max_duration_s=12",
            f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16", *extra]


@pytest.fixture(scope="module")
def parity_runs(tiny_corpus, tmp_path_factory):
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp("tts_parity") / f"ddp{nproc}"
        # The decoder pre-net's dropout is random per process: off, as the parity goal states.
        proc = run_recipe("tts_ddp", nproc, _overrides(tiny_corpus, nproc, f"trainer.max_steps={STEPS}",
                                                       "trainer.limit_val_batches=0",
                                                       "model.speecht5.speech_decoder_prenet_dropout=0.0"), run_dir)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[nproc] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return out


def test_ddp_two_processes_match_one_process(parity_runs):
    one, two = parity_runs[1], parity_runs[2]
    assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), a["step"]
        assert b["train_mel_loss"] == pytest.approx(a["train_mel_loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
    assert abs(one[-1]["train_loss"] - one[0]["train_loss"]) > 1e-3


@pytest.fixture(scope="module")
def asr_checkpoint(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("asr_for_tts") / "asr"
    proc = run_recipe("asr_ddp", 2, _overrides(tiny_corpus, 2, "trainer.max_steps=2", "trainer.limit_val_batches=0"),
                      run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tiny_corpus, asr_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tts_run") / "outputs" / "tts_ddp" / "contract"
    proc = run_recipe("tts_ddp", 2, _overrides(tiny_corpus, 2, "trainer.max_steps=4", "trainer.val_check_interval=4",
                                               f"eval.asr_checkpoint={asr_checkpoint}", "eval.num_sentences=3",
                                               "model.max_frames_per_token=3"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_run_contract_mel_loss_and_intelligibility(trained):
    s = json.loads((trained / "summary.json").read_text())
    assert (s["recipe"], s["status"], s["steps"], s["strategy"]) == ("tts_ddp", "completed", 4, "DDPStrategy")
    assert s["val"]["mel_loss"] > 0 and s["val_first"]["mel_loss"] > s["val"]["mel_loss"]
    assert 0 <= s["val"]["asr_cer"] and s["val"]["asr_num_sentences"] == 3
    validations = [json.loads(x) for x in (trained / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [0, 4]
    assert all(v["val_mel_loss"] > 0 and v["val_stop_loss"] > 0 for v in validations)
    metrics = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_mel_loss"] > 0 and m["train_stop_loss"] > 0 for m in metrics)
    # The components are per-frame means of the global batch, so they are below the total.
    assert all(m["train_mel_loss"] < m["train_loss"] for m in metrics)
    ckpt = torch.load(s["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["run_config"]["model"]["name"] == "tts_speecht5" and ckpt["tokenizer_json"]


def test_make_synthesize_writes_wav_and_png(trained, tmp_path):
    import soundfile as sf

    out = tmp_path / "hello.wav"
    proc = subprocess.run(["make", "-s", "synthesize", "RECIPE=tts_ddp", f"CKPT={trained / 'checkpoints' / 'last.ckpt'}",
                           "TEXT=Alpha, bravo!", f"OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples, rate = sf.read(out)
    assert rate == 16000 and len(samples) > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    empty = subprocess.run([sys.executable, "-m", "common.synthesize", str(trained / "checkpoints" / "last.ckpt"), "?!"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "empty after normalization" in empty.stderr
