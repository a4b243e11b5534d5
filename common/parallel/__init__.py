"""The shared parallel core: validate a layout, build the Lightning strategy, parallelize a model.

``parallelize`` applies parallelism from outside the model, in one fixed order (as torchtitan's
``parallelize_*`` functions do):

1. tensor + sequence parallel on the LLM backbone (plan from its HF ``base_model_tp_plan``);
2. activation checkpointing of each block (optional);
3. ``torch.compile`` of each block (optional);
4. FSDP2 ``fully_shard`` of each block, of the extra units, then of the root: units holding TP
   DTensors over the dp mesh, units TP left whole over all dp x tp ranks; on one rank only for the
   bf16-compute policy (a GPU), as it shards nothing there.

Usage (inside ``LightningModule.configure_model``)::

    from common.parallel import parallelize
    parallelize(self.model, self.device_mesh, ParallelOptions(activation_checkpointing=True))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigError

from .layout import (
    Layout,
    build_strategy,
    check_launch,
    check_tensor_parallel,
    data_parallel_rank_size,
    resolve_layout,
)
from .spec import ParallelHooks, ParallelSpec

__all__ = [
    "Layout",
    "ParallelHooks",
    "ParallelOptions",
    "ParallelSpec",
    "build_strategy",
    "check_launch",
    "check_tensor_parallel",
    "compiled_graphs",
    "data_parallel_rank_size",
    "fsdp_units",
    "parallelize",
    "resolve_layout",
]

log = logging.getLogger(__name__)


@dataclass
class ParallelOptions:
    sequence_parallel: bool = True
    loss_parallel: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (tests count graphs with the cheap "aot_eager")
    mixed_precision: bool = False  # FSDP2 policy: bf16 parameters for compute, fp32 gradient reduction
    reshard_after_forward: bool = True


def parallelize(model: nn.Module, mesh, options: ParallelOptions) -> nn.Module:
    """Apply TP/SP -> activation checkpointing -> compile -> FSDP2 to ``model`` per its ``parallel_spec()``."""
    spec: ParallelSpec = model.parallel_spec()
    tp_size = mesh["tensor_parallel"].size() if mesh is not None else 1
    dp_size = mesh["data_parallel"].size() if mesh is not None else 1

    if tp_size > 1:
        _apply_tensor_parallel(model, spec, mesh["tensor_parallel"], options)
    if options.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for blocks in spec.block_lists:
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if options.compile:
        import torch._dynamo

        # Batch size and LLM sequence length are dynamic (one graph for all of them); the speech
        # encoder's blocks specialize on their length, which the data pads to its bucket edges
        # (common.data.loading, pad_to_bucket_edges), so a run compiles a bounded number of graphs:
        # per block kind, one per audio length, with and without gradients (training, validation).
        # Blocks of all kinds share one code object (transformers' checkpointing layer), hence the limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for blocks in spec.block_lists:
            for block in blocks:
                block.compile(dynamic=True, backend=options.compile_backend)
    # One rank shards nothing: FSDP2 is there only for the bf16-compute policy (it keeps the fp32
    # weights and casts each unit to bf16 for its forward and backward). Without it (a CPU) the
    # parameters stay plain, as in a bare PyTorch loop: FSDP2's hooks and DTensor dispatch would cost
    # ~10% of a small model's step; common.parallel.strategy resumes such a model.
    fsdp = mesh is not None and (mesh.size() > 1 or options.mixed_precision)
    if fsdp:
        _apply_fsdp(model, spec, mesh, options)
    log.info("parallelized %s: tp=%d (sp=%s) dp=%d (%s)", type(model).__name__, tp_size,
             options.sequence_parallel and tp_size > 1, dp_size, "FSDP2" if fsdp else "one process, no FSDP2")
    return model


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (0 without compile)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _apply_tensor_parallel(model, spec: ParallelSpec, tp_mesh, options: ParallelOptions) -> None:
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from .gradients import to_local
    from .tensor_parallel import backbone_tp_plan, lm_head_style

    if spec.tp_backbone is None:
        raise ConfigError(f"{type(model).__name__} declares no tensor-parallel backbone; use tensor_parallel_size=1")
    # The parallel styles wrap each weight in a new nn.Parameter, which requires grad: a frozen
    # weight (model.freeze, the LLM under LoRA) would silently train. Restored below by name.
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    parallelize_module(spec.tp_backbone, tp_mesh, backbone_tp_plan(spec.tp_backbone, options.sequence_parallel))
    if spec.lm_head is not None:
        parallelize_module(spec.lm_head, tp_mesh, lm_head_style(options.sequence_parallel, options.loss_parallel))
    if spec.tied_lm_head:
        # parallelize_module gave each module its own DTensor; both shard the vocabulary rows
        # (Shard(0)), so one parameter serves both again, as in the unsharded model.
        spec.lm_head.weight = spec.tp_backbone.embed_tokens.weight
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
    model.parallel_hooks = ParallelHooks(
        loss_context=loss_parallel if options.loss_parallel else ParallelHooks.loss_context,
        full_tensor=to_local,
        seq_len_multiple=tp_mesh.size() if options.sequence_parallel else 1,
    )


def fsdp_units(model: nn.Module, spec: ParallelSpec) -> list[tuple]:
    """``[(unit, parameters it manages)]`` in the order ``fully_shard`` is applied: every block, every
    extra unit, then the root with whatever parameters are left (``common.tools.plan`` counts bytes with it)."""
    units = [block for blocks in spec.block_lists for block in blocks] + list(spec.extra_fsdp_units) + [model]
    seen: set[int] = set()
    out = []
    for unit in units:
        params = []
        for m in unit if isinstance(unit, list) else [unit]:
            for p in m.parameters():  # a tied weight (embedding = LM head) counts once, in its first unit
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        out.append((unit, params))
    return out


def _apply_fsdp(model, spec: ParallelSpec, mesh, options: ParallelOptions) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    dp_mesh = mesh["data_parallel"]
    # Units the TP plan left alone (the speech encoder, the projector) hold the same values on every TP
    # rank of a dp group; sharded over all dp x tp ranks, each rank keeps 1/world of them instead of
    # 1/dp. Gradients stay right: TP peers see the same batch, so the average over dp x tp ranks equals
    # the average over dp.
    flat_mesh = mesh._flatten("data_tensor_parallel") if mesh["tensor_parallel"].size() > 1 else dp_mesh
    kwargs = {"reshard_after_forward": options.reshard_after_forward}
    if options.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Decided before any fully_shard: sharding turns every parameter into a DTensor.
    plan = [(unit, dp_mesh if any(isinstance(p, DTensor) for p in params) else flat_mesh)
            for unit, params in fsdp_units(model, spec)]
    for unit, unit_mesh in plan:
        fully_shard(unit, mesh=unit_mesh, **kwargs)
