"""Parallel layout: validation before anything starts, strategy construction, data-parallel ranks.

Every check raises :class:`ConfigError` with the numbers and the settings involved, on every rank
alike and before any collective, so a bad config fails fast instead of hanging::

    layout = resolve_layout(cfg.trainer)          # dp x tp == devices x num_nodes, known strategy
    check_launch(layout)                          # ... == the processes torchrun really started
    check_tensor_parallel(layout.tensor_parallel_size, llm_config, vocab_size)
    strategy = build_strategy(cfg.trainer.strategy)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from common.errors import ConfigError

MODEL_PARALLEL = "lightning.pytorch.strategies.ModelParallelStrategy"
DDP = "lightning.pytorch.strategies.DDPStrategy"
STRATEGIES = {MODEL_PARALLEL: "model_parallel", DDP: "ddp"}


def gpu_precision(strategy_target: str) -> str:
    """The GPU default of ``trainer.precision: auto``: fp32 master weights and optimizer state, bf16
    compute, as torchtitan trains. Under ModelParallelStrategy Lightning keeps fp32 (``32-true``)
    and FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` computes in bf16 (also
    at dp=1); under DDP, bf16 autocast (``bf16-mixed``). ``bf16-true`` (bf16 weights and AdamW
    state: half the memory, NeMo's SALM choice) is an opt-in."""
    return "32-true" if STRATEGIES.get(strategy_target) == "model_parallel" else "bf16-mixed"


@dataclass(frozen=True)
class Layout:
    strategy: str  # "model_parallel" | "ddp"
    devices: int
    num_nodes: int
    data_parallel_size: int
    tensor_parallel_size: int

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_layout(trainer_cfg) -> Layout:
    strategy_cfg = trainer_cfg.get("strategy")
    target = strategy_cfg.get("_target_") if hasattr(strategy_cfg, "get") else strategy_cfg
    if target not in STRATEGIES:
        raise ConfigError(
            f"trainer.strategy._target_ is {target!r}; supported strategies: {', '.join(STRATEGIES)}"
        )
    devices = _positive_int(trainer_cfg.get("devices"), "trainer.devices")
    num_nodes = _positive_int(trainer_cfg.get("num_nodes", 1), "trainer.num_nodes")
    world = devices * num_nodes
    if STRATEGIES[target] == "ddp":
        return Layout("ddp", devices, num_nodes, world, 1)
    tp = strategy_cfg.get("tensor_parallel_size", 1)
    tp = 1 if tp == "auto" else _positive_int(tp, "trainer.strategy.tensor_parallel_size")
    dp = strategy_cfg.get("data_parallel_size", "auto")
    dp = world // tp if dp == "auto" else _positive_int(dp, "trainer.strategy.data_parallel_size")
    if dp * tp != world:
        raise ConfigError(
            f"data_parallel_size ({dp}) x tensor_parallel_size ({tp}) = {dp * tp} != world size {world} "
            f"(devices {devices} x num_nodes {num_nodes}); set trainer.strategy.data_parallel_size / "
            f"tensor_parallel_size so that their product is {world}"
        )
    return Layout("model_parallel", devices, num_nodes, dp, tp)


def check_launch(layout: Layout, env=os.environ) -> None:
    """The config must describe the processes that torchrun (or the Kubeflow operator) started."""
    if "WORLD_SIZE" not in env:
        return
    world, local = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    if local != layout.devices or world != layout.world_size:
        raise ConfigError(
            f"the launcher started {world} process(es), {local} per node (WORLD_SIZE={world}, "
            f"LOCAL_WORLD_SIZE={local}), but trainer.devices ({layout.devices}) x trainer.num_nodes "
            f"({layout.num_nodes}) = {layout.world_size}; start NPROC={layout.devices} processes per node "
            f"or set trainer.devices={local} trainer.num_nodes={world // max(local, 1)}"
        )


def check_tensor_parallel(tp: int, llm_config, vocab_size: int, lora: bool = False) -> None:
    """TP splits heads, key/value heads, MLP width and the vocabulary: each must divide evenly.
    (LoRA and tied embeddings are supported; a LoRA target the plan splits row-wise is refused when
    the plan is built, naming it.)"""
    if tp == 1:
        return
    name = type(llm_config).__name__
    sizes = {attr: getattr(llm_config, attr, None) for attr in ("num_attention_heads", "num_key_value_heads",
                                                                 "intermediate_size")}
    sizes = {attr: v for attr, v in sizes.items() if v is not None}
    valid = valid_tensor_parallel_sizes([*sizes.values(), vocab_size])
    for attr, value in sizes.items():
        if value % tp:
            raise ConfigError(
                f"tensor_parallel_size ({tp}) must divide the backbone's {attr} ({value}) "
                f"({name}); sizes that divide heads, key/value heads, MLP width and vocabulary: {valid}"
            )
    if vocab_size % tp:
        raise ConfigError(
            f"tensor_parallel_size ({tp}) must divide the vocabulary size ({vocab_size}) for the "
            f"vocabulary-parallel embedding and loss; sizes that divide every split dimension: {valid}"
        )


def valid_tensor_parallel_sizes(dims: list[int]) -> list[int]:
    """Every size that divides all of ``dims`` (the divisors of their greatest common divisor)."""
    import math

    g = math.gcd(*dims) if dims else 1
    return [d for d in range(1, g + 1) if g % d == 0]


def check_tensor_parallel_within_node(tp: int, gpus_per_node: int) -> None:
    """A tensor-parallel group talks at every layer: it must stay inside one node (NVLink)."""
    if gpus_per_node % tp:
        raise ConfigError(
            f"tensor_parallel_size ({tp}) does not divide GPUS_PER_NODE / trainer.devices ({gpus_per_node}): a "
            f"tensor-parallel group would span nodes; use a multiple of {tp} GPUs per node")


def build_strategy(strategy_cfg, collective_timeout_s: float | None = None):
    """Instantiate the Lightning strategy exactly as written in YAML (``_target_`` + its arguments).

    ``collective_timeout_s`` (``run.collective_timeout_s``) bounds every collective: a rank whose
    peer died (or hangs) raises after that long instead of waiting forever.
    """
    from datetime import timedelta

    from hydra.utils import instantiate

    kwargs = {"timeout": timedelta(seconds=float(collective_timeout_s))} if collective_timeout_s else {}
    if strategy_cfg.get("_target_") == MODEL_PARALLEL:
        # The same class plus resuming a one-process model that FSDP2 does not wrap (common.parallel.strategy).
        kwargs["_target_"] = "common.parallel.strategy.ModelParallelStrategy"
    return instantiate(strategy_cfg, **kwargs)


def data_parallel_rank_size(trainer) -> tuple[int, int]:
    """(dp_rank, dp_size): ranks of one tensor-parallel group share a dp_rank and so their data."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None:
        dp_mesh = mesh["data_parallel"]
        return dp_mesh.get_local_rank(), dp_mesh.size()
    return trainer.global_rank, trainer.world_size
