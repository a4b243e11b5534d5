"""Dry run at cluster size: chosen ranks of the full job, each on this CPU with a fake process group.

Usage (what ``make dry-run`` runs)::

    python -m common.tools.dry_run salm_tp_fsdp2 --nodes 16 --gpus-per-node 8 --model canary_qwen_2p5b \\
        [--ranks 0,last] [--slice-s 4] [--steps 1] [--intra-node-gbps 450] [--inter-node-gbps 50] [--storage-gbps 1] \\
        [--json] [hydra overrides ...]

Each chosen rank runs in its own process as rank ``r`` of the ``nodes x gpus_per_node`` job: torch's
fake process group (collectives return at once, moving no data) stands in for the other ranks, so
everything else is real -- the layout checks of every launcher (:func:`common.cluster.check_shape`), the
``(dp, tp)`` device mesh, the model at the preset's real size with its TP/SP plan and FSDP2 units
(``common.parallel.parallelize``, parameters created on the meta device and only this rank's shards
allocated), the rank's share of a real global batch from the run's data pipeline (or a slice of
``--slice-s`` audio seconds per rank, stated in the report), and ``--steps`` AdamW steps with gradient clipping.

It reports per rank: parameter, gradient and optimizer-state bytes against ``make plan``'s prediction,
the largest FSDP2 unit gathered, the plan's activation estimate, and every collective of one step by
mesh dimension (count, bytes, and the time at the stated bandwidths: NVLink inside a node, the network
across nodes; a ring's ``(n-1)/n`` traffic, no overlap with compute assumed). Any error a real job of
that size would hit first (a size that does not divide, a layout that does not fit the nodes, an
unknown preset) ends the dry run with one ``error:`` line, before a GPU is paid for.

Values computed from fake collectives are meaningless (the loss is not reported); sizes are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections import defaultdict

import torch
from torch import nn

from common import cluster
from common.data.tokenizer import SizedVocabulary
from common.errors import ConfigError

GIB = 1024**3
MIB = 1024**2


def parse_ranks(text: str, world: int) -> list[int]:
    """``"0,last"``, ``"5"``, ``"0,7,last"`` -> ranks of a ``world``-rank job."""
    out = []
    for part in text.split(","):
        part = part.strip()
        rank = world - 1 if part == "last" else int(part) if part.isdigit() else None
        if rank is None or not 0 <= rank < world:
            raise ConfigError(f"RANKS: {part!r} is not a rank of this {world}-rank job (0..{world - 1} or 'last')")
        if rank not in out:
            out.append(rank)
    return out


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside create their parameters on the meta device and their buffers for real (a
    rotary embedding's frequencies are computed in ``__init__``; ``to_empty`` would leave them garbage)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class CollectiveCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Every collective dispatched while active (c10d ops of FSDP2, functional ones of DTensor/TP),
    with its process group's name and the bytes it gathers, scatters or reduces."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, int]] = []  # (op, group name, bytes of the full tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            op, group, nbytes = _describe(func, args, kwargs)
            if not op.startswith(("wait", "barrier", "wrap")):  # bookkeeping, not communication
                self.calls.append((op, group, nbytes))
        return func(*args, **kwargs)


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _describe(func, args, kwargs) -> tuple[str, str, int]:
    import torch.distributed as dist

    op = func._schema.name.split("::")[-1].strip("_")
    strings = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
    group = strings[-1] if strings else None  # functional ops: (..., reduce_op, ..., group_name)
    if group is None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.ScriptObject):
                with contextlib.suppress(RuntimeError):
                    group = dist.ProcessGroup.unbox(a).group_name
                    break
    tensors = [a for a in args if isinstance(a, (torch.Tensor, list, tuple))]
    if func.namespace == "_c10d_functional":
        size = _nbytes(tensors[0]) if tensors else 0
        if "all_gather" in op:
            size *= next((a for a in args if isinstance(a, int) and not isinstance(a, bool)), 1)
    else:  # c10d in-place ops: (output(s), input(s), ...): the larger side is the full tensor
        size = max((_nbytes(t) for t in tensors[:2]), default=0)
    return op, str(group), size


def _traffic_factor(op: str, n: int) -> float:
    """Bytes each rank sends per byte of the full tensor (ring algorithms)."""
    if n <= 1:
        return 0.0
    if "all_reduce" in op or "allreduce" in op:
        return 2 * (n - 1) / n
    if "broadcast" in op:
        return 1.0
    return (n - 1) / n  # all-gather, reduce-scatter, all-to-all


class WordHashVocabulary(SizedVocabulary):
    """The backbone's vocabulary size, text as one token per word (a stable hash of it): real sequence
    lengths for the dry run where the real tokenizer cannot be loaded offline."""

    def encode(self, text: str) -> list[int]:
        first = self.unk_id + 1
        return [first + zlib.crc32(w.encode()) % (self.vocab_size - first) for w in text.split()]


def _shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's own part of a parameter, gradient or optimizer state (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def run_rank(args, rank: int) -> dict:
    """Rank ``rank`` of the job, in this process (see the module docstring)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    t0 = time.perf_counter()
    shape = cluster.requested(args.nodes, args.gpus_per_node)
    cfg, checked = cluster.check_shape(args.recipe, shape, args.model, args.data, args.overrides)
    layout = checked.layout
    world, dp, tp = shape.world_size, layout.data_parallel_size, layout.tensor_parallel_size
    if layout.strategy != "model_parallel":
        raise ConfigError(f"RECIPE={args.recipe} trains with DDP: every rank holds the whole model and all-reduces "
                          "its gradients (make plan states its memory); the dry run is for model-parallel recipes")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model, tokenizer, predicted, largest_unit = _build_rank_model(cfg, layout, mesh, rank)
    built_s = time.perf_counter() - t0

    batch, batch_note = _rank_batch(args, shape, layout, tokenizer, mesh, rank)
    opt, counter, step_s = _train_steps(model, batch, cfg, dp, tp, args.steps)

    def local_bytes(tensors):
        return sum(_shard(x).numel() * _shard(x).element_size() for x in tensors)

    job_checkpoint_bytes = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1)  # + AdamW's 2 moments
                               for p in {id(p): p for p in model.parameters()}.values())
    measured = {
        "param_bytes": local_bytes(list(model.parameters())),
        "grad_bytes": local_bytes([p.grad for p in model.parameters() if p.grad is not None]),
        "optimizer_state_bytes": sum(local_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
                                     for state in opt.state.values()),
    }
    collectives = _collective_report(counter, mesh, args, world, dp, tp)
    dist.destroy_process_group()
    rank_checkpoint_bytes = measured["param_bytes"] + measured["optimizer_state_bytes"]
    return {"rank": rank, "world_size": world, "node": rank // args.gpus_per_node, "dp": dp, "tp": tp,
            "dp_rank": rank // tp, "tp_rank": rank % tp, "built_s": round(built_s, 2),
            "step_s": [round(s, 2) for s in step_s], "batch": batch_note, "measured": measured,
            "predicted": predicted, "largest_gathered_unit_bytes": largest_unit,
            "share_s": float(cfg.data.max_duration_s) / dp,
            # What a checkpoint holds (DCP: each rank writes its shards of parameters and optimizer state).
            "checkpoint": {"rank_bytes": rank_checkpoint_bytes, "job_bytes": job_checkpoint_bytes,
                           "storage_gbps": args.storage_gbps,
                           "rank_write_s": rank_checkpoint_bytes / (args.storage_gbps * 1e9)},
            "collectives": collectives, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _build_rank_model(cfg, layout, mesh, rank: int) -> tuple:
    """This rank's model, parallelized on ``mesh`` and filled with seeded random weights (only its
    shards exist), its tokenizer, the planner's prediction for this rank from the same unsharded
    model, and the largest FSDP unit an all-gather materializes (bytes)."""
    from omegaconf import OmegaConf

    from common.models import spec_of
    from common.parallel import ParallelOptions, fsdp_units, parallelize
    from common.tools.plan import activation_bytes, build_meta_model, state_bytes, tp_split_dims

    dp, tp = layout.data_parallel_size, layout.tensor_parallel_size
    build_cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(build_cfg, False)
    with parameters_on_meta():
        model, tokenizer = build_meta_model(build_cfg, device=None)
    if spec_of(cfg).llm is not None:  # what build_run checks with a layout: TP must split heads and vocabulary
        from common.parallel import check_tensor_parallel

        llm = spec_of(cfg).llm(model)
        check_tensor_parallel(tp, llm.config, llm.get_input_embeddings().num_embeddings,
                              lora=bool(cfg.model.get("lora")))
    seq_par = bool(cfg.parallel and cfg.parallel.sequence_parallel)
    param_b = next(model.parameters()).element_size()
    predicted = state_bytes(model, layout.strategy, dp, tp, param_b, seq_par, ranks=[rank])[0]
    predicted["activation_bytes"] = activation_bytes(build_cfg, model, dp, tp, param_b)
    tp_ids = set(tp_split_dims(model, seq_par)[0]) if tp > 1 else set()
    largest_unit = max(sum(p.numel() * p.element_size() // (tp if id(p) in tp_ids else 1) for p in params)
                       for _, params in fsdp_units(model, model.parallel_spec()))

    options = ParallelOptions(**OmegaConf.to_container(cfg.parallel)) if cfg.parallel else ParallelOptions()
    options.compile = False  # the graphs a GPU compiles are not what this CPU would
    parallelize(model, mesh, options)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        gen = torch.Generator().manual_seed(rank)
        for p in model.parameters():
            local = _shard(p)
            local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
    return model, tokenizer, predicted, largest_unit


def _train_steps(model, batch, cfg, dp: int, tp: int, steps: int) -> tuple:
    """``steps`` optimizer steps of the recipe's step (common.step) on ``batch``; the first one's
    collectives counted. (optimizer, counter, seconds per step)."""
    from common.models import spec_of
    from common.module import build_optimizer
    from common.step import clip_gradients, training_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(trainable, cfg.optim, max_steps=cfg.trainer.max_steps)
    counter = CollectiveCounter()
    step_s = []
    for step in range(steps):
        t = time.perf_counter()
        with counter if step == 0 else contextlib.nullcontext():
            loss, _ = training_loss(model(batch), batch, spec_of(cfg).loss_normalizer, dp=dp, tp=tp, model=model)
            with model.parallel_hooks.loss_context():
                loss.backward()
            clip_gradients([p for p in trainable if p.grad is not None], cfg.optim.get("max_grad_norm"))
            opt.step()
        if step < steps - 1:
            opt.zero_grad(set_to_none=False)
        step_s.append(time.perf_counter() - t)
    return opt, counter, step_s


def _collective_report(counter, mesh, args, world: int, dp: int, tp: int) -> dict:
    """The counted collectives per mesh dimension: calls, bytes, ring traffic, ops, whether the group
    spans nodes, and the seconds that traffic takes at the stated link speed."""
    groups = {mesh["data_parallel"].get_group().group_name: "data_parallel",
              mesh["tensor_parallel"].get_group().group_name: "tensor_parallel"}
    if tp > 1:
        groups[mesh["data_parallel", "tensor_parallel"]._flatten("data_tensor_parallel").get_group().group_name] = \
            "data_tensor_parallel"
    sizes = {"data_parallel": dp, "tensor_parallel": tp, "data_tensor_parallel": dp * tp}
    per_node = args.gpus_per_node
    spans_nodes = {"data_parallel": tp * dp > per_node and dp > 1, "tensor_parallel": tp > per_node,
                   "data_tensor_parallel": dp * tp > per_node}
    collectives = defaultdict(lambda: {"count": 0, "bytes": 0, "traffic_bytes": 0, "ops": defaultdict(int)})
    for op, group, nbytes in counter.calls:
        dim = groups.get(group, "world")
        n = sizes.get(dim, world)
        row = collectives[dim]
        row["count"] += 1
        row["bytes"] += nbytes
        row["traffic_bytes"] += int(nbytes * _traffic_factor(op, n))
        row["ops"][op] += 1
    for dim, row in collectives.items():
        across = spans_nodes.get(dim, args.nodes > 1)
        gbps = args.inter_node_gbps if across else args.intra_node_gbps
        row.update(ops=dict(row["ops"]), group_size=sizes.get(dim, world), across_nodes=across, gbps=gbps,
                   time_s=row["traffic_bytes"] / (gbps * 1e9))
    return dict(collectives)


def _rank_batch(args, shape, layout, tokenizer, mesh, rank: int):
    """This rank's share of the run's first global batch, through the run's data pipeline. With
    ``--slice-s``: a global batch of that many audio seconds per data-parallel rank, from one duration
    bucket (a CPU takes minutes per step of a billion-parameter model at a real share), stated in the
    report beside the real share. A backbone whose tokenizer is not on this machine (a hub id: the
    preset's vocabulary size only) reads text as one token per word."""
    from types import SimpleNamespace

    from common.run import build_run

    dp = layout.data_parallel_size
    data_overrides = ["data.num_workers=0"]  # one process reads (workers would only add start-up time)
    if args.slice_s:
        data_overrides += ["data.max_duration_s_per_gpu=null", "data.max_tokens_per_gpu=null", "data.max_tokens=null",
                           f"data.max_duration_s={args.slice_s * dp:g}", "data.num_buckets=1"]
    cfg, _ = cluster.check_shape(args.recipe, shape, args.model, args.data, [*args.overrides, *data_overrides])
    if isinstance(tokenizer, SizedVocabulary):
        tokenizer = WordHashVocabulary(tokenizer.vocab_size)
    run = build_run(cfg, tokenizer=tokenizer, with_model=False)
    dm = run.datamodule()
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(_device_mesh=mesh), global_rank=rank,
                                 world_size=shape.world_size, training=True,
                                 precision_plugin=SimpleNamespace(convert_input=lambda b: b))
    dm.setup("fit")
    try:
        batch = next(iter(dm.train_dataloader()))
    except StopIteration:
        # Named both ways: make users set SLICE_S / DATA, the module's users --slice-s / --data.
        raise ConfigError(f"the training data forms no global batch of data.max_duration_s={cfg.data.max_duration_s:g} s "
                          f"({dp} data-parallel ranks): a smaller corpus than one step of this job; use the job's "
                          "data (make dry-run ... DATA=<preset>, or --data), or run a slice of each rank's share "
                          "(make dry-run ... SLICE_S=4, or --slice-s 4: 4 audio seconds per rank)") from None
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    frames = batch["feature_mask"].sum() if "feature_mask" in batch else None
    return batch, {"utterances": int(batch["input_features"].shape[0]),
                   "audio_s": None if frames is None else round(float(frames) * 0.01, 2),
                   "slice_s": args.slice_s or None,
                   "share_s": float(cfg.data.max_duration_s) / dp if not args.slice_s else None}


def format_report(results: list[dict]) -> str:
    lines = []
    for r in results:
        b = r["batch"]
        used = (f"a slice of its share: {b['utterances']} utterance(s), {b['audio_s']:.1f} s of audio "
                f"(--slice-s {b['slice_s']:g}; the real share: {r['share_s']:.0f} s)" if b["slice_s"]
                else f"its share of a global batch: {b['utterances']} utterance(s), {b['audio_s']:.1f} s of audio")
        lines.append(f"rank {r['rank']} of {r['world_size']} (node {r['node']}, dp {r['dp_rank']}/{r['dp']}, "
                     f"tp {r['tp_rank']}/{r['tp']}): built in {r['built_s']:.1f} s, step(s) {r['step_s']} s on "
                     f"{used}")
        lines.append(f"  {'per rank, MiB':<28}{'measured':>10}{'make plan':>11}{'ratio':>8}")
        for key, label in (("param_bytes", "parameters"), ("grad_bytes", "gradients"),
                           ("optimizer_state_bytes", "optimizer state")):
            m, p = r["measured"][key], r["predicted"][key]
            lines.append(f"  {label:<28}{m / MIB:>10.1f}{p / MIB:>11.1f}{(m / p if p else float('nan')):>8.3f}")
        lines.append(f"  {'largest gathered unit':<28}{r['largest_gathered_unit_bytes'] / MIB:>10.1f}"
                     "   (FSDP2 all-gathers it, and prefetches the next)")
        lines.append(f"  {'activations (plan estimate)':<28}{'':>10}{r['predicted']['activation_bytes'] / MIB:>11.1f}"
                     f"   (the real share: {r['share_s']:.0f} s of audio)")
        lines.append(f"  {'collectives of one step':<50}{'count':>7}{'MiB':>10}{'sent MiB':>10}{'GB/s':>6}{'ms':>9}")
        for dim, c in sorted(r["collectives"].items()):
            where = f"{dim} ({c['group_size']} ranks{', across nodes' if c['across_nodes'] else ''})"
            lines.append(f"  {where:<50}{c['count']:>7}{c['bytes'] / MIB:>10.1f}{c['traffic_bytes'] / MIB:>10.1f}"
                         f"{c['gbps']:>6g}{c['time_s'] * 1e3:>9.1f}")
        total = sum(c["time_s"] for c in r["collectives"].values())
        lines.append(f"  communication per step at these bandwidths, not overlapped: {total * 1e3:.1f} ms")
        ck = r["checkpoint"]
        lines.append(f"  checkpoint: {ck['rank_bytes'] / MIB:.1f} MiB from this rank ({ck['job_bytes'] / GIB:.1f} GiB for "
                     f"the job); a synchronous save stops every rank ~{ck['rank_write_s']:.2f} s at "
                     f"{ck['storage_gbps']:g} GB/s of storage bandwidth per rank")
        lines.append(f"  this process's peak memory: {r['peak_rss_bytes'] / GIB:.1f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.tools.dry_run", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--model", default=None, help="model preset (common/conf/model/)")
    ap.add_argument("--data", default=None, help="data preset (common/conf/data/)")
    ap.add_argument("--ranks", default="0,last", help="ranks to run, e.g. 0,last or 0,5,last")
    ap.add_argument("--slice-s", type=float, default=0.0,
                    help="audio seconds per data-parallel rank to run (0: the rank's real share); a CPU takes "
                         "minutes per step of a billion-parameter model at a real share")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (1 or 2)")
    ap.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per GPU inside a node (NVLink 4)")
    ap.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes (400 Gb/s)")
    ap.add_argument("--storage-gbps", type=float, default=1.0,
                    help="GB/s each rank writes a checkpoint at (shared file system or object store)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    args.overrides = overrides
    try:
        if args.one_rank is not None:
            print(json.dumps(run_rank(args, args.one_rank)))
            return 0
        shape = cluster.requested(args.nodes, args.gpus_per_node)
        cluster.check_shape(args.recipe, shape, args.model, args.data, overrides)  # before any rank starts
        ranks = parse_ranks(args.ranks, shape.world_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    passed = list(argv if argv is not None else sys.argv[1:])
    for rank in ranks:
        t = time.perf_counter()
        print(f"rank {rank}: building and stepping ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "common.tools.dry_run", *passed, "--one-rank", str(rank)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                   os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))})
        if proc.returncode:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            print(errors[-1] if errors else f"error: rank {rank} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results[-1]["wall_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(results, indent=1) if args.json else format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
