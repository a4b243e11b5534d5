"""The training step's arithmetic, written once: the loss of the *global* batch and the gradient clip.
The LightningModule, the dry run and both benchmarks call these, so a bench times the step that trains.

A model returns sums over its rank's share of the batch (:class:`common.models.spec.LossSums`);
the loss each rank backpropagates is

    loss_for_backward = local_loss_sum * dp_size / global_count

FSDP2 and DDP *average* gradients over the dp ranks, and the factor ``dp_size`` undoes that
average, leaving d(sum over the global batch)/d(theta) / global count: the same gradients and the
same logged ``train_loss`` whatever the data-parallel / tensor-parallel layout.

Usage::

    out = model(batch)
    loss, shares = training_loss(out, batch, spec.loss_normalizer, dp=2, tp=1, model=model)
    loss.backward()
    norm = clip_gradients([p for p in model.parameters() if p.grad is not None], max_norm=1.0)
"""

from __future__ import annotations

import torch

from common.models.spec import LossSums
from common.parallel.gradients import clip_grad_norm_, grad_norm, to_local


def training_loss(out: LossSums, batch: dict, normalizer: str, *, dp: int, tp: int = 1,
                  model: object = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate, and this rank's shares of the global batch's logged values.

    ``normalizer``: the batch key of the global count (the spec's ``loss_normalizer``: answer tokens,
    or mel frames). A shard the loader replaced by silence (``batch["substitute"]``) runs its
    forward and backward (every collective must match) and contributes nothing. The shares,
    summed over all ranks (TP ranks hold copies, hence ``/ tp``), are the global batch's
    ``train_loss`` and ``train_<part>``; they stay on the device (the recorder reduces a window of
    steps at once). ``model``: named in the error when ``out`` is not a :class:`LossSums`."""
    if not isinstance(out, LossSums):
        raise TypeError(f"{type(model).__name__}.forward(batch) returned {type(out).__name__}; a model returns "
                        "common.models.spec.LossSums(loss_sum, count, parts) (README: \"Add a recipe\")")
    loss_sum, global_count = out.loss_sum, batch[normalizer]
    if batch.get("substitute"):  # an unreadable shard's silence (common.data.checks): collectives match
        loss_sum = loss_sum * 0.0
    shares = {"train_loss": to_local(loss_sum).detach() / global_count / tp}
    for name, (total, _) in out.parts.items():
        shares[f"train_{name}"] = total.detach() / global_count / tp
    return loss_sum * (dp / global_count), shares


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm (before clipping), clipping to ``max_norm`` when it is set. A device
    tensor, the same on every rank (sharded and TP gradients included); nothing waits for it here."""
    return (clip_grad_norm_(params, max_norm) if max_norm else grad_norm(params)).detach()
