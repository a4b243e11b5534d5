"""`make bench`: every recipe and parallel layout measured on this machine, in one run, with ratios.

Usage::

    python -m bench.cpu --out bench/results/<label>          # ~8 minutes on 2 CPU cores
    python -m bench.cpu --out /tmp/b --steps 8 --only asr_ddp  # one recipe, shorter runs

Every figure comes from a real run: recipe runs are ``torchrun`` launches of ``common.train``
exactly as ``make run`` does them (gloo on CPU, one thread per process), read back from their
``summary.json``; the other measurements run the recipes' own code in this process or a child.
Writes ``<out>/cpu.json`` (after every measurement, so an interrupted bench keeps what it has),
``<out>/cpu.md`` (tables, goals met or missed with the reason) and ``<out>/*.png``.

What is measured (after ``RunRecorder``'s 3 warm-up steps):

* per recipe and layout: throughput (utterances/s, audio s/s, LLM tokens/s for SALM), the step
  split into data wait (between steps) and the step itself; for 2-process DDP/FSDP2 layouts the
  communication + synchronization share, estimated as the step minus the 1-process step of the
  same per-rank batch (gloo runs its collectives inside the step; they cannot be timed apart);
  peak RSS per rank; parameter, gradient and optimizer-state bytes per rank.
* ratios against a baseline measured in the same run, each with its goal (``GOALS``).
* bytes read per pass of a served corpus by 4 data-parallel ranks (``bench.data_reads``).
* the training stall per checkpoint save, synchronous and asynchronous (``checkpoint.async_save``),
  at a size where a synchronous save takes seconds: ``salm_fsdp2`` over 2 processes with a
  ~300 M-parameter LLM (:data:`CHECKPOINT_SHAPE`), saves every 2 steps; per save its stall and
  background write time from ``summary.json`` ``checkpoint_saves``.

Data-parallel layouts keep the per-rank batch fixed (``data.max_duration_s`` is the *global*
batch, so it grows with dp): throughput ratios are weak scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint.files import LAST_LINK
from common.rundir import CHECKPOINTS_DIR, SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
PER_RANK_BATCH_S = 30  # audio seconds per data-parallel rank and step
CORPUS = ["data.generated.num_val=16"]  # the recipes' default generated training corpus (2000 utterances)

# name: (recipe, processes, data_parallel_size, tensor_parallel_size)
LAYOUTS = {
    "asr_ddp/1": ("asr_ddp", 1, 1, 1),
    "asr_ddp/2": ("asr_ddp", 2, 2, 1),
    "tts_ddp/1": ("tts_ddp", 1, 1, 1),
    "tts_ddp/2": ("tts_ddp", 2, 2, 1),
    "salm_fsdp2/1": ("salm_fsdp2", 1, 1, 1),
    "salm_fsdp2/2": ("salm_fsdp2", 2, 2, 1),
    "salm_fsdp2/4": ("salm_fsdp2", 4, 4, 1),
    "salm_tp_fsdp2/tp2xdp2": ("salm_tp_fsdp2", 4, 2, 2),
}

# ratio name: (goal, "<=" or ">=", what it compares)
GOALS = {
    "framework_overhead": (1.05, "<=", "recipe training step / bare PyTorch loop (same model, batch, optimizer; 1 process); "
                           "the worst recipe's median of 3 interleaved repeats (each recipe's below)"),
    "fsdp2_memory_dp2": (1.05, "<=", "per-rank training state / (1-process total / 2)"),
    "fsdp2_memory_dp4": (1.05, "<=", "per-rank training state / (1-process total / 4)"),
    "ddp_memory_dp2": (None, "", "per-rank training state / (total / 2): DDP replicates, so 2.0"),
    "tp_fsdp2_memory": (1.10, "<=", "per-rank training state of TP2 x FSDP2 dp2 / (total / 4)"),
    "bucketing_padding_efficiency": (0.95, ">=", "real / padded frames of the recipe's sampler on the generated and a "
                                     "mixed-length corpus, with >= 99.5% of the utterances per pass (random "
                                     "batches and 1-D buckets beside it)"),
    "data_loading_headroom": (3.0, ">=", "loader audio s/s alone / audio s/s one rank's training consumes"),
    "ddp_scaling_2x1": (None, "", "2 processes x 1 thread / 1 process x 1 thread throughput (ideal 2.0)"),
    "checkpoint_stall": (0.15, "<=", "training stall per checkpoint save, checkpoint.async_save=true / false (median "
                         "save of each run; salm_fsdp2 over 2 processes, ~300 M parameters with AdamW)"),
    "data_read_amplification": (1.15, "<=", "audio bytes 4 data-parallel ranks read in one pass of Shar over HTTP "
                                "(2 loader workers each) / the corpus's audio bytes, counted by the server "
                                "(lhotse's streaming Shar reader, as read before, beside it)"),
}


# --- recipe runs ----------------------------------------------------------------------------------
def _torchrun(recipe: str, nproc: int, overrides: list[str], what: str) -> float:
    """``make run``'s launch of ``common.train`` (gloo, one thread per process); its wall seconds."""
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "common.train",
           f"--config-path={ROOT / 'recipes' / recipe}", "--config-name=config", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": ""}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: torchrun exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_layout(name: str, runs_dir: Path, steps: int, data_dir: Path) -> dict:
    recipe, nproc, dp, tp = LAYOUTS[name]
    run_dir = runs_dir / name.replace("/", "_")  # checkpoints and all: kept out of the results directory
    overrides = [
        f"trainer.devices={nproc}", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "logger.wandb=false", f"checkpoint.every_n_steps={10 * steps}",
        f"data.max_duration_s={PER_RANK_BATCH_S * dp}", f"data.dir={data_dir}", *CORPUS,
        f"run.output_dir={run_dir}", "run.resume=false",
    ]
    if recipe.startswith("salm"):
        overrides += [f"trainer.strategy.data_parallel_size={dp}", f"trainer.strategy.tensor_parallel_size={tp}"]
    wall_s = _torchrun(recipe, nproc, overrides, name)
    s = json.loads((run_dir / SUMMARY_FILE).read_text())
    state = [r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] for r in s["memory"]["per_rank"]]
    return {
        "recipe": recipe, "processes": nproc, "data_parallel_size": dp, "tensor_parallel_size": tp,
        "strategy": s["strategy"], "global_batch_audio_s": PER_RANK_BATCH_S * dp, "steps": s["steps"],
        **s["throughput"], "padding_efficiency": s["data"]["padding_efficiency"],
        "peak_rss_bytes_per_rank": [r["peak_memory_bytes"] for r in s["memory"]["per_rank"]],
        "training_state_bytes_per_rank": state,
        "param_bytes_per_rank": [r["param_bytes"] for r in s["memory"]["per_rank"]],
        "grad_bytes_per_rank": [r["grad_bytes"] for r in s["memory"]["per_rank"]],
        "optimizer_state_bytes_per_rank": [r["optimizer_state_bytes"] for r in s["memory"]["per_rank"]],
        "wall_s": round(wall_s, 1),
    }


# A ~300 M-parameter LLM (24 Qwen3 layers of 1024, MLP 3072; 303 M parameters with the encoder): a
# synchronous save of its sharded state (parameters + AdamW moments, 1.8 GB per rank) takes seconds here.
CHECKPOINT_SHAPE = ["model.llm.hidden_size=1024", "model.llm.num_hidden_layers=24", "model.llm.num_attention_heads=16",
                    "model.llm.num_key_value_heads=8", "model.llm.head_dim=64", "model.llm.intermediate_size=3072"]


def measure_checkpoint_stall(runs_dir: Path, data_dir: Path) -> dict:
    """salm_fsdp2 over 2 processes at :data:`CHECKPOINT_SHAPE`, 7 steps with a save every 2 (steps 2,
    4, 6; none at the end), once with synchronous and once with asynchronous saves: each save's
    stall (the step loop blocked) and write time, each run's wall time, step split and peak RSS."""
    out = {"shape": CHECKPOINT_SHAPE, "recipe": "salm_fsdp2", "processes": 2}
    for mode in ("sync", "async"):
        run_dir = runs_dir / f"checkpoint_{mode}"
        overrides = ["trainer.devices=2", "trainer.strategy.data_parallel_size=2", "trainer.max_steps=7",
                     "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "logger.wandb=false",
                     "checkpoint.every_n_steps=2", "checkpoint.at_end=false", "checkpoint.keep_last=1",
                     f"checkpoint.async_save={mode == 'async'}", "data.max_duration_s=8", f"data.dir={data_dir}",
                     *CORPUS, f"run.output_dir={run_dir}", "run.resume=false", *CHECKPOINT_SHAPE]
        wall_s = _torchrun("salm_fsdp2", 2, overrides, f"checkpoint {mode}")
        s = json.loads((run_dir / SUMMARY_FILE).read_text())
        saves = s["checkpoint_saves"]
        assert [x["mode"] for x in saves] == [mode] * 3, saves
        out[mode] = {"saves": saves, "median_stall_s": statistics.median(x["stall_s"] for x in saves),
                     "wall_s": round(wall_s, 1), "parameters": sum(r["param_bytes"] for r in s["memory"]["per_rank"]) // 4,  # fp32 shards
                     "checkpoint_bytes_per_rank": _dir_bytes(run_dir / CHECKPOINTS_DIR / LAST_LINK) / 2,
                     "step_time_s": s["throughput"]["step_time_s"], "compute_s": s["throughput"]["compute_s"],
                     "peak_rss_bytes_per_rank": [r["peak_memory_bytes"] for r in s["memory"]["per_rank"]]}
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).resolve().rglob("*") if p.is_file())


# --- in-process measurements ---------------------------------------------------------------------
def recipe_config(recipe: str, overrides: list[str]):
    """A recipe's config as a run checks and completes it (common.run.check_run)."""
    from common.run import check_run, compose

    cfg = compose(recipe, overrides)
    check_run(cfg)
    return cfg


def _data(cfg):
    """Sources, tokenizer and a 1-rank datamodule of a recipe config (the recipe's own pipeline)."""
    from common.run import build_run

    run = build_run(cfg, with_model=False)
    return run.sources, run.tokenizer, run.datamodule(one_rank=True)


def measure_overhead(recipe: str, data_dir: Path, warmup: int, steps: int) -> dict:
    """Seconds per step of the recipe's Lightning training step (TrainingModule, its strategy with
    one process, its callbacks) and of a bare PyTorch loop, on the same batch, model and optimizer."""
    import lightning as L

    from common.checkpoint import ExactResume
    from common.models import build_model, spec_of
    from common.module import TrainingModule, build_optimizer
    from common.parallel import build_strategy
    from common.recording import RunRecorder
    from common.step import clip_gradients, training_loss

    # No loader workers: nothing else may run on the cores while the two loops are timed.
    over = [f"data.max_duration_s={PER_RANK_BATCH_S}", f"data.dir={data_dir}", *CORPUS, "trainer.devices=1",
            "data.num_workers=0"]
    if recipe.startswith("salm"):
        over += ["trainer.strategy.data_parallel_size=1", "trainer.strategy.tensor_parallel_size=1"]
    cfg = recipe_config(recipe, over)
    _, tokenizer, data = _data(cfg)
    loader = data.train_dataloader()
    batch = loader.features(next(iter(loader)), training=True)  # features once: both loops get the same batch
    batch.pop("bad_items"), batch.pop("data_position")

    torch.manual_seed(cfg.seed)
    bare = build_model(cfg, tokenizer).train()
    params = [p for p in bare.parameters() if p.requires_grad]
    opt, sched = build_optimizer(params, cfg.optim, max_steps=warmup + steps)  # the recipe's AdamW + schedule
    normalizer = spec_of(cfg).loss_normalizer

    def bare_step():  # the recipe's step (common.step), without Lightning
        loss, _ = training_loss(bare(batch), batch, normalizer, dp=1, model=bare)
        loss.backward()
        clip_gradients(params, cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        bare_step()
    bare_times = []

    class Clock(L.Callback):
        """Recipe steps step to step (the loop's own work between steps counts too), each followed by
        one timed bare step outside that interval: the two alternate, so a machine whose speed
        drifts during the measurement biases neither."""

        times: list = []

        def on_train_batch_end(self, trainer, *args):
            now = time.perf_counter()
            if trainer.global_step > warmup:
                self.times.append(now - self.last)
                t0 = time.perf_counter()
                bare_step()
                bare_times.append(time.perf_counter() - t0)
            self.last = time.perf_counter()

    torch.manual_seed(cfg.seed)
    parallel = dict(cfg.parallel) if cfg.parallel else None
    module = TrainingModule(build_model(cfg, tokenizer), tokenizer, spec_of(cfg), optim=cfg.optim, parallel=parallel)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision,
                            strategy=build_strategy(cfg.trainer.strategy), max_steps=warmup + steps,
                            callbacks=[RunRecorder(Path(tmp), print_every_n_steps=10**9,
                                                   log_every_n_steps=cfg.trainer.log_every_n_steps), ExactResume(), clock],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            use_distributed_sampler=False)
        same_batch = torch.utils.data.DataLoader([batch] * (warmup + steps), batch_size=None)
        trainer.fit(module, train_dataloaders=same_batch)
    # Medians: a step disturbed by something else on the machine does not decide the ratio.
    bare_s, recipe_s = statistics.median(bare_times), statistics.median(clock.times)
    return {"recipe": recipe, "batch_utterances": batch["global_num_utterances"], "steps": steps,
            "bare_step_s": round(bare_s, 4), "recipe_step_s": round(recipe_s, 4),
            "ratio": round(recipe_s / bare_s, 4), "mean_ratio": round(sum(clock.times) / sum(bare_times), 4)}


def measure_loader(recipe: str, data_dir: Path, num_batches: int) -> dict:
    """Audio seconds/s the recipe's train loader delivers alone (its configured workers)."""
    cfg = recipe_config(recipe, [f"data.max_duration_s={PER_RANK_BATCH_S}", f"data.dir={data_dir}", *CORPUS])
    _, _, data = _data(cfg)
    it = iter(data.train_dataloader())
    for _ in range(3):  # worker start-up, first bucket fill
        next(it)
    audio = 0.0
    t0 = time.perf_counter()
    for _ in range(num_batches):
        audio += next(it)["global_audio_s"]
    dt = time.perf_counter() - t0
    return {"recipe": recipe, "num_workers": cfg.data.num_workers, "batches": num_batches,
            "audio_s_per_s": round(audio / dt, 2)}


def _mixed_length(short, seed: int = 0):
    """The generated corpus plus as many long utterances again (9-25 s, the long-utterance workload's
    lengths, ~0.22 s per word of the corpus' own words): metadata only, as padding depends on lengths."""
    import random

    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut, dummy_supervision

    rng = random.Random(seed)
    words = sorted({w for c in short for w in c.supervisions[0].text.split()})
    long = []
    for i in range(len(short)):
        d = round(rng.uniform(9.0, 25.0), 2)
        text = " ".join(rng.choice(words) for _ in range(max(1, round(d / 0.22))))
        long.append(dummy_cut(100000 + i, duration=d, supervisions=[dummy_supervision(100000 + i, duration=d, text=text)]))
    return CutSet.from_cuts(list(short) + long)


def measure_padding(recipe: str, data_dir: Path) -> dict:
    """Padding efficiency (real / padded feature frames, over all batches of a pass) and the share of
    the utterances a pass trains, on the generated corpus and on a mixed-length one: the recipe's
    sampler (2-D buckets, per-bucket batch sizes, carried tails; its second pass, once tails come
    in as others go out) beside plain random batches and 1-D duration buckets (lhotse's, 6 bins, as
    the recipes had them before)."""
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

    from common.data.loading import LoaderConfig, SpeechTextDataset, make_loader

    cfg = recipe_config(recipe, [f"data.max_duration_s={PER_RANK_BATCH_S}", f"data.dir={data_dir}", *CORPUS])
    sources, tokenizer, _ = _data(cfg)
    frames = SpeechTextDataset(tokenizer).num_frames

    def score(batches, n, carried_in=0, carried_out=0):
        """used_share: the pass's own items trained in it or carried to the next (nothing else is lost)."""
        real = sum(frames(c.duration) for b in batches for c in b)
        padded = sum(len(b) * max(frames(c.duration) for c in b) for b in batches)
        trained = sum(len(b) for b in batches)
        return {"efficiency": round(real / padded, 4), "used_share": round((trained - carried_in + carried_out) / n, 4),
                "trained_share": round(trained / n, 4), "batches": len(batches),
                "mean_batch": round(trained / len(batches), 2)}

    out = {"recipe": recipe, "batch_s": PER_RANK_BATCH_S}
    short = CutSet.from_file(sources["train"][0].path).to_eager()
    for name, cuts in (("generated", short), ("mixed", _mixed_length(short))):
        longest = max(c.duration for c in cuts)
        loader = make_loader(cuts, tokenizer,
                             LoaderConfig(max_duration_s=PER_RANK_BATCH_S, shuffle=True, seed=0,
                                          num_buckets=cfg.data.num_buckets,
                                          num_token_buckets=cfg.data.num_token_buckets,
                                          max_utterance_s=longest, check_tokens=False),
                             dp_rank=0, dp_size=1)
        sampler = loader.sampler
        list(sampler)  # pass 0 fills the carry
        sampler.set_epoch(1)
        carried_in = len(sampler.sampler.carried)
        batches = [b.cuts for b in sampler]
        ours = score(batches, len(cuts), carried_in, len(sampler.sampler._carried_next))
        one_d = DynamicBucketingSampler(cuts, max_duration=PER_RANK_BATCH_S, num_buckets=6, shuffle=True, seed=0,
                                        drop_last=False)
        plain = SimpleCutSampler(cuts, max_duration=PER_RANK_BATCH_S, shuffle=True, seed=0)
        out[name] = {"utterances": len(cuts), "buckets": len(sampler.sampler.grid.keys()), "2d_carry": ours,
                     "1d_buckets": score(list(one_d), len(cuts)),
                     "random": score(list(plain), len(cuts))}
    out["bucketed"] = min(out[n]["2d_carry"]["efficiency"] for n in ("generated", "mixed"))
    out["used_share"] = min(out[n]["2d_carry"]["used_share"] for n in ("generated", "mixed"))
    return out


def _child(kind: str, recipe: str, data_dir: Path, **kwargs) -> dict:
    """One in-process measurement in a fresh interpreter (each strategy inits its own process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": "", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29600 + os.getpid() % 300)}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.cpu", "--child", kind, recipe, str(data_dir), f.name, json.dumps(kwargs)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} {recipe} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


OVERHEAD_REPEATS = 3


def median_overhead(repeats: list[dict]) -> dict:
    """The repeat with the median ratio, with every repeat's figures kept (``repeats``)."""
    ordered = sorted(repeats, key=lambda r: r["ratio"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": [{k: v for k, v in r.items() if k != "repeats"}
                                                            for r in repeats]}


def measure_data_reads(recipe: str, data_dir: Path) -> dict:
    """Bytes read per pass from a served corpus (bench.data_reads): Shar by index and a URL cut manifest
    at dp 4 with 0 and 2 workers, and lhotse's streaming Shar reader at dp 4 as the baseline."""
    from .data_reads import corpus_forms, measure

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp, \
            corpus_forms(Path(tmp), num_utterances=2000, data_dir=data_dir, shard_size=200) as forms:
        for kind, workers in (("shar", 0), ("shar", 2), ("cuts", 2), ("shar_stream", 0)):
            rows.append(measure(forms, kind, dp_size=4, num_workers=workers, max_duration_s=PER_RANK_BATCH_S))
    return {"rows": rows}


CHILDREN = {"overhead": measure_overhead, "loader": measure_loader, "padding": measure_padding,
            "data_reads": measure_data_reads}


# --- ratios and report -----------------------------------------------------------------------------
def _max(values):
    return max(values) if values else None


def ratios(report: dict) -> dict:
    """Every ratio of ``GOALS`` that the measured layouts allow, with its goal and verdict."""
    runs, out = report["runs"], {}

    def put(name, value, detail):
        goal, op, what = GOALS[name]
        met = None if goal is None or value is None else (value <= goal if op == "<=" else value >= goal)
        out[name] = {"value": None if value is None else round(value, 4), "goal": f"{op} {goal}" if goal else None,
                     "met": met, "what": what, "detail": detail}

    over = report.get("overhead", {})
    if over:
        worst_recipe = max(over, key=lambda r: over[r]["ratio"])
        worst = over[worst_recipe]

        def figures(v):
            return {"recipe_step_s": v["recipe_step_s"], "bare_step_s": v["bare_step_s"], "ratio": v["ratio"],
                    "repeat_ratios": [r["ratio"] for r in v.get("repeats", [v])]}

        put("framework_overhead", worst["ratio"], {k: figures(v) for k, v in over.items()})
        for recipe, v in sorted(over.items()):  # every recipe's own (median) ratio, not only the worst
            GOALS.setdefault(f"framework_overhead/{recipe}", (GOALS["framework_overhead"][0], "<=",
                                                             f"{recipe}: the median of its interleaved repeats"))
            put(f"framework_overhead/{recipe}", v["ratio"], figures(v))
        out["framework_overhead"]["holds_back"] = (
            f"{worst_recipe}: {1000 * (worst['recipe_step_s'] - worst['bare_step_s']):.1f} ms more per step "
            f"({worst['bare_step_s'] * 1000:.0f} ms bare): Lightning's loop, the strategy's wrapper on one rank, "
            "the per-step metrics row (losses reduced every trainer.log_every_n_steps steps)")
    total = _max(runs.get("salm_fsdp2/1", {}).get("training_state_bytes_per_rank", []))
    for n, name in ((2, "salm_fsdp2/2"), (4, "salm_fsdp2/4")):
        if total and name in runs:
            put(f"fsdp2_memory_dp{n}", _max(runs[name]["training_state_bytes_per_rank"]) / (total / n),
                {"total_bytes": total, "per_rank_bytes": runs[name]["training_state_bytes_per_rank"]})
    if total and "salm_tp_fsdp2/tp2xdp2" in runs:
        per_rank = runs["salm_tp_fsdp2/tp2xdp2"]["training_state_bytes_per_rank"]
        put("tp_fsdp2_memory", _max(per_rank) / (total / 4), {"total_bytes": total, "per_rank_bytes": per_rank})
    if "asr_ddp/1" in runs and "asr_ddp/2" in runs:
        t1 = runs["asr_ddp/1"]["training_state_bytes_per_rank"][0]
        put("ddp_memory_dp2", _max(runs["asr_ddp/2"]["training_state_bytes_per_rank"]) / (t1 / 2), {"total_bytes": t1})
        put("ddp_scaling_2x1", runs["asr_ddp/2"]["audio_s_per_s"] / runs["asr_ddp/1"]["audio_s_per_s"],
            {"1x1_audio_s_per_s": runs["asr_ddp/1"]["audio_s_per_s"],
             "2x1_audio_s_per_s": runs["asr_ddp/2"]["audio_s_per_s"],
             **{f"{r}_2x1": round(runs[f"{r}/2"]["audio_s_per_s"] / runs[f"{r}/1"]["audio_s_per_s"], 3)
                for r in ("tts_ddp", "salm_fsdp2") if f"{r}/1" in runs and f"{r}/2" in runs}})
    pad = report.get("padding", {})
    if pad:
        worst = min(pad.values(), key=lambda r: (r["bucketed"], r["used_share"]))
        put("bucketing_padding_efficiency", worst["bucketed"], pad)
        out["bucketing_padding_efficiency"]["used_share"] = min(r["used_share"] for r in pad.values())
        if min(r["used_share"] for r in pad.values()) < 0.995:
            out["bucketing_padding_efficiency"]["met"] = False
            out["bucketing_padding_efficiency"]["holds_back"] = "a pass trains < 99.5% of the utterances"
    reads = report.get("data_reads", {}).get("all", {}).get("rows", [])
    if reads:
        ours = [r for r in reads if r["source"] == "shar"]
        put("data_read_amplification", max(r["read_amplification"] for r in ours),
            {f"{r['source']}/dp{r['dp_size']}/workers{r['num_workers']}": {
                k: r[k] for k in ("read_amplification", "audio_bytes_read", "corpus_audio_bytes",
                                  "metadata_bytes_per_rank", "audio_s_per_s")} for r in reads})
    ckpt = report.get("checkpoint", {})
    if ckpt.get("sync") and ckpt.get("async"):
        sync, asyn = ckpt["sync"], ckpt["async"]
        put("checkpoint_stall", asyn["median_stall_s"] / sync["median_stall_s"],
            {m: {"stall_s": [x["stall_s"] for x in ckpt[m]["saves"]], "write_s": [x["write_s"] for x in ckpt[m]["saves"]],
                 "wall_s": ckpt[m]["wall_s"], "compute_s": ckpt[m]["compute_s"],
                 "peak_rss_bytes_per_rank": ckpt[m]["peak_rss_bytes_per_rank"]} for m in ("sync", "async")})
        out["checkpoint_stall"]["holds_back"] = (
            f"the first async save ({asyn['saves'][0]['stall_s']} s) allocates and fills the staging copy; later ones reuse it")
    loaders = report.get("loader", {})
    if loaders:
        # One rank's loader reads that rank's shard only: it must keep up with audio_s_per_s / dp.
        need = {r: max(v["audio_s_per_s"] / v["data_parallel_size"] for v in runs.values() if v["recipe"] == r)
                for r in loaders if any(v["recipe"] == r for v in runs.values())}
        if need:
            heads = {r: loaders[r]["audio_s_per_s"] / need[r] for r in need}
            put("data_loading_headroom", min(heads.values()),
                {r: {"loader_audio_s_per_s": loaders[r]["audio_s_per_s"], "consumed_per_rank": round(need[r], 2),
                     "ratio": round(heads[r], 2)} for r in need})
    return out


def communication_estimates(runs: dict) -> None:
    """Adds ``communication_s`` to 2-process DDP/FSDP2 runs: step minus the 1-process step of the same
    per-rank batch (2 processes on >= 2 cores; with more processes than cores the difference is contention)."""
    for run in runs.values():
        base = runs.get(f"{run['recipe']}/1")
        if run["processes"] == 2 and run["tensor_parallel_size"] == 1 and base and run.get("compute_s"):
            run["communication_s"] = round(max(0.0, run["compute_s"] - base["compute_s"]), 4)


def _gib(b) -> str:
    return f"{b / 2**20:.2f} MiB"


def to_markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"Machine: {env['machine']} ({env.get('cpu_model', '?')}), {env['cpus']} CPU cores, "
             f"{env.get('memory_gib', '?')} GiB, torch {env['torch']}, {env['date']}; "
             f"gloo, 1 thread per process, {PER_RANK_BATCH_S} s of audio per data-parallel rank and step.", "",
             "| layout | procs | dp x tp | utt/s | audio s/s | tokens/s | step s | data wait s | compute s "
             "| comm s (est.) | state/rank | peak RSS/rank | padding eff. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['processes']} | {r['data_parallel_size']} x {r['tensor_parallel_size']} "
            f"| {r['utterances_per_s']} | {r['audio_s_per_s']} | {r.get('tokens_per_s') or '-'} | {r['step_time_s']} "
            f"| {r.get('data_wait_s')} | {r.get('compute_s')} | {r.get('communication_s', '-')} "
            f"| {_gib(_max(r['training_state_bytes_per_rank']))} | {_gib(_max(r['peak_rss_bytes_per_rank']))} "
            f"| {r['padding_efficiency']} |")
    lines += ["", "| ratio | measured | goal | met | what |", "|---|---|---|---|---|"]
    for name, r in report.get("ratios", {}).items():
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {name} | {r['value']} | {r['goal'] or 'report'} | {met} | {r['what']} |")
    missed = [(n, r) for n, r in report.get("ratios", {}).items() if r["met"] is False]
    if missed:
        lines += ["", "Goals missed:"]
        lines += [f"* **{n}** = {r['value']} (goal {r['goal']}): {r.get('holds_back') or 'see cpu.json'}"
                  for n, r in missed]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    wait = [runs[n].get("data_wait_s") or 0 for n in names]
    comm = [runs[n].get("communication_s") or 0 for n in names]
    compute = [max(0.0, (runs[n].get("compute_s") or 0) - c) for n, c in zip(names, comm)]
    axes[0].barh(names, compute, label="compute")
    axes[0].barh(names, comm, left=compute, label="communication (est.)")
    axes[0].barh(names, wait, left=[a + b for a, b in zip(compute, comm)], label="data wait")
    axes[0].set_xlabel("seconds per step")
    axes[0].invert_yaxis()
    axes[0].legend()
    axes[0].set_title("Step time split")
    state = [_max(runs[n]["training_state_bytes_per_rank"]) / 2**20 for n in names]
    axes[1].barh(names, state, color="tab:purple")
    axes[1].set_xlabel("MiB per rank (parameters + gradients + optimizer state)")
    axes[1].invert_yaxis()
    axes[1].set_title("Training state per rank")
    fig.tight_layout()
    fig.savefig(out / "cpu_layouts.png", dpi=110)
    plt.close(fig)

    rat = {k: v for k, v in report.get("ratios", {}).items() if v["value"] is not None}
    if rat:
        fig, ax = plt.subplots(figsize=(9, 4))
        colors = ["tab:green" if v["met"] else "tab:red" if v["met"] is False else "tab:gray" for v in rat.values()]
        ax.barh(list(rat), [v["value"] for v in rat.values()], color=colors)
        for i, v in enumerate(rat.values()):
            if v["goal"]:
                ax.plot([float(v["goal"].split()[1])] * 2, [i - 0.4, i + 0.4], "k--")
        ax.invert_yaxis()
        ax.set_title("Ratios (dashed: goal; green met, red missed, grey reported)")
        fig.tight_layout()
        fig.savefig(out / "cpu_ratios.png", dpi=110)
        plt.close(fig)


def save(report: dict, out: Path) -> None:
    communication_estimates(report["runs"])
    report["ratios"] = ratios(report)
    (out / "cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "cpu.md").write_text(to_markdown(report))


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="results directory, e.g. bench/results/<label>")
    ap.add_argument("--steps", type=int, default=15, help="training steps per recipe run (3 are warm-up)")
    ap.add_argument("--only", nargs="*", default=None, help="recipes to measure (default: all)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data", help="generated corpus cache")
    ap.add_argument("--runs-dir", type=Path, default=None, help="where recipe runs write (default: a temporary directory)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, recipe, data_dir, path, kwargs = args.child
        result = CHILDREN[kind](recipe, Path(data_dir), **json.loads(kwargs))
        Path(path).write_text(json.dumps(result))
        return 0
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = args.only or sorted({r for r, *_ in LAYOUTS.values()})
    report = {"env": {"machine": platform.node(), "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
                      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                      "torch": torch.__version__,
                      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                      "per_rank_batch_audio_s": PER_RANK_BATCH_S, "steps": args.steps},
              "runs": {}, "overhead": {}, "loader": {}, "padding": {}, "data_reads": {}}
    t0 = time.perf_counter()
    todo = [("padding", r, {}) for r in recipes] + [("loader", r, {"num_batches": 20}) for r in recipes]
    todo += [("data_reads", "all", {})]
    # The loop overhead moves by several percent between measurements: OVERHEAD_REPEATS of each recipe,
    # interleaved (a, b, c, a, b, c, ...) so that a slow spell of the machine hits every recipe alike.
    todo += [("overhead", r, {"warmup": 3, "steps": 25}) for _ in range(OVERHEAD_REPEATS) for r in recipes
             if r != "salm_tp_fsdp2"]
    for kind, recipe, kwargs in todo:
        print(f"[{time.perf_counter() - t0:6.0f}s] {kind} {recipe}", flush=True)
        result = _child(kind, recipe, args.data_dir, **kwargs)
        if kind == "overhead":
            result = median_overhead([*report[kind].get(recipe, {}).get("repeats", []), result])
        report[kind][recipe] = result
        save(report, args.out)
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        for name, (recipe, *_rest) in LAYOUTS.items():
            if recipe in recipes:
                print(f"[{time.perf_counter() - t0:6.0f}s] run {name}", flush=True)
                report["runs"][name] = run_layout(name, args.runs_dir or Path(tmp), args.steps, args.data_dir)
                save(report, args.out)
        if "salm_fsdp2" in recipes:
            print(f"[{time.perf_counter() - t0:6.0f}s] checkpoint stall, sync and async", flush=True)
            report["checkpoint"] = measure_checkpoint_stall(args.runs_dir or Path(tmp), args.data_dir)
            save(report, args.out)
    report["env"]["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    save(report, args.out)
    plot(report, args.out)
    print((args.out / "cpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
