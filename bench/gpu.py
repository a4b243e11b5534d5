"""GPU benchmark: model FLOPs utilization of the SALM LLM backbone, and ASR / TTS training throughput.

Usage (on a machine with a CUDA GPU, from the repository root)::

    python -m bench.gpu --out bench/results/h100-80gb          # everything, a few minutes on an H100
    python -m bench.gpu --out /tmp/b --only llm --llm-sizes qwen3-0.6b --no-compile

Writes ``<out>/gpu.json`` (every figure, plus device name, torch and CUDA versions) and
``<out>/gpu.md`` (the same as Markdown tables). Without CUDA it prints why and exits with status 2.

(a) LLM backbone MFU. The Qwen3 backbone is built by the SALM recipe's own code
(``common.models.salm.build_llm`` with ``common/conf/model/salm_tiny.yaml``'s ``llm`` block), at the
published Qwen3-0.6B / Qwen3-1.7B shapes (random init, no download), in pure bf16 (parameters,
activations and gradients in bf16, as ``precision: bf16-true`` gives; the loss in fp32). One measured step
is forward + backward of a causal-LM cross-entropy on random tokens (no optimizer step), timed
after warm-up, with and without ``torch.compile`` of every decoder block (what
``parallel.compile: true`` does in the recipes).

Model FLOPs per token, the formula of the PaLM paper (appendix B), also used by torchtitan::

    flops_per_token = 6 * N + 12 * L * H * Q * S

* ``N``: parameters of every matrix multiply (all ``nn.Linear`` weights incl. the LM head; the
  input-embedding lookup and the norms are not matrix multiplies). ``6 N``: 2 N forward, 4 N backward.
* ``12 L H Q S``: attention scores and weighted values (``L`` layers, ``H`` query heads, head
  dimension ``Q``, sequence length ``S``), forward + backward, counted over the full ``S x S``
  matrix as PaLM does (a causal kernel skips about half of it; that saving is not credited).

``MFU = flops_per_token * tokens / step_time / peak``, with the dense bf16 peak of the device
without sparsity: 989.4 TFLOP/s for an H100 SXM (and H200), 756 for H100 PCIe (``--peak-tflops``
overrides). Results are labelled with ``torch.cuda.get_device_name()``.

(b) ASR and TTS training throughput. The ``asr_ddp`` and ``tts_ddp`` models are built from their
recipe configs exactly as ``common.train`` builds them (default size, and a larger documented
size), with the recipe's own data pipeline (``SpeechDataModule``: lhotse, log-mel, bucketing) on
the generated corpus. A number of global batches is computed first and kept on the GPU, so the
figures are the model's training-step throughput (forward, backward, gradient clipping, AdamW),
not the data loader's: utterances/s and audio seconds/s. Precision through Lightning's own plugins:
by default what ``precision: auto`` gives on a GPU (bf16-true), ``--speech-precision`` for others.

(c) The recipes end to end (``RECIPE_CASES``): one ``common.train`` process each, figures from its
``summary.json``. (d) Bucket profiles (``PROFILE_CASES``): ``common.tools.profile_batches`` on the GPU, then
a run with the profile and one with the single-number batch: peak memory against the profile's
budget, mean batch of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from common.flops import PEAK_BF16_TFLOPS  # noqa: E402 - dense bf16 peaks by device name (one table)
from common.rundir import METRICS_FILE, SUMMARY_FILE  # noqa: E402

# Published Qwen3 shapes (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B); weights are random.
LLM_SIZES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, tie_word_embeddings=True),
}
QWEN3_VOCAB = 151936

# Recipe model sizes: "default" is the recipe's config; "large" the size its README documents.
# Each is measured at the recipes' default global batch (30 s of audio) and at a GPU-sized one.
SPEECH_CASES = (("asr_ddp", "default", 30.0), ("asr_ddp", "large", 240.0),
                ("tts_ddp", "default", 30.0), ("tts_ddp", "large", 240.0))
SPEECH_SIZES = {
    ("asr_ddp", "default"): [],
    ("asr_ddp", "large"): ["model.encoder.hidden_size=512", "model.encoder.num_hidden_layers=17",
                           "model.encoder.num_attention_heads=8", "model.encoder.intermediate_size=2048",
                           "model.encoder.subsampling_factor=8", "model.encoder.subsampling_conv_channels=256",
                           "data.num_mel_bins=80"],
    ("tts_ddp", "default"): [],
    ("tts_ddp", "large"): ["model.fastspeech.hidden_size=384", "model.fastspeech.encoder_layers=4",
                           "model.fastspeech.decoder_layers=4", "model.fastspeech.encoder_linear_units=1536",
                           "model.fastspeech.decoder_linear_units=1536", "model.fastspeech.decoder_kernel_size=31",
                           "model.fastspeech.use_macaron_style_in_conformer=true",
                           "model.fastspeech.duration_predictor_channels=256",
                           "model.fastspeech.speech_decoder_postnet_layers=5",
                           "model.fastspeech.speech_decoder_postnet_units=256", "data.num_mel_bins=80"],
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak for a device name (first match in common.flops.PEAK_BF16_TFLOPS), None if unknown."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_params(model: torch.nn.Module) -> int:
    """N of the formula: weights of every nn.Linear (a tied LM head counts once, as the matmul it is)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(n_matmul: int, layers: int, heads: int, head_dim: int, seq_len: int) -> int:
    """Training (forward + backward) model FLOPs per token: 6 N + 12 L H Q S (PaLM, appendix B)."""
    return 6 * n_matmul + 12 * layers * heads * head_dim * seq_len


def build_salm_llm(size: dict, vocab_size: int, max_positions: int):
    """The SALM recipe's backbone (its own builder and config block), resized."""
    from omegaconf import OmegaConf

    from common.models.salm import build_llm

    model_cfg = OmegaConf.load(ROOT / "common" / "conf" / "model" / "salm_tiny.yaml")
    llm = OmegaConf.merge(model_cfg.llm, size, {"max_position_embeddings": max_positions, "initializer_range": 0.02})
    return build_llm(OmegaConf.create({"llm": llm, "pretrained_llm": None, "lora": None}), vocab_size)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_llm(size_name: str, size: dict, *, batch: int, seq_len: int, compile: bool, warmup: int, steps: int,
                device="cuda", vocab_size: int = QWEN3_VOCAB, peak_tflops: float | None = None) -> dict:
    """Forward + backward of the bf16 backbone; tokens/s, TFLOP/s and MFU after ``warmup`` steps."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    with torch.device(device):
        model = build_salm_llm(size, vocab_size, seq_len)
    model.to(torch.bfloat16).train()
    cfg = model.config
    if compile:
        for layer in model.get_decoder().layers:
            layer.compile()
    n_matmul = matmul_params(model)
    fpt = flops_per_token(n_matmul, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, seq_len)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq_len + 1), device=device, generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    tokens = batch * seq_len
    tflops = fpt * tokens / step_s / 1e12
    result = {
        "model": size_name, "compile": compile, "batch": batch, "seq_len": seq_len, "tokens_per_step": tokens,
        "params_total": sum(p.numel() for p in model.parameters()), "params_matmul": n_matmul,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "flops_per_token": fpt, "step_s": round(step_s, 5), "warmup_s": round(warmup_s, 2),
        "tokens_per_s": round(tokens / step_s, 1), "model_tflops_per_s": round(tflops, 2),
        "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
        "loss": round(float(loss), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if torch.device(device).type == "cuda" else None,
    }
    return result


def recipe_config(recipe: str, overrides: list[str]):
    """A recipe's config composed exactly as ``make run`` composes it."""
    from common.run import compose

    return compose(recipe, overrides)


def precision_plugin(precision: str, device):
    """The Lightning precision plugin a Trainer would use for ``precision`` (bf16-true, bf16-mixed, 32-true)."""
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

    if precision.endswith("-true") and precision != "32-true":
        return HalfPrecision(precision)
    if precision.endswith("-mixed"):
        return MixedPrecision(precision, device=torch.device(device).type)
    return Precision()


def default_gpu_precision() -> str:
    """What ``trainer.precision: auto`` becomes on a GPU for the DDP recipes (common.run.resolve_hardware)."""
    from common.parallel.layout import DDP, gpu_precision

    return gpu_precision(DDP)  # the speech models here are the DDP recipes


def measure_speech(recipe: str, size_name: str, overrides: list[str], *, batch_s: float, warmup: int, steps: int,
                   num_batches: int = 16, num_workers: int = 4, device="cuda", precision: str = "bf16-true") -> dict:
    """Training-step throughput of a recipe model on GPU-resident global batches of its own data pipeline."""
    from common.run import build_run
    from common.step import clip_gradients, training_loss

    cfg = recipe_config(recipe, [*overrides, f"data.max_duration_s={batch_s}", f"data.num_workers={num_workers}"])
    run = build_run(cfg)  # seeded: the same weights as a run of this config
    prec = precision_plugin(precision, device)
    model = prec.convert_module(run.model.to(device)).train()
    data = run.datamodule(one_rank=True)
    batches = []
    for batch in data.train_dataloader():
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) == num_batches:
            break
    normalizer = run.spec.loss_normalizer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, foreach=True)

    features = data.features["train"]  # log-mel + SpecAugment on the GPU, inside the step as in a run

    def step(batch):
        batch = prec.convert_input(features(dict(batch), training=True))
        with prec.forward_context():
            out = model(batch)
            loss, _ = training_loss(out, batch, normalizer, dp=1, model=model)  # the recipe's step (common.step)
        loss.backward()
        clip_gradients(params, cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss_sum.detach()

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    utts = audio = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]
        loss_sum = step(batch)
        utts += batch["global_num_utterances"]
        audio += batch["global_audio_s"]
    _sync(device)
    dt = time.perf_counter() - t0
    return {
        "recipe": recipe, "size": size_name, "precision": precision,
        "params": sum(p.numel() for p in model.parameters()), "batch_audio_s": batch_s,
        "distinct_batches": len(batches), "steps": steps, "step_s": round(dt / steps, 5),
        "utterances_per_s": round(utts / dt, 1), "audio_s_per_s": round(audio / dt, 1),
        "mean_utterances_per_batch": round(utts / steps, 1), "last_loss_sum": round(float(loss_sum), 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if torch.device(device).type == "cuda" else None,
    }


# (c) The recipes themselves, end to end (common.train in one process: loader workers, features on
# the device, Lightning, logging), at real sizes, on a realistic-length workload. The SALM case is
# the issue's: a Qwen3-1.7B-shaped backbone and a 108 M FastConformer (17 x 512, 8x subsampling).
LONG_UTTERANCES = ["data.generated.min_words=40", "data.generated.max_words=100", "data.generated.num_train=3000",
                   "data.max_utterance_s=30"]  # 9-25 s utterances (the shipped corpus: about 1 s)
FASTCONFORMER_108M = ["model.encoder.hidden_size=512", "model.encoder.num_hidden_layers=17",
                      "model.encoder.num_attention_heads=8", "model.encoder.intermediate_size=2048",
                      "model.encoder.subsampling_factor=8", "model.encoder.subsampling_conv_channels=256",
                      "data.num_mel_bins=80"]
QWEN3_1P7B = [f"model.llm.{k}={v}" for k, v in LLM_SIZES["qwen3-1.7b"].items() if k != "tie_word_embeddings"] + [
    "model.llm.max_position_embeddings=8192", "model.llm.initializer_range=0.02", "model.projector.stack_frames=1",
    "model.projector.ctc_compress=false"]  # Canary-Qwen's shape: every 80 ms frame is an LLM position (as measured before)
RECIPE_CASES = {
    # name: (recipe, overrides, global batch)
    "salm_1.7b_long_eager": ("salm_fsdp2", [*QWEN3_1P7B, *FASTCONFORMER_108M, *LONG_UTTERANCES], "data.max_duration_s=600"),
    "salm_1.7b_long_compiled": ("salm_fsdp2", [*QWEN3_1P7B, *FASTCONFORMER_108M, *LONG_UTTERANCES,
                                               "parallel.compile=true"], "data.max_duration_s=600"),
    "salm_1.7b_shipped_eager": ("salm_fsdp2", [*QWEN3_1P7B, *FASTCONFORMER_108M], "data.max_duration_s=600"),
    "salm_1.7b_shipped_compiled": ("salm_fsdp2", [*QWEN3_1P7B, *FASTCONFORMER_108M, "parallel.compile=true"],
                                   "data.max_duration_s=600"),
    "asr_109m": ("asr_ddp", SPEECH_SIZES["asr_ddp", "large"], "data.max_duration_s=480"),
}
# Goals of the GPU speed issue (one H100/H200), checked against these runs by recipe_goals().
ASR_109M_BASELINE_AUDIO_S_PER_S = 844.0  # asr_ddp 109 M, 480 s per step, H200, before features moved to the GPU


def measure_recipe(case: str, recipe: str, overrides: list[str], *, steps: int = 40, num_workers: int = 4,
                   timeout_s: int = 1200, out_dir: Path | None = None) -> dict:
    """One real run of a recipe (``torchrun -m common.train``, one process) and its summary's figures:
    step split (data wait / compute), MFU, memory, tokens/s, audio s/s. Runs on whatever device
    ``trainer.accelerator: auto`` finds (a CPU too, with tiny overrides, as the unit test does)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        run_dir = Path(tmp) / case
        parallel = ["trainer.strategy.data_parallel_size=1", "trainer.strategy.tensor_parallel_size=1"] \
            if recipe.startswith("salm") else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
               "common.train", f"--config-path={ROOT / 'recipes' / recipe}", "--config-name=config",
               "trainer.devices=1", *parallel, f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
               "trainer.num_sanity_val_steps=0", "logger.wandb=false", "checkpoint.at_end=false",
               f"checkpoint.every_n_steps={10**9}", f"data.num_workers={num_workers}", f"run.output_dir={run_dir}",
               *overrides]
        env = {**os.environ, "RUN_NAME": "", "WANDB_MODE": "disabled"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not (run_dir / SUMMARY_FILE).exists():
            raise RuntimeError(f"{case}: exit {proc.returncode}: {proc.stderr[-1500:]}")
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        batches = [json.loads(line)["utterances"] for line in (run_dir / METRICS_FILE).read_text().splitlines()
                   if '"utterances"' in line]
    t = summary["throughput"]
    peak = max((r["peak_memory_bytes"] for r in summary["memory"]["per_rank"]), default=0)
    step, wait = t.get("step_time_s"), t.get("data_wait_s")
    return {
        "case": case, "recipe": recipe, "device": summary["device"].get("name"), "precision": summary["precision"],
        "steps": summary["steps"], "measured_steps": t.get("measured_steps"), "num_workers": num_workers,
        "step_s": step, "data_wait_s": wait, "compute_s": t.get("compute_s"),
        "data_wait_share": round(wait / step, 4) if step and wait is not None else None,
        "mfu": t.get("mfu"), "model_tflops_per_s": t.get("model_tflops_per_s"), "tokens_per_s": t.get("tokens_per_s"),
        "audio_s_per_s": t.get("audio_s_per_s"), "utterances_per_s": t.get("utterances_per_s"),
        "compiled_graphs": summary.get("compile", {}).get("graphs"),
        "peak_memory_gb": round(peak / 2**30, 2), "wall_s": round(time.perf_counter() - t0, 1),
        "padding_efficiency": summary["data"].get("padding_efficiency"),
        "mean_batch_utterances": round(sum(batches) / len(batches), 2) if batches else None,
        "peak_memory_bytes": peak,
    }


def recipe_goals(results: list[dict]) -> list[dict]:
    """The GPU speed goals, each with its measured value and verdict (None: its runs are missing)."""
    by = {r["case"]: r for r in results if "error" not in r}

    def get(case, key):
        return by.get(case, {}).get(key)

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    goals = []

    def put(name, value, op, target, why):
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        goals.append({"goal": name, "value": value, "target": f"{op} {target}", "met": met, "what": why})

    put("data_wait_share", max((r["data_wait_share"] for r in by.values() if r.get("data_wait_share") is not None),
                               default=None), "<=", 0.02, "data wait / step, worst run, 4 loader workers")
    put("salm_mfu_compiled", get("salm_1.7b_long_compiled", "mfu"), ">=", 0.40, "SALM 1.7B + 108 M, long utterances")
    put("salm_mfu_eager", get("salm_1.7b_long_eager", "mfu"), ">=", 0.30, "SALM 1.7B + 108 M, long utterances")
    for corpus in ("long", "shipped"):
        put(f"compile_speedup_{corpus}", ratio(get(f"salm_1.7b_{corpus}_eager", "step_s"),
                                               get(f"salm_1.7b_{corpus}_compiled", "step_s")), ">=", 1.3,
            f"eager / compiled step time, {corpus} corpus")
    put("asr_109m_speedup", ratio(get("asr_109m", "audio_s_per_s"), ASR_109M_BASELINE_AUDIO_S_PER_S), ">=", 4.0,
        f"audio s/s against {ASR_109M_BASELINE_AUDIO_S_PER_S:g} before")
    return goals


# (d) Batch sizes from a bucket profile (issue 16): `make profile-batches` on this GPU, then a run that
# reads the profile beside one with the single-number batch. The profiled run must stay under the memory
# fraction the profile was made for (no OOM), and its mean batch shows what the profile buys.
PROFILE_CASES = {
    # name: (recipe, overrides, the single-number global batch it is compared with)
    "asr_109m_long": ("asr_ddp", [*SPEECH_SIZES["asr_ddp", "large"], *LONG_UTTERANCES, "data.num_buckets=8"],
                      "data.max_duration_s=480"),
    "salm_1.7b_long": ("salm_fsdp2", [*QWEN3_1P7B, *FASTCONFORMER_108M, *LONG_UTTERANCES, "data.num_buckets=8"],
                       "data.max_duration_s=600"),
}


def measure_bucket_profile(case: str, recipe: str, overrides: list[str], single_batch: str, *, steps: int = 500,
                           memory_fraction: float = 0.85, measure: str = "auto", num_workers: int = 4,
                           out_dir: Path) -> dict:
    """Profile ``case``'s buckets (``python -m common.tools.profile_batches``), then run ``steps`` steps with the
    profile and with ``single_batch``. ``peak_over_budget``: the profiled run's peak memory / (memory
    fraction x device memory), the goal <= 1.0 (<= 0.95 leaves a margin; on a CPU the profile comes from
    the planner and the peak is the process's RSS, so the ratio is not a GPU figure)."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    profile_path = out_dir / f"{case}.bucket_profile.json"
    cmd = [sys.executable, "-m", "common.tools.profile_batches", "--recipe", recipe, "--out", str(profile_path),
           "--memory-fraction", str(memory_fraction), "--measure", measure, *overrides, single_batch]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: profile-batches exit {proc.returncode}: {proc.stderr[-1500:]}")
    profile_s = round(time.perf_counter() - t0, 1)
    prof = json.loads(profile_path.read_text())
    budget = prof["memory_fraction"] * prof["capacity_bytes"]
    runs = {}
    for name, extra in (("profiled", [single_batch, f"data.bucket_profile={profile_path}"]), ("single", [single_batch])):
        runs[name] = measure_recipe(f"{case}_{name}", recipe, [*overrides, *extra], steps=steps,
                                    num_workers=num_workers, out_dir=out_dir)
    profiled, single = runs["profiled"], runs["single"]
    return {
        "case": case, "recipe": recipe, "device": profiled["device"], "measured_by": prof["measured_by"],
        "steps": steps, "buckets": len(prof["buckets"]), "profile_s": profile_s,
        "memory_fraction": prof["memory_fraction"], "budget_gb": round(budget / 2**30, 2),
        "peak_gb": profiled["peak_memory_gb"], "peak_over_budget": round(profiled["peak_memory_bytes"] / budget, 4),
        "mean_batch_profiled": profiled["mean_batch_utterances"], "mean_batch_single": single["mean_batch_utterances"],
        "mean_batch_ratio": round(profiled["mean_batch_utterances"] / single["mean_batch_utterances"], 3)
        if profiled["mean_batch_utterances"] and single["mean_batch_utterances"] else None,
        "step_s_profiled": profiled["step_s"], "step_s_single": single["step_s"],
        "audio_s_per_s_profiled": profiled["audio_s_per_s"], "audio_s_per_s_single": single["audio_s_per_s"],
        "peak_gb_single": single["peak_memory_gb"], "profile": str(profile_path),
    }


def to_markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# GPU benchmark: {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, "
             f"peak dense bf16 {env['peak_bf16_tflops']} TFLOP/s, {env['date']}", ""]
    if report.get("llm"):
        lines += ["## SALM LLM backbone (Qwen3 shapes), bf16, forward + backward", "",
                  "| model | params | compile | batch x seq | step (ms) | tokens/s | model TFLOP/s | MFU | peak mem (GB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["llm"]:
            if "error" in r:
                lines.append(f"| {r['model']} | | {r['compile']} | {r['batch']} x {r['seq_len']} | {r['error']} | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['model']} | {r['params_total'] / 1e6:.0f} M | {r['compile']} | {r['batch']} x {r['seq_len']} "
                         f"| {1000 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | {mfu} "
                         f"| {r['peak_memory_gb']} |")
        lines.append("")
    if report.get("speech"):
        lines += ["## ASR / TTS training steps (GPU-resident batches of the recipe pipeline)", "",
                  "| recipe | size | params | precision | batch audio (s) | step (ms) | utterances/s | audio s/s "
                  "| peak mem (GB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["speech"]:
            if "error" in r:
                lines.append(f"| {r['recipe']} | {r['size']} | | {r['precision']} | {r['batch_audio_s']} | {r['error']} "
                             "| | | |")
                continue
            lines.append(f"| {r['recipe']} | {r['size']} | {r['params'] / 1e6:.2f} M | {r['precision']} | {r['batch_audio_s']} "
                         f"| {1000 * r['step_s']:.1f} | {r['utterances_per_s']:,.1f} | {r['audio_s_per_s']:,.1f} "
                         f"| {r['peak_memory_gb']} |")
        lines.append("")
    if report.get("recipes"):
        lines += ["## The recipes end to end (common.train, one GPU)", "",
                  "| case | step (ms) | data wait | MFU | model TFLOP/s | tokens/s | audio s/s | graphs | peak mem (GB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["recipes"]:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['error']} | | | | | | | |")
                continue
            pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            lines.append(f"| {r['case']} | {1000 * (r['step_s'] or 0):.0f} | {pct(r['data_wait_share'])} | {pct(r['mfu'])} "
                         f"| {r['model_tflops_per_s']} | {r['tokens_per_s']} | {r['audio_s_per_s']} "
                         f"| {r['compiled_graphs']} | {r['peak_memory_gb']} |")
        lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} ({g['what']}) | {g['value']} | {g['target']} | {g['met']} |"
                  for g in recipe_goals(report["recipes"])]
        lines.append("")
    if report.get("profile"):
        lines += ["## Bucket profile against the single-number batch (make profile-batches, one GPU)", "",
                  "| case | steps | buckets | budget (GB) | peak (GB) | peak / budget (<= 1) | mean batch: profile "
                  "| single | ratio | audio s/s: profile | single |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["profile"]:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['error']} | | | | | | | | | |")
                continue
            lines.append(f"| {r['case']} | {r['steps']} | {r['buckets']} | {r['budget_gb']} | {r['peak_gb']} "
                         f"| {r['peak_over_budget']} | {r['mean_batch_profiled']} | {r['mean_batch_single']} "
                         f"| {r['mean_batch_ratio']} | {r['audio_s_per_s_profiled']} | {r['audio_s_per_s_single']} |")
        lines.append("")
    return "\n".join(lines)


def _guard(fn, base: dict, **kwargs) -> dict:
    """Run one measurement; an out-of-memory or other failure is recorded, the rest still runs."""
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        print(f"  failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {**base, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--only", choices=["llm", "speech", "recipes", "profile"], action="append",
                        help="run only these parts")
    parser.add_argument("--profile-cases", nargs="+", default=["asr_109m_long"], choices=list(PROFILE_CASES))
    parser.add_argument("--profile-steps", type=int, default=500, help="steps of each run of the profile part")
    parser.add_argument("--memory-fraction", type=float, default=0.85, help="profile part: the fraction to fill")
    parser.add_argument("--recipe-cases", nargs="+", default=list(RECIPE_CASES), choices=list(RECIPE_CASES))
    parser.add_argument("--recipe-steps", type=int, default=40)
    parser.add_argument("--llm-sizes", nargs="+", default=list(LLM_SIZES), choices=list(LLM_SIZES))
    parser.add_argument("--llm-batch", type=int, nargs="+", default=[8, 4], help="batch per size, in order")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--speech-batch-s", type=float, nargs="+",
                        help="global-batch audio seconds for every speech case (default: 30 for the default "
                             "sizes, the recipes' batch; 240 for the large ones)")
    parser.add_argument("--speech-precision", nargs="+",
                        help="Lightning precisions for the speech models (default: what `auto` gives on a GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this device (default: by name)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    parts = args.only or ["llm", "speech", "recipes", "profile"]
    name = torch.cuda.get_device_name(0)
    import transformers

    peak = args.peak_tflops or peak_bf16_tflops(name)
    report = {"env": {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "transformers": transformers.__version__, "peak_bf16_tflops": peak,
                      "date": time.strftime("%Y-%m-%d")}, "llm": [], "speech": [], "recipes": [], "profile": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(part: str, result: dict) -> None:  # after every case: a run cut short keeps what it measured
        print(f"  {json.dumps(result)}", flush=True)
        report[part].append(result)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu.md").write_text(to_markdown(report))

    if "llm" in parts:
        for i, size_name in enumerate(args.llm_sizes):
            batch = args.llm_batch[min(i, len(args.llm_batch) - 1)]
            for compile_ in ([False] if args.no_compile else [False, True]):
                print(f"llm {size_name} batch {batch} x {args.seq_len} compile={compile_}", flush=True)
                base = {"model": size_name, "compile": compile_, "batch": batch, "seq_len": args.seq_len}
                r = _guard(measure_llm, base, size_name=size_name, size=LLM_SIZES[size_name], batch=batch,
                           seq_len=args.seq_len, compile=compile_, warmup=args.warmup, steps=args.steps,
                           peak_tflops=peak)
                save("llm", r)
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
    if "speech" in parts:
        for recipe, size_name, default_batch_s in SPEECH_CASES:
            for batch_s in args.speech_batch_s or [default_batch_s]:
                for precision in args.speech_precision or [default_gpu_precision()]:
                    print(f"{recipe} {size_name} batch {batch_s} s {precision}", flush=True)
                    base = {"recipe": recipe, "size": size_name, "batch_audio_s": batch_s, "precision": precision}
                    r = _guard(measure_speech, base, recipe=recipe, size_name=size_name,
                               overrides=SPEECH_SIZES[recipe, size_name], batch_s=batch_s, warmup=args.warmup,
                               steps=args.steps, precision=precision)
                    save("speech", r)
    if "recipes" in parts:
        for case in args.recipe_cases:
            recipe, overrides, batch = RECIPE_CASES[case]
            print(f"recipe run {case}", flush=True)
            save("recipes", _guard(measure_recipe, {"case": case, "recipe": recipe}, case=case, recipe=recipe,
                                   overrides=[*overrides, batch], steps=args.recipe_steps))
        report["recipe_goals"] = recipe_goals(report["recipes"])
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    if "profile" in parts:
        for case in args.profile_cases:
            recipe, overrides, batch = PROFILE_CASES[case]
            print(f"bucket profile {case}", flush=True)
            save("profile", _guard(measure_bucket_profile, {"case": case, "recipe": recipe}, case=case, recipe=recipe,
                                   overrides=overrides, single_batch=batch, steps=args.profile_steps,
                                   memory_fraction=args.memory_fraction, out_dir=args.out / "bucket_profiles"))
    print(to_markdown(report))
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
