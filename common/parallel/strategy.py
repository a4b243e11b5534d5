"""Lightning's ``ModelParallelStrategy``, able to resume a model that FSDP2 does not wrap.

One process without the bf16-compute policy (a CPU) trains plain parameters: FSDP2 over one rank
shards and casts nothing, and its hooks and DTensor dispatch cost ~10% of a small model's step
(bench/README.md, "Where the SALM loop's overhead goes"). Lightning's ``load_checkpoint`` loads
distributed checkpoints only into DTensor parameters ("Could not find a distributed model"); this
class loads them into plain ones the same way (DCP reads each tensor whole, whatever layout wrote
it), and leaves every other case to Lightning. The checkpoints it reads and writes are the same
files: one written by a one-process run resumes under FSDP2 or TP x FSDP2, and back.

Usage: :func:`common.parallel.build_strategy` instantiates it for
``_target_: lightning.pytorch.strategies.ModelParallelStrategy`` (recipes keep Lightning's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallelStrategy
from torch.distributed.tensor import DTensor

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


class ModelParallelStrategy(LightningModelParallelStrategy):
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir() or any(isinstance(p, DTensor) for p in self.model.parameters()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        # As lightning.fabric's _load_checkpoint does for DTensor modules: the model's state read in
        # place, then each optimizer's (its state initialized first, keyed by parameter name).
        state = {"state_dict": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=path)
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key])
        return torch.load(path / META_FILE, weights_only=weights_only)
