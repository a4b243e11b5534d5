"""Every rank's RNG states in the checkpoint, put back at the first resumed step.

Together with the data sampler's position (common.data.datamodule) and per-batch seeded augmentation
(common.data.features.seeded_generator) a resumed run repeats the uninterrupted run's losses exactly
(CPU, fp32). States are plain tensors/lists, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from common.parallel.gather import gather_objects

log = logging.getLogger("common.train")


class ExactResume(Callback):
    """python/numpy/torch(/cuda) RNG states of every rank: saved, and restored on the same world size
    (states of another world size, a resharded resume, are not applied: said in a warning)."""

    def __init__(self):
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = gather_objects(rng_states())  # every rank is saving: a collective is safe

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states and len(states) == trainer.world_size:
            self._pending = states[trainer.global_rank]
        elif states:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: not restored (losses will not "
                        "repeat bit for bit)", len(states), trainer.world_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Applied here, not at load time: between loading and the first step Lightning runs the
        # sanity check and starts the DataLoader, which the uninterrupted run did not do at this point.
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def rng_states() -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
