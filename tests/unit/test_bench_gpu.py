"""bench.gpu on a CPU: the FLOPs formula, the peak table, and its measuring code on tiny models (no figures kept)."""

import math

import pytest
import torch

from bench import gpu

TINY_QWEN3 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=96, tie_word_embeddings=True)


def test_flops_formula_counts_every_matmul_weight():
    h, L, H, kv, Q, inter, V, S = 64, 2, 4, 2, 16, 96, 40, 32
    model = gpu.build_salm_llm(TINY_QWEN3, vocab_size=V, max_positions=S)
    per_layer = h * H * Q + 2 * h * kv * Q + H * Q * h + 3 * h * inter  # q, k, v, o, gate, up, down
    assert gpu.matmul_params(model) == L * per_layer + V * h  # tied head: one V x h matmul, embedding lookup not
    assert gpu.flops_per_token(1000, L, H, Q, S) == 6 * 1000 + 12 * L * H * Q * S
    assert type(model.model.layers[0]).__name__ == "Qwen3DecoderLayer"  # the SALM recipe's backbone family


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_by_device_name(name, peak):
    assert gpu.peak_bf16_tflops(name) == peak


def test_measure_llm_runs_on_cpu():
    r = gpu.measure_llm("tiny", TINY_QWEN3, batch=2, seq_len=16, compile=False, warmup=1, steps=1, device="cpu",
                        vocab_size=40, peak_tflops=100.0)
    assert r["tokens_per_step"] == 32 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 100.0, abs=1e-4)


def test_measure_speech_runs_on_cpu_in_bf16(tiny_corpus):
    data = [f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16"]
    r = gpu.measure_speech("asr_ddp", "default", data, batch_s=12, warmup=1, steps=2, num_batches=2, num_workers=0,
                           device="cpu")
    assert r["utterances_per_s"] > 0 and r["audio_s_per_s"] > 0 and math.isfinite(r["last_loss_sum"])
    assert r["distinct_batches"] == 2 and r["precision"] == "bf16-true"
    assert gpu.default_gpu_precision() == "bf16-mixed"  # the DDP recipes on a GPU: fp32 weights, bf16 autocast


def test_without_cuda_exits_with_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "r")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # make test-fast leaves it out
def test_measure_recipe_runs_the_real_recipe_on_cpu(tiny_corpus, tmp_path):
    """The GPU bench's end-to-end part is one command away: a real run, its summary's figures."""
    data = [f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16",
            "data.max_duration_s=12"]
    r = gpu.measure_recipe("tiny", "salm_fsdp2", data, steps=6, num_workers=1, out_dir=tmp_path)
    assert r["steps"] == 6 and r["measured_steps"] == 3 and r["device"] == "cpu"
    assert r["step_s"] > 0 and 0 <= r["data_wait_share"] < 1 and r["model_tflops_per_s"] > 0
    assert r["mfu"] is None  # no bf16 peak for a CPU
    assert not list(tmp_path.iterdir())  # its run directory is temporary; no checkpoint was written
    assert r["mean_batch_utterances"] > 0


@pytest.mark.slow  # make test-fast leaves it out
def test_bucket_profile_part_profiles_then_runs_both_batchings_on_cpu(tiny_corpus, tmp_path):
    """Issue 16's GPU check is one command away: profile-batches (the planner here, the GPU there), then a
    run that reads the profile beside one with the single-number batch."""
    data = [f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16"]
    r = gpu.measure_bucket_profile("tiny", "asr_ddp", data, "data.max_duration_s=12", steps=4, measure="planner",
                                   num_workers=1, out_dir=tmp_path)
    assert r["measured_by"] == "planner" and r["buckets"] >= 1 and r["steps"] == 4
    assert r["budget_gb"] == pytest.approx(0.85 * 80, abs=0.01)  # the planner's default 80 GiB GPU
    # An 80 GiB profile holds far more than 12 s of tiny audio per step: the profiled batches are larger.
    assert r["mean_batch_profiled"] > r["mean_batch_single"] > 0 and r["mean_batch_ratio"] > 1
    assert 0 < r["peak_over_budget"] < 1
    md = gpu.to_markdown({"env": {"device": "cpu", "torch": "", "cuda": None, "transformers": "",
                                  "peak_bf16_tflops": None, "date": ""}, "profile": [r]})
    assert "| tiny | 4 |" in md


def test_recipe_goals_judge_the_runs():
    runs = [{"case": "salm_1.7b_long_eager", "step_s": 0.6, "data_wait_share": 0.01, "mfu": 0.31},
            {"case": "salm_1.7b_long_compiled", "step_s": 0.4, "data_wait_share": 0.03, "mfu": 0.39},
            {"case": "asr_109m", "audio_s_per_s": 3500.0, "data_wait_share": 0.0}]
    goals = {g["goal"]: g for g in gpu.recipe_goals(runs)}
    assert goals["data_wait_share"]["value"] == 0.03 and goals["data_wait_share"]["met"] is False
    assert goals["salm_mfu_eager"]["met"] is True and goals["salm_mfu_compiled"]["met"] is False
    assert goals["compile_speedup_long"]["value"] == 1.5 and goals["compile_speedup_long"]["met"] is True
    assert goals["compile_speedup_shipped"]["met"] is None  # not measured: neither met nor missed
    assert goals["asr_109m_speedup"]["value"] == round(3500 / 844, 3) and goals["asr_109m_speedup"]["met"] is True
