"""tts_ddp: DDP loss parity with one process (both models), the run contract, synthesis, and the intelligibility check."""

import ast
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, assert_ddp_parity, ddp_parity_metrics, jsonl_rows, run_recipe, tiny_overrides

STEPS = 6


def test_ddp_two_processes_match_one_process(tiny_corpus, tmp_path):
    # The default model: alignment search, durations and decoder all see the same global batch.
    runs = ddp_parity_metrics("tts_ddp", tiny_corpus, tmp_path, STEPS)
    assert_ddp_parity(runs, STEPS, ("train_loss", "train_mel_loss", "train_duration_loss"))


def test_ddp_two_processes_match_one_process_speecht5(tiny_corpus, tmp_path):
    # The decoder pre-net's dropout is random per process: off, as the parity goal states.
    runs = ddp_parity_metrics("tts_ddp", tiny_corpus, tmp_path, STEPS, "model=speecht5_tiny",
                              "model.speecht5.speech_decoder_prenet_dropout=0.0", "data.token_alignment=true")
    assert_ddp_parity(runs, STEPS, ("train_loss", "train_mel_loss"))


@pytest.fixture(scope="module")
def asr_checkpoint(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("asr_for_tts") / "asr"
    proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=2", "trainer.limit_val_batches=0"),
                      run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tiny_corpus, asr_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tts_run") / "outputs" / "tts_ddp" / "contract"
    proc = run_recipe("tts_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=4", "trainer.val_check_interval=4",
                                               f"eval.asr_checkpoint={asr_checkpoint}", "eval.num_sentences=3",
                                               "model.max_frames_per_token=3"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "launch.log").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_run_contract_mel_loss_and_intelligibility(trained):
    s = json.loads((trained / "summary.json").read_text())
    assert (s["recipe"], s["status"], s["steps"], s["strategy"]) == ("tts_ddp", "completed", 4, "DDPStrategy")
    assert s["val"]["mel_loss"] > 0 and s["val_first"]["mel_loss"] > s["val"]["mel_loss"]
    # The closing lines suggest what takes a TTS checkpoint, not the recognizer's tool, which refuses it.
    log = (trained.parent / "launch.log").read_text()
    assert f"synthesize: python -m common.tools.synthesize {s['checkpoint']}" in log and "transcribe: python" not in log
    # The recognizer scored every sentence: each one's (reference, hypothesis) is logged, and the
    # reported CER is the CER of exactly those pairs.
    from torchmetrics.functional.text import char_error_rate

    lines = [line.split("intelligibility: ", 1)[1] for line in (trained.parent / "launch.log").read_text().splitlines()
             if "intelligibility: " in line]
    last = max(i for i, line in enumerate(lines) if line.startswith("synthesizing "))  # the final validation
    pairs = [line.split(" -> ") for line in lines[last + 1 : last + 1 + s["val"]["asr_num_sentences"]]]
    refs, hyps = zip(*[(ast.literal_eval(r), ast.literal_eval(h)) for r, h in pairs])
    assert len(refs) == s["val"]["asr_num_sentences"] == 3 and all(refs)
    assert s["val"]["asr_cer"] == pytest.approx(float(char_error_rate(list(hyps), list(refs))), abs=1e-6)
    # Whether each synthesized sentence ended on its own is counted (check_run fails on either).
    assert s["val"]["synthesis_hit_frame_limit"] in range(4) and s["val"]["synthesis_too_short"] == 0
    validations = jsonl_rows(trained / "validation.jsonl")
    assert [v["step"] for v in validations] == [0, 4]
    assert all(v["val_mel_loss"] > 0 and v["val_duration_loss"] > 0 for v in validations)
    metrics = jsonl_rows(trained / "metrics.jsonl")
    assert all(m["train_mel_loss"] > 0 and m["train_duration_loss"] > 0 for m in metrics)
    # The components are per-frame means of the global batch, so they are below the total.
    assert all(m["train_mel_loss"] < m["train_loss"] for m in metrics)
    ckpt = torch.load(s["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["run_config"]["model"]["name"] == "tts_fastspeech" and ckpt["tokenizer_json"]


def test_make_synthesize_writes_wav_and_png(trained, tiny_corpus, tmp_path):
    import struct

    import soundfile as sf
    from lhotse import CutSet

    out = tmp_path / "hello.wav"
    proc = subprocess.run(["make", "-s", "synthesize", "RECIPE=tts_ddp", f"CKPT={trained / 'checkpoints' / 'last.ckpt'}",
                           "TEXT=Alpha, bravo!", f"OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples, rate = sf.read(out)
    assert rate == 16000 and len(samples) > 0
    png = out.with_suffix(".png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # REF=<recording>: its log-mel above the synthesized one (twice as tall: two panels).
    recording = CutSet.from_file(tiny_corpus["val"])[0].recording.sources[0].source
    ref_out = tmp_path / "with_ref.wav"
    proc = subprocess.run(["make", "-s", "synthesize", "RECIPE=tts_ddp", f"CKPT={trained / 'checkpoints' / 'last.ckpt'}",
                           "TEXT=alpha", f"OUT={ref_out}", f"REF={recording}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    height = struct.unpack(">I", ref_out.with_suffix(".png").read_bytes()[20:24])[0]
    assert height == 2 * struct.unpack(">I", png[20:24])[0]
    bad_ref = subprocess.run([sys.executable, "-m", "common.tools.synthesize", str(trained / "checkpoints" / "last.ckpt"),
                              "alpha", "--out", str(tmp_path / "y.wav"), "--reference", str(trained / "summary.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad_ref.returncode == 2 and "summary.json: not a readable audio file" in bad_ref.stderr
    empty = subprocess.run([sys.executable, "-m", "common.tools.synthesize", str(trained / "checkpoints" / "last.ckpt"), "?!"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "empty after normalization" in empty.stderr
    # words the model has no tokens for: said, not silently dropped; --strict (STRICT=1) refuses them
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    warned = subprocess.run([sys.executable, "-m", "common.tools.synthesize", ckpt, "alpha qzx €", "--out",
                             str(tmp_path / "w.wav")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert warned.returncode == 0 and (tmp_path / "w.wav").exists(), warned.stderr[-2000:]
    assert "warning: the model cannot say 'qzx' (no token for" in warned.stderr and "(dropped: '€')" in warned.stderr
    strict = subprocess.run(["make", "-s", "synthesize", "RECIPE=tts_ddp", f"CKPT={ckpt}", "TEXT=alpha qzx",
                             f"OUT={tmp_path / 's.wav'}", "STRICT=1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode != 0 and "error: TEXT has what the model cannot say: 'qzx'" in strict.stderr
    assert not (tmp_path / "s.wav").exists()


def test_wrong_kind_of_checkpoint_is_named_not_a_traceback(trained, asr_checkpoint, tiny_corpus, tmp_path):
    """A TTS checkpoint given to transcribe, an ASR one to synthesize, a run directory instead of a
    checkpoint, and an ASR checkpoint as run.resume_from of a TTS run: one-line errors, not tracebacks."""
    tts_ckpt = trained / "checkpoints" / "last.ckpt"
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(wav, [0.0] * 16000, 16000)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    to_asr = cli("common.tools.transcribe", tts_ckpt, wav)
    assert to_asr.returncode == 2 and "is a 'tts_fastspeech' model (recipe 'tts_ddp'), which does not transcribe" \
        in to_asr.stderr, to_asr.stderr[-2000:]
    to_tts = cli("common.tools.synthesize", asr_checkpoint, "alpha", "--out", tmp_path / "x.wav")
    assert to_tts.returncode == 2 and "is a 'asr_ctc' model" in to_tts.stderr and "does not synthesize" in to_tts.stderr
    not_wav = cli("common.tools.synthesize", tts_ckpt, "alpha", "--out", trained / "summary.json")
    assert not_wav.returncode == 2 and "must name a .wav file" in not_wav.stderr
    run_dir = cli("common.tools.export", trained, tmp_path / "exp")
    assert run_dir.returncode == 2 and "is a run directory, not a checkpoint" in run_dir.stderr
    assert all("Traceback" not in p.stderr for p in (to_asr, to_tts, not_wav, run_dir))

    resumed = run_recipe("tts_ddp", 1, tiny_overrides(tiny_corpus, 1, f"run.resume_from={asr_checkpoint}"),
                         tmp_path / "wrong_resume", timeout=180)
    assert resumed.returncode != 0  # torchrun exits 1 when a rank exits 2
    assert "is a 'asr_ctc' checkpoint (recipe 'asr_ddp'); this run trains 'tts_fastspeech'" in resumed.stderr
    assert not (tmp_path / "wrong_resume").exists()  # a launch that failed its checks leaves nothing behind


def test_resume_is_exact(tiny_corpus, tmp_path):
    """Stopped after step 3 and started again: steps 4..6 repeat the uninterrupted run (alignment
    search, durations and the carried sampler state, whose cuts hold word alignments, included)."""
    import shutil

    args = ("trainer.max_steps=6", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=3", "data.max_duration_s=8")
    full_dir, run_dir = tmp_path / "full", tmp_path / "attempt"
    full = run_recipe("tts_ddp", 2, tiny_overrides(tiny_corpus, 2, *args), full_dir)
    assert full.returncode == 0, full.stderr[-4000:]
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full_dir / "checkpoints" / "step000003.ckpt", run_dir / "checkpoints")
    rows = (full_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows[:3]))
    again = run_recipe("tts_ddp", 2, tiny_overrides(tiny_corpus, 2, *args), run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("step000003.ckpt")
    expected = [json.loads(r) for r in rows]
    got = jsonl_rows(run_dir / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in expected] == list(range(1, 7))
    for x, y in zip(expected, got):
        assert y["batch"] == x["batch"]
        for key in ("train_loss", "train_duration_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), (key, x["step"])
