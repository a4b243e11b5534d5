"""Tensor + sequence parallel plans built from a Hugging Face backbone's ``base_model_tp_plan``.

The HF plan says which projections are split column-wise or row-wise. This module translates
those style names to DTensor parallel styles and, when sequence parallel is on, adds what the HF
plan leaves to the runtime (as torchtitan does for Llama):

* norms run on sequence shards (``SequenceParallel``), attention/MLP inputs are all-gathered
  (``PrepareModuleInput``) and row-wise outputs reduce-scattered back to sequence shards;
* the first block receives the (replicated) input embeddings and cuts them into sequence shards;
* the vocabulary-parallel embedding all-reduces its output, and the LM head keeps logits sharded
  over the vocabulary so that the loss is computed with ``loss_parallel`` (no full-vocab gather).

Usage::

    plan = backbone_tp_plan(llm.model, sequence_parallel=True)   # {module path: ParallelStyle}
    parallelize_module(llm.model, tp_mesh, plan)
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from common.errors import ConfigError


class ReplicateOnShardedActivations(ParallelStyle):
    """Parameters replicated across TP ranks, applied to each rank's own slice of the activations.

    This is HF's ``replicated_with_grad_allreduce`` (e.g. Qwen3's per-head q/k norms after a
    column-wise projection): every rank sees different heads, so the weight gradient is the sum over
    ranks. Marking the input as sharded on the heads dimension lets DTensor derive that all-reduce.
    """

    def __init__(self, heads_dim_from_end: int | None = 2):
        super().__init__()
        self.heads_dim_from_end = heads_dim_from_end  # None: the input is whole (replicated) on every rank

    def _partition(self, name, module, mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    def _input(self, module, inputs, mesh):
        x = inputs[0]
        placement = Replicate() if self.heads_dim_from_end is None else Shard(x.ndim - self.heads_dim_from_end)
        return (DTensor.from_local(x, mesh, [placement], run_check=False), *inputs[1:])

    @staticmethod
    def _output(module, output, mesh):
        return output.to_local()

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._input, self._output)


def _hf_style(style: str, module_path: str, sequence_parallel: bool) -> ParallelStyle:
    out_layout = Shard(1) if sequence_parallel else Replicate()
    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(output_layouts=out_layout),
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
        "replicated_with_grad_allreduce": lambda: ReplicateOnShardedActivations(),
    }
    if style not in styles:
        raise ConfigError(
            f"backbone TP plan entry {module_path!r} uses style {style!r}, which this project does not "
            f"translate (known: {', '.join(styles)}); set tensor_parallel_size=1 or extend "
            f"common/parallel/tensor_parallel.py"
        )
    return styles[style]()


def _lora_styles(name: str, module: nn.Module, style: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """A LoRA-wrapped projection (peft ``LoraLayer``: ``base_layer`` + ``lora_A``/``lora_B`` per adapter).

    Column-wise: the base projection is split as the HF plan says; ``lora_A`` (rank x in) is
    replicated and sees the whole input; ``lora_B`` (out x rank) is split column-wise like the base,
    so each rank adds its own output columns. The backward of ``lora_B``'s input all-reduces the
    gradient that reaches ``lora_A``, so the replicated adapter gets the full gradient on every rank.
    """
    if style != "colwise":
        raise ConfigError(
            f"model.lora targets {name!r}, which the backbone's TP plan splits {style!r}; under tensor "
            "parallelism LoRA supports the column-wise projections (e.g. q_proj, k_proj, v_proj, gate_proj, "
            "up_proj): drop it from model.lora.target_modules or use tensor_parallel_size=1"
        )
    plan = {f"{name}.base_layer": _hf_style(style, name, sequence_parallel)}
    for adapter in module.lora_A:
        plan[f"{name}.lora_A.{adapter}"] = ReplicateOnShardedActivations(heads_dim_from_end=None)
        plan[f"{name}.lora_B.{adapter}"] = ColwiseParallel()
    return plan


def _expand(pattern: str, names: list[str]) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")]


def backbone_tp_plan(backbone: nn.Module, sequence_parallel: bool = True) -> dict[str, ParallelStyle]:
    """The full plan for an HF decoder base model (``LlamaModel``-like: layers, embed_tokens, norm)."""
    hf_plan = getattr(backbone.config, "base_model_tp_plan", None) or getattr(backbone, "_tp_plan", None)
    if not hf_plan:
        raise ConfigError(
            f"{type(backbone).__name__} has no Hugging Face base_model_tp_plan, so tensor parallel cannot "
            f"know how to split it; use tensor_parallel_size=1 (FSDP2 only) or a backbone with a TP plan"
        )
    modules = dict(backbone.named_modules())
    names = list(modules)
    plan: dict[str, ParallelStyle] = {}
    for pattern, style in hf_plan.items():
        matches = _expand(pattern, names)
        if not matches:
            raise ConfigError(f"backbone TP plan entry {pattern!r} matches no module of {type(backbone).__name__}")
        for name in matches:
            if hasattr(modules[name], "base_layer") and hasattr(modules[name], "lora_A"):
                plan.update(_lora_styles(name, modules[name], style, sequence_parallel))
            else:
                plan[name] = _hf_style(style, name, sequence_parallel)
    layers = getattr(backbone, "layers", None)
    if not sequence_parallel:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        return plan
    required = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if layers is None or not all(hasattr(layers[0], r) for r in required) or not hasattr(backbone, "norm"):
        raise ConfigError(
            f"sequence parallel needs a Llama-like block ({', '.join(required)}, final norm) and "
            f"{type(backbone).__name__} differs; set model.parallel.sequence_parallel=false"
        )
    plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan["norm"] = SequenceParallel()
    for i in range(len(layers)):
        p = f"layers.{i}"
        plan[f"{p}.input_layernorm"] = SequenceParallel()
        plan[f"{p}.post_attention_layernorm"] = SequenceParallel()
        plan[f"{p}.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        plan[f"{p}.mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    # The residual stream enters block 0 whole (embeddings with audio spliced in); cut it into
    # sequence shards there. The backward of this cut is the all-gather of the input gradient.
    plan["layers.0"] = PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
    )
    return plan


def lm_head_style(sequence_parallel: bool, loss_parallel: bool) -> ParallelStyle:
    return ColwiseParallel(
        input_layouts=Shard(1) if sequence_parallel else Replicate(),
        output_layouts=Shard(-1) if loss_parallel else Replicate(),
        use_local_output=not loss_parallel,
    )
