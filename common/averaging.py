"""An exponential moving average (EMA) of the weights, for the model a run hands over (``ema.decay``).

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` does the work: after every
optimizer step ``average = decay * average + (1 - decay) * weights``; validation runs on the
average (swapped in and back), the run ends with the average in the module, and each checkpoint
holds the average as its ``state_dict`` (what ``make export``, ``make transcribe`` and the test
sets read) with the trained weights beside it (``current_model_state``) and the average's step
count (``averaging_state``), so a resumed run continues both exactly.

What this adds to Lightning's class:

* the average is kept in fp32: under ``bf16-true`` a 0.999 decay moves a weight by 1e-3 of its
  distance to the new value, below bf16's resolution (2^-8), so a bf16 average would barely move;
* Lightning's warning that a module with ``configure_model`` may be sharded is silenced: the
  settings refuse ``ema.decay`` on the sharded (FSDP2) recipes before any process starts
  (:func:`common.settings.check_settings`), so every module that gets here is whole.

Usage::

    trainer = L.Trainer(callbacks=[WeightEMA(decay=0.999)], ...)
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import EMAWeightAveraging


class WeightEMA(EMAWeightAveraging):
    def __init__(self, decay: float):
        super().__init__(decay=decay)

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*WeightAveraging callback with a model that overrides")
            super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            self._average_model.float()
