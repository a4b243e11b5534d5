"""The LightningModule shared by the recipes: the step (``common.step``'s global-batch loss and
clipping), the optimizer, validation, what a checkpoint carries.

Usage::

    module = TrainingModule(SALM(cfg.model, tok), tok, spec_of(cfg), optim=cfg.optim, parallel=cfg.parallel)
    trainer.fit(module, datamodule)
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import WordErrorRate

from common.data.text import normalize_text
from common.parallel import ParallelOptions, data_parallel_rank_size, parallelize
from common.parallel.gradients import is_dtensor, to_local
from common.step import clip_gradients, training_loss


class TrainingModule(L.LightningModule):
    def __init__(self, model, tokenizer, spec, optim, parallel=None, run_config: dict | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec  # common.models.spec.ModelSpec: what this model reports and can do
        self.run_config = run_config
        self.optim_cfg = optim
        self.parallel_options = ParallelOptions(**(parallel or {}))
        self.val_loss = MeanMetric()
        # Recognizers are scored by WER; other models may report extra per-value means (e.g. TTS
        # "mel_loss") named by their spec's `validation_metrics`, in their forward's LossSums.parts.
        self.val_wer = WordErrorRate() if spec.transcribes else None
        self.val_extra = torch.nn.ModuleDict({name: MeanMetric() for name in spec.validation_metrics})
        self.loss_normalizer = spec.loss_normalizer
        self.last_grad_norm = torch.tensor(float("nan"))
        self.step_shares: dict[str, torch.Tensor] = {}  # this step's loss shares (summed over ranks by the recorder)
        self.last_lr = float("nan")
        self.last_validation: dict[str, float] = {}

    def _apply(self, fn, *args, **kwargs):
        # Lightning's bf16-true precision converts the whole module with .to(bfloat16), and
        # torchmetrics lets that convert metric states too: bf16 counts are not exact above 256, so
        # the WER's word counts and the summed validation loss would be wrong. Metrics stay fp32.
        super()._apply(fn, *args, **kwargs)
        for metric in self.modules():
            if isinstance(metric, Metric) and metric.dtype != torch.float32:
                metric.set_dtype(torch.float32)
        return self

    # --- parallelism (ModelParallelStrategy calls this once the device mesh exists) -------------
    def configure_model(self) -> None:
        if getattr(self, "_device_mesh", None) is not None and not getattr(self, "_parallelized", False):
            parallelize(self.model, self.device_mesh, self.parallel_options)
            self._parallelized = True

    @property
    def dp_size(self) -> int:
        return data_parallel_rank_size(self.trainer)[1]

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        dp = self.dp_size
        loss, self.step_shares = training_loss(self.model(batch), batch, self.loss_normalizer, dp=dp,
                                               tp=self.trainer.world_size // dp, model=self.model)
        return loss

    def backward(self, loss, *args, **kwargs):
        # Under loss parallel the backward of the vocabulary-sharded cross-entropy must run in its context.
        with self.model.parallel_hooks.loss_context():
            loss.backward(*args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.last_lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
        max_norm = self.optim_cfg.get("max_grad_norm")
        # A device tensor (the same on every rank): read with the step's other values, no sync here.
        self.last_grad_norm = clip_gradients([p for p in self.parameters() if p.grad is not None], max_norm)

    def configure_optimizers(self):
        opt, sched = build_optimizer([p for p in self.parameters() if p.requires_grad], self.optim_cfg,
                                     max_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint explains itself: `python -m common.tools.transcribe` rebuilds the model and
        # tokenizer from it alone (plain strings and dicts, so it loads with weights_only=True).
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        if hasattr(self.tokenizer, "to_json"):
            checkpoint["tokenizer_json"] = self.tokenizer.to_json()

    # --- validation -----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        loss_sum, num_tokens, parts = self.model(batch)
        if batch.get("substitute"):
            # Silence standing in for an unreadable or empty shard: run every forward the other
            # ranks run (FSDP2/TP collectives inside generate must match), but do not score.
            if self.val_wer is not None:
                self.model.generate(batch["input_features"], batch["feature_mask"])
            return
        self.val_loss.update(to_local(loss_sum).detach() / num_tokens, weight=num_tokens)
        for name, (total, count) in parts.items():
            if name in self.val_extra:
                self.val_extra[name].update(total / count, weight=count)
        if self.val_wer is not None:
            hyps = self.model.generate(batch["input_features"], batch["feature_mask"])
            # Both sides through the project's one normalizer: casing and punctuation are not errors.
            self.val_wer.update([normalize_text(self.tokenizer.decode(ids)) for ids in hyps],
                                [normalize_text(t) for t in batch["texts"]])

    def on_validation_epoch_end(self) -> None:
        # torchmetrics syncs over all ranks; TP copies scale numerator and denominator alike.
        # Kept here too: Lightning discards what is logged during its sanity check, which this
        # project uses as the step-0 validation (the untrained model's WER).
        metrics = {"loss": self.val_loss}
        if self.val_wer is not None:
            metrics["wer"] = self.val_wer
        metrics.update(self.val_extra.items())
        self.last_validation = {}
        for name, metric in metrics.items():
            self.last_validation[f"val_{name}"] = float(metric.compute())
            self.log(f"val_{name}", self.last_validation[f"val_{name}"], sync_dist=False)
            metric.reset()


def build_optimizer(params: list, cfg, max_steps: int):
    """AdamW and its per-step schedule (linear warm-up, cosine decay to ``min_lr_ratio``)::

        opt, sched = build_optimizer(params, cfg.optim, max_steps=cfg.trainer.max_steps)
    """
    # Two groups: DTensor parameters (TP and/or FSDP2) and plain ones (e.g. the encoder under TP
    # alone); a foreach kernel cannot mix the two.
    groups = [{"params": [p for p in params if is_dtensor(p) == kind]} for kind in (True, False)]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        # One multi-tensor kernel per update instead of one per parameter: the per-parameter path
        # pays DTensor dispatch for every tensor on every step.
        foreach=True,
    )
    warmup, min_ratio = cfg.warmup_steps, cfg.min_lr_ratio

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
