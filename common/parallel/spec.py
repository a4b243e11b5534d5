"""What a model declares about its own parallelism; imported by model code (no torch.distributed here).

A model states *what* can be sharded; ``common.parallel.parallelize`` decides *how*::

    class MyModel(nn.Module):
        def parallel_spec(self) -> ParallelSpec:
            return ParallelSpec(
                block_lists=[self.encoder.layers, self.llm.model.layers],   # FSDP + checkpoint units
                extra_fsdp_units=[self.llm.model.embed_tokens, [self.llm.model.norm, self.llm.lm_head]],
                tp_backbone=self.llm.model, lm_head=self.llm.lm_head,       # TP plan from HF config
            )

The model computes its loss inside ``self.parallel_hooks.loss_context()`` and turns logits it
needs whole (greedy decoding) into plain tensors with ``self.parallel_hooks.full_tensor``; both
are no-ops until a tensor-parallel layout replaces them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass
class ParallelSpec:
    block_lists: list[nn.ModuleList]
    extra_fsdp_units: list = field(default_factory=list)
    tp_backbone: nn.Module | None = None
    lm_head: nn.Module | None = None
    tied_lm_head: bool = False  # lm_head.weight is tp_backbone.embed_tokens.weight (kept tied under TP)


@dataclass
class ParallelHooks:
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    full_tensor: Callable = lambda t: t
    seq_len_multiple: int = 1  # sequence parallel splits the sequence evenly over the TP ranks
