"""What a run leaves behind: ``metrics.jsonl``, ``validation.jsonl``, ``summary.json``, progress lines.

``RunRecorder`` is a Lightning callback. Rank 0 writes one JSON object per optimizer step::

    {"step": 12, "train_loss": 2.31, "lr": 0.0003, "grad_norm": 1.7, "utterances": 32, "audio_s": 51.2, "elapsed_s": 8.4}

and one per validation to ``validation.jsonl``. Throughput counts global utterances and audio
seconds (every rank knows the size of the global batch) after ``warmup_steps`` steps.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import lightning as L
import torch

from common.parallel.gather import gather_objects
from common.rundir import METRICS_FILE, VALIDATION_FILE

log = logging.getLogger("common.train")


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def training_state_bytes(module: torch.nn.Module, optimizers) -> dict[str, int]:
    """Bytes of parameters and optimizer state held by *this* rank (local shards of DTensors)."""
    params = [p for p in module.parameters()]
    opt_state = [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "param_bytes": _local_bytes(params),
        "grad_bytes": _local_bytes([p for p in params if p.requires_grad]),
        "optimizer_state_bytes": _local_bytes(opt_state),
    }


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def device_info(device: torch.device) -> dict:
    """What the run really ran on: device name, torch/CUDA versions, the process group's backend."""
    dist = torch.distributed
    info = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "distributed_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
    }
    return info


class RunRecorder(L.Callback):
    """Rows of ``metrics.jsonl``/``validation.jsonl``, wandb points, progress lines, throughput and MFU.

    Every step gets its row, but the loss values stay on the device until a *log step* (every
    ``log_every_n_steps``, the last step, a checkpoint): then the window's values of every rank are
    summed with one all-reduce and copied to the host once, as torchtitan logs. No step waits for
    the device or for the other ranks just to be logged.
    """

    def __init__(self, run_dir: Path, print_every_n_steps: int = 10, warmup_steps: int = 3,
                 earlier_rows: dict[str, list[dict]] | None = None, log_every_n_steps: int = 1):
        self.run_dir = Path(run_dir)
        # Rows of earlier attempts that this run continues (the summary describes the whole run): what
        # RunDirectory.begin_attempt left of the step logs (rank 0; the rows are appended after them).
        earlier_rows = earlier_rows or {}
        self.earlier_history: list[dict] = earlier_rows.get(METRICS_FILE, [])
        self.earlier_validations: list[dict] = earlier_rows.get(VALIDATION_FILE, [])
        self.print_every = print_every_n_steps
        self.log_every = max(1, int(log_every_n_steps))
        self.warmup_steps = warmup_steps
        self.history: list[dict] = []
        self.validations: list[dict] = []
        self.pending: list[tuple[dict, list[str], torch.Tensor]] = []  # rows whose values are on the device
        self.t_start = None
        self.clock = StepClock(warmup_steps)
        # Rank 0: called at the first log step and then at most once a minute (common.train: a summary.json
        # with status "running", so that a run killed without warning is still described).
        self.on_progress = None
        self.progress_due = Throttle(60.0)
        self.per_rank: list[dict] = []
        self.device_info: dict = {}
        self.model_flops = None   # common.flops.ModelFlops of the model (None: no formula)
        self.peak_flops = None    # FLOP/s of all ranks together (None: CPU or an unlisted GPU)
        self.compile_graphs = self.compile_graphs_at_warmup = 0  # torch.compile graphs (parallel.compile)

    def on_train_start(self, trainer, pl_module):
        from common.flops import peak_flops

        self.t_start = time.perf_counter()
        self.device_info = device_info(pl_module.device)
        self.model_flops = pl_module.spec.flops(pl_module.model)  # the model file's formula
        peak = peak_flops(pl_module.device)
        self.peak_flops = peak * trainer.world_size if peak else None
        self.device_info["peak_bf16_tflops"] = round(peak / 1e12, 1) if peak else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The step starts when the loader handed its batch over (the data module notes it), before
        # the transfer and the features on the device, which are compute, not data wait.
        self.clock.batch_started(time.perf_counter(), getattr(getattr(trainer, "datamodule", None), "batch_ready_at", None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        now = time.perf_counter()
        flops = self.model_flops.training(batch["global_lengths"]) if self.model_flops and "global_lengths" in batch else None
        self.clock.batch_ended(step, now, batch, flops)
        if step == self.warmup_steps:
            from common.parallel import compiled_graphs

            self.compile_graphs_at_warmup = compiled_graphs()
        record = {
            "step": step,
            "train_loss": None,  # filled in at the next log step
            "lr": pl_module.last_lr,
            "grad_norm": None,
            "utterances": batch["global_num_utterances"],
            "audio_s": round(batch["global_audio_s"], 3),
            "padding_efficiency": round(batch["padding_efficiency"], 4),
            "batch": batch["batch_fingerprint"],  # hash of the global batch's cut ids: same data order?
            "elapsed_s": round(now - self.t_start, 3),
            **({"model_tflop": round(flops / 1e12, 6)} if flops is not None else {}),
        }
        # Loss components a model reports besides the total (e.g. TTS train_mel_loss, train_stop_loss).
        names = list(pl_module.step_shares)
        device = pl_module.device
        values = torch.stack([pl_module.step_shares[n].float().reshape(()).to(device) for n in names]
                             + [torch.as_tensor(pl_module.last_grad_norm, dtype=torch.float32, device=device).reshape(())])
        self.pending.append((record, names, values))
        if step % self.log_every == 0 or step >= trainer.max_steps > 0:
            self.flush(trainer)

    def flush(self, trainer, reduce: bool = True) -> None:
        """Sum the pending rows' loss shares over every rank (one all-reduce, one copy to the host),
        then write the rows, log them to wandb and print progress. Every rank calls it at the same
        step (a log step, a checkpoint, the end); ``reduce=False`` after a failure, when the other
        ranks may be gone: one process's values are exact, several processes' are left out."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        values = torch.stack([v for _, _, v in pending])  # (steps, values + grad norm)
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if reduce and distributed:
            shares = values[:, :-1].contiguous()
            dist.all_reduce(shares)  # grad norms are the same on every rank already
            values = torch.cat([shares, values[:, -1:]], dim=1)
        rows = values.tolist()
        exact = reduce or not distributed
        for (record, names, _), row in zip(pending, rows):
            if exact:
                record.update({name: row[i] for i, name in enumerate(names)})
                record["grad_norm"] = row[-1]
            self.history.append(record)
        records = [r for r, _, _ in pending]
        self._note_compiles(records[-1]["step"])
        if self.compile_graphs:
            records[-1]["compiled_graphs"] = self.compile_graphs  # parallel.compile: the count so far
        _append_rows(self.run_dir / METRICS_FILE, records, trainer)
        if not trainer.is_global_zero:
            return
        _log_rows(trainer, records, _window_mfu(self.history, records, self.warmup_steps, self.peak_flops),
                  self.print_every)
        if self.on_progress is not None and reduce and self.progress_due():
            self.on_progress()

    def _note_compiles(self, step: int) -> None:
        """Log every growth of torch.compile's graph count (a run that keeps recompiling is slow)."""
        from common.parallel import compiled_graphs

        graphs = compiled_graphs()
        if graphs != self.compile_graphs:
            log.info("torch.compile: %d graph(s) compiled by step %d", graphs, step)  # rank 0 logs (setup_logging)
            self.compile_graphs = graphs

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Every rank is saving at this step: the rows up to it are reduced and written first, so
        # metrics.jsonl never misses steps that a resumed run will not train again.
        self.flush(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.flush(trainer, reduce=False)  # no collective: a failed peer would never answer

    def on_validation_end(self, trainer, pl_module):
        # The sanity check (trainer.num_sanity_val_steps) is recorded as the step-0 validation.
        record = {"step": trainer.global_step, **pl_module.last_validation}
        self.validations.append(record)
        _append_rows(self.run_dir / VALIDATION_FILE, [record], trainer)
        if trainer.is_global_zero:
            log.info("validation at step %d: %s", record["step"], record)

    def on_train_end(self, trainer, pl_module):
        self.flush(trainer)
        mine = training_state_bytes(pl_module, trainer.optimizers)
        mine["peak_memory_bytes"] = peak_memory_bytes(pl_module.device)
        mine["rank"] = trainer.global_rank
        self.per_rank = gather_objects(mine)

    def throughput(self) -> dict:
        """summary.json's ``throughput``: rates, step split and MFU over the steps after warm-up."""
        return self.clock.throughput(self.history[-1]["elapsed_s"] if self.history else None, self.t_start,
                                     self.peak_flops)


def _append_rows(path: Path, records: list[dict], trainer) -> None:
    if trainer.is_global_zero and records:
        with open(path, "a") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))


class Throttle:
    """Called: True the first time, then at most once per ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds, self._at = seconds, None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._at is not None and now - self._at < self.seconds:
            return False
        self._at = now
        return True


def _log_rows(trainer, records: list[dict], window_mfu: float | None, print_every: int) -> None:
    """Rank 0: the rows' numbers to every logger (wandb), the window's MFU on the last, progress lines."""
    for record in records:
        metrics = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "elapsed_s") and v is not None}
        if record is records[-1] and window_mfu is not None:
            metrics["mfu"] = window_mfu  # the wandb series: MFU over the steps since the last log step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])
        step = record["step"]
        if (step % print_every == 0 or step == trainer.max_steps) and record["train_loss"] is not None:
            log.info("step %d/%d  train_loss %.4f  lr %.2e  %.1fs", step, trainer.max_steps,
                     record["train_loss"], record["lr"], record["elapsed_s"])


def _window_mfu(history: list[dict], records: list[dict], warmup_steps: int, peak_flops: float | None) -> float | None:
    """MFU of the steps in ``records`` (the newest rows of ``history``; wall time from the step before
    them), past the warm-up."""
    if not peak_flops or len(history) <= len(records) or records[0]["step"] <= warmup_steps:
        return None
    dt = records[-1]["elapsed_s"] - history[-len(records) - 1]["elapsed_s"]
    flops = sum(r.get("model_tflop", 0.0) for r in records) * 1e12
    return round(flops / dt / peak_flops, 4) if dt > 0 else None


class StepClock:
    """What the steps after ``warmup_steps`` did and how long they took: global utterances, audio
    seconds, LLM tokens and model FLOPs; each step split into waiting between steps (the next batch,
    plus the loop's own bookkeeping) and the step itself (forward, backward, optimizer, with their
    collectives)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.t_warm = self.t_batch_start = self.t_prev_end = None
        self.steps = 0
        self.utterances = self.audio_s = self.tokens = self.flops = self.data_wait_s = self.compute_s = 0.0

    def batch_started(self, now: float, ready_at: float | None) -> None:
        """``ready_at``: when the loader handed the batch over (None: now)."""
        self.t_batch_start = ready_at if ready_at is not None and (self.t_prev_end or 0.0) <= ready_at <= now else now

    def batch_ended(self, step: int, now: float, batch: dict, flops: float | None) -> None:
        if step == self.warmup_steps:
            self.t_warm = now
        elif step > self.warmup_steps:
            self.steps += 1
            self.utterances += batch["global_num_utterances"]
            self.audio_s += batch["global_audio_s"]
            self.tokens += batch.get("global_num_llm_tokens", 0)
            self.flops += flops or 0.0
            self.compute_s += now - self.t_batch_start
            self.data_wait_s += self.t_batch_start - (self.t_prev_end or self.t_batch_start)
        self.t_prev_end = now

    def throughput(self, last_elapsed_s: float | None, t_start: float, peak_flops: float | None) -> dict:
        if self.t_warm is None or last_elapsed_s is None:
            return {"utterances_per_s": None, "audio_s_per_s": None, "measured_steps": 0}
        dt = last_elapsed_s - (self.t_warm - t_start)
        steps = self.steps
        model_flops_per_s = self.flops / dt if dt > 0 and self.flops else None
        return {
            "utterances_per_s": round(self.utterances / dt, 3) if dt > 0 else None,
            "audio_s_per_s": round(self.audio_s / dt, 3) if dt > 0 else None,
            "tokens_per_s": round(self.tokens / dt, 3) if dt > 0 and self.tokens else None,
            "step_time_s": round(dt / steps, 4) if steps > 0 else None,
            "data_wait_s": round(self.data_wait_s / steps, 4) if steps > 0 else None,
            "compute_s": round(self.compute_s / steps, 4) if steps > 0 else None,
            # Model FLOPs (common.flops) per second over all ranks, and their share of the devices'
            # dense bf16 peak (null on CPUs and GPUs without a listed peak).
            "model_tflops_per_s": round(model_flops_per_s / 1e12, 4) if model_flops_per_s else None,
            "mfu": round(model_flops_per_s / peak_flops, 4) if model_flops_per_s and peak_flops else None,
            "measured_steps": steps,
        }


def _val(record: dict | None) -> dict:
    return {k.removeprefix("val_"): v for k, v in (record or {}).items() if k != "step"}


def summarize(cfg, layout, recorder: RunRecorder, *, status: str, error: str | None, wall_s: float,
              checkpoint: str | None, bad_items: list[dict] | None = None,
              resumed_from: str | None = None, previous: dict | None = None, attempt: int = 1) -> dict:
    """The ``summary.json`` of the run contract, for the whole run: a resumed attempt adds its steps
    and validations to the earlier attempts' (``previous``: their summary). Throughput, memory
    and device are this attempt's when it measured them, else the previous summary's; ``wall_s``
    adds up the attempts (``attempt_wall_s``: this one)."""
    history = recorder.earlier_history + recorder.history
    validations = recorder.earlier_validations + recorder.validations
    previous = previous or {}
    throughput = recorder.throughput()
    if not throughput.get("measured_steps") and previous.get("throughput"):
        throughput = previous["throughput"]
    return {
        "recipe": cfg.recipe,
        "run_name": cfg.run.name,
        "status": status,
        "error": error,
        "attempt": attempt,
        "world_size": layout.world_size,
        "data_parallel_size": layout.data_parallel_size,
        "tensor_parallel_size": layout.tensor_parallel_size,
        "strategy": cfg.trainer.strategy._target_.rsplit(".", 1)[-1],
        "accelerator": cfg.trainer.accelerator,
        "precision": cfg.trainer.precision,
        # bf16 compute over fp32 weights: FSDP2's policy (parallel.mixed_precision) or autocast (-mixed).
        "bf16_compute": bool((cfg.parallel and cfg.parallel.mixed_precision is True)
                             or str(cfg.trainer.precision).startswith("bf16")),
        "device": recorder.device_info or previous.get("device", {}),
        "steps": history[-1]["step"] if history else 0,
        "attempt_steps": len(recorder.history),
        "train_loss_first": history[0]["train_loss"] if history else None,
        "train_loss_last": history[-1]["train_loss"] if history else None,
        "val": _val(validations[-1] if validations else None),
        "val_first": _val(validations[0] if validations else None),
        "throughput": throughput,
        "memory": {"per_rank": recorder.per_rank or previous.get("memory", {}).get("per_rank", [])},
        # torch.compile (parallel.compile): graphs compiled on rank 0, and how many came after warm-up.
        "compile": {"graphs": recorder.compile_graphs,
                    "graphs_after_warmup": recorder.compile_graphs - recorder.compile_graphs_at_warmup},
        "data": {
            "skipped": skipped_summary(bad_items or []),
            "padding_efficiency": (round(sum(h["padding_efficiency"] for h in history) / len(history), 4)
                                   if history else None),
        },
        "wall_s": round(wall_s + (previous.get("wall_s") or 0.0), 2),
        "attempt_wall_s": round(wall_s, 2),
        "checkpoint": checkpoint or resumed_from,  # a relaunch that trained no step: the one it resumed
        "resumed_from": resumed_from,
    }


def skipped_summary(bad_items: list[dict], num_examples: int = 10) -> dict:
    """``summary.json``'s ``data.skipped``: distinct bad items (``total``), how many times they were met
    (``times``: a mixed source repeats), count per kind, the first few items with their paths."""
    by_kind: dict[str, int] = {}
    for item in bad_items:
        by_kind[item["kind"]] = by_kind.get(item["kind"], 0) + 1
    return {"total": len(bad_items), "times": sum(item.get("times", 1) for item in bad_items),
            "by_kind": by_kind, "examples": bad_items[:num_examples]}
