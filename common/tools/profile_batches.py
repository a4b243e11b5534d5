"""Per-bucket batch sizes that fill a GPU: the largest batch of each 2-D bucket that fits a memory
fraction, written to a bucket profile that runs read (``data.bucket_profile=<file>``).

Usage (what ``make profile-batches`` runs)::

    make profile-batches RECIPE=asr_ddp ARGS="model=fastconformer_ctc_large data=librispeech"
    python -m common.tools.profile_batches --recipe asr_ddp --out bucket_profiles/asr_ddp.json \\
        [--memory-fraction 0.85] [--measure auto|gpu|planner] [--gpu-memory-gib 80] [hydra overrides ...]
    make run RECIPE=asr_ddp ARGS="... data.bucket_profile=bucket_profiles/asr_ddp.json"

The buckets are the ones a run estimates from its training data (``common.data.buckets``). For each,
the batch is searched (doubling, then bisection) at the bucket's largest shapes: every utterance as
long as the bucket's upper duration edge, with as many target tokens as its upper token edge.

* ``--measure gpu`` (``auto`` on a machine with CUDA): real forward + backward + AdamW steps of the
  recipe's model on one GPU, peak memory from ``torch.cuda.max_memory_allocated``; an out-of-memory
  error counts as "does not fit". One GPU holds the whole model, so for FSDP2 recipes the figure is
  an upper bound (sharding only lowers it).
* ``--measure planner`` (``auto`` on CPU): the same search against ``common.tools.plan``'s memory model
  (parameters, gradients, optimizer state, activations, FSDP2 buffers) for the recipe's layout.

Batch sizes are *per GPU*: a run's global batch for a bucket is that number x its world size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common.errors import ConfigError

GIB = 1024**3


def search_largest(fits, limit: int = 1 << 16) -> int:
    """The largest ``b`` in [1, limit] with ``fits(b)`` (``fits`` monotone); 0 if even 1 does not fit."""
    if not fits(1):
        return 0
    lo = 1
    while lo * 2 <= limit and fits(lo * 2):
        lo *= 2
    hi = min(lo * 2, limit + 1)  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PlannerMemory:
    """Per-GPU bytes of one training step of ``batch`` utterances at (duration, tokens), from the
    planner (:func:`common.tools.plan.layout_bytes`, the numbers ``make plan`` prints)."""

    def __init__(self, cfg, model, precision: str):
        from common.parallel import resolve_layout
        from common.tools.plan import byte_widths

        self.cfg, self.model = cfg, model
        layout = resolve_layout(cfg.trainer)
        self.strategy = layout.strategy  # "ddp" | "model_parallel", as common.tools.plan names them
        self.dp, self.tp = layout.data_parallel_size, layout.tensor_parallel_size
        self.widths = byte_widths(cfg, precision)

    def __call__(self, batch: int, duration_s: float, tokens: int) -> int:
        from common.tools.plan import layout_bytes

        cfg = self.cfg.copy()
        cfg.data.max_duration_s_per_gpu = None
        cfg.data.max_tokens_per_gpu = None
        cfg.data.max_tokens = None
        cfg.data.max_duration_s = batch * duration_s * self.dp * self.tp  # the global batch of this bucket
        cfg.data.max_utterance_s = duration_s
        return layout_bytes(cfg, self.model, self.strategy, self.dp, self.tp, self.widths)["total_bytes"]


class GPUMemory:
    """Peak CUDA bytes of real training steps (forward, backward, AdamW) at the bucket's largest shapes."""

    def __init__(self, cfg, tokenizer, device: str = "cuda"):
        import torch

        from common.run import build_run

        self.torch, self.cfg, self.device = torch, cfg, device
        self.model = build_run(cfg, tokenizer=tokenizer).model.to(device).train()
        self.vocab = tokenizer.vocab_size
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-6)
        self.low_id = 5  # past the special tokens of every tokenizer here

    def __call__(self, batch: int, duration_s: float, tokens: int) -> int:
        torch = self.torch
        frames = math.ceil(duration_s * 100)
        mels = self.cfg.data.num_mel_bins
        data = {"input_features": torch.randn(batch, frames, mels, device=self.device),
                "feature_mask": torch.ones(batch, frames, dtype=torch.bool, device=self.device),
                "target_ids": torch.randint(self.low_id, self.vocab, (batch, max(1, tokens)), device=self.device),
                "target_lens": torch.full((batch,), max(1, tokens), device=self.device)}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for _ in range(2):  # the second step holds AdamW's state too
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss_sum = self.model(data).loss_sum
                loss_sum.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return 1 << 62


def profile(recipe: str, overrides=(), memory_fraction: float = 0.85, measure: str = "auto",
            gpu_memory_gib: float | None = None) -> dict:
    import torch

    from common.data.buckets import PROFILE_FORMAT, BucketGrid, BudgetBatchSize
    from common.data.sources import open_sources
    from common.run import build_run, compose
    from common.tools.plan import build_meta_model

    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"--memory-fraction must be in (0, 1], got {memory_fraction}")
    if measure == "auto":
        measure = "gpu" if torch.cuda.is_available() else "planner"
    if measure not in ("gpu", "planner"):
        raise ConfigError(f"--measure must be auto, gpu or planner, got {measure!r}")
    cfg = compose(recipe, list(overrides))
    run = build_run(cfg, with_model=False)
    sources, tokenizer = run.sources, run.tokenizer
    lengths = []
    for cut in open_sources(sources["train"], seed=cfg.seed, mix=False):
        lengths.append((cut.duration, len(tokenizer.encode(cut.supervisions[0].text or ""))))
        if len(lengths) >= cfg.data.bucket_buffer_size:
            break
    longest = float(cfg.data.get("max_utterance_s") or max(d for d, _ in lengths))
    grid = BucketGrid.estimate(lengths, cfg.data.num_buckets, cfg.data.num_token_buckets,
                               batch_size=BudgetBatchSize(max_duration_s=float(cfg.data.max_duration_s)),
                               max_duration_s=longest, min_batches_per_bucket=0)  # sizes come from memory
    if measure == "gpu":
        capacity = torch.cuda.get_device_properties(0).total_memory
        memory = GPUMemory(cfg, tokenizer)
        device = torch.cuda.get_device_name(0)
    else:
        from common.parallel.layout import gpu_precision

        capacity = int((gpu_memory_gib or 80.0) * GIB)
        model, _ = build_meta_model(cfg.copy())
        memory = PlannerMemory(cfg, model, gpu_precision(cfg.trainer.strategy.get("_target_")))
        device = f"planner ({gpu_memory_gib or 80.0:g} GiB GPU)"
    limit = memory_fraction * capacity
    sizes, buckets = [], []
    for d_edge, row in zip(grid.duration_edges, grid.token_edges):
        sizes.append([])
        for t_edge in row:
            b = search_largest(lambda n, d=d_edge, t=t_edge: memory(n, d, t) <= limit)
            if b == 0:
                raise ConfigError(f"bucket ({d_edge:.2f} s, {t_edge} tokens): not even one utterance per GPU fits "
                                  f"{memory_fraction:.0%} of {capacity / GIB:.1f} GiB ({measure}); lower "
                                  "data.max_utterance_s or use more GPUs per model (tensor parallel / FSDP2)")
            sizes[-1].append(b)
            buckets.append({"max_duration_s": d_edge, "max_tokens": t_edge, "batch_size_per_gpu": b,
                            "bytes": int(memory(b, d_edge, t_edge))})
    profiled = BucketGrid(grid.duration_edges, grid.token_edges, sizes)
    return {"format": PROFILE_FORMAT, "recipe": recipe, "overrides": list(overrides), "measured_by": measure,
            "device": device, "capacity_bytes": int(capacity), "memory_fraction": memory_fraction,
            "grid": profiled.state_dict(), "buckets": buckets}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.tools.profile_batches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the bucket profile to write (JSON)")
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--measure", default="auto", help="auto (gpu if CUDA, else planner), gpu or planner")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="planner: GPU memory (default 80)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        result = profile(args.recipe, args.overrides, args.memory_fraction, args.measure, args.gpu_memory_gib)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".partial-{args.out.name}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"{args.recipe}: {len(result['buckets'])} buckets measured by {result['device']}, "
          f"{args.memory_fraction:.0%} of {result['capacity_bytes'] / GIB:.1f} GiB per GPU -> {args.out}")
    for b in result["buckets"]:
        print(f"  <= {b['max_duration_s']:7.2f} s, <= {b['max_tokens']:4d} tokens: {b['batch_size_per_gpu']:5d} "
              f"per GPU ({b['bytes'] / GIB:.2f} GiB)")
    print(f"train with: data.bucket_profile={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
