"""RunRecorder: every step gets its row, but values reach the host only at log steps; MFU series."""

import time
from types import SimpleNamespace

import torch

from common.recording import RunRecorder
from tests.conftest import jsonl_rows


class _Logger:  # what Lightning's WandbLogger receives
    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step):
        self.points.append((step, metrics))


def _step(recorder, trainer, module, step, loss):
    trainer.global_step = step
    module.step_shares = {"train_loss": torch.tensor(loss), "train_mel_loss": torch.tensor(loss / 2)}
    module.last_grad_norm = torch.tensor(float(step))
    batch = {"global_num_utterances": 4, "global_audio_s": 8.0, "padding_efficiency": 0.9,
             "batch_fingerprint": f"b{step}", "global_lengths": [(200, 5)] * 4}
    recorder.on_train_batch_start(trainer, module, batch, step)
    time.sleep(0.002)  # elapsed_s has millisecond resolution
    recorder.on_train_batch_end(trainer, module, None, batch, step)


def test_rows_are_written_at_log_steps_with_every_step_and_an_mfu_series(tmp_path):
    from common.flops import ModelFlops

    logger = _Logger()
    trainer = SimpleNamespace(global_step=0, max_steps=7, is_global_zero=True, loggers=[logger], world_size=1)
    module = SimpleNamespace(last_lr=1e-3, device=torch.device("cpu"), model=None)
    recorder = RunRecorder(tmp_path, print_every_n_steps=100, warmup_steps=1, log_every_n_steps=3)
    recorder.t_start = 0.0
    recorder.model_flops = ModelFlops(lambda frames, tokens: [], [])  # no parts: 0 FLOPs (no model here)
    recorder.model_flops.training = lambda lengths: 1e12 * len(lengths)  # 1 TFLOP per utterance
    recorder.peak_flops = 1e12  # pretend a device with a known peak
    metrics = tmp_path / "metrics.jsonl"
    _step(recorder, trainer, module, 1, 4.0)
    _step(recorder, trainer, module, 2, 3.0)
    assert not metrics.exists() and len(recorder.pending) == 2  # values still on the device
    _step(recorder, trainer, module, 3, 2.0)
    rows = jsonl_rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train_loss"] for r in rows] == [4.0, 3.0, 2.0] and rows[2]["train_mel_loss"] == 1.0
    assert [r["grad_norm"] for r in rows] == [1.0, 2.0, 3.0] and rows[0]["model_tflop"] == 4.0
    for step, loss in ((4, 1.5), (5, 1.0), (6, 0.5), (7, 0.25)):  # 7 = max_steps: flushed although not a multiple
        _step(recorder, trainer, module, step, loss)
    rows = jsonl_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["train_loss"] == 0.25
    # wandb: every step's values, and an MFU point per log window past the warm-up.
    assert [s for s, _ in logger.points] == list(range(1, 8))
    mfu = {s: m["mfu"] for s, m in logger.points if "mfu" in m}
    assert set(mfu) == {6, 7} and all(v > 0 for v in mfu.values())  # the first window holds warm-up steps
    assert recorder.throughput()["mfu"] > 0 and recorder.throughput()["model_tflops_per_s"] > 0


def test_a_failed_run_writes_its_pending_rows_without_a_collective(tmp_path):
    trainer = SimpleNamespace(global_step=0, max_steps=100, is_global_zero=True, loggers=[], world_size=1)
    module = SimpleNamespace(last_lr=1e-3, device=torch.device("cpu"), model=None)
    recorder = RunRecorder(tmp_path, log_every_n_steps=10)
    recorder.t_start = 0.0
    _step(recorder, trainer, module, 1, 4.0)
    _step(recorder, trainer, module, 2, 3.0)
    recorder.on_exception(trainer, module, RuntimeError("boom"))
    rows = jsonl_rows(tmp_path / "metrics.jsonl")
    assert [r["train_loss"] for r in rows] == [4.0, 3.0]  # one process: its values are the run's


def test_progress_is_reported_at_the_first_log_step_then_at_most_once_per_interval(tmp_path):
    """summary.json says "running" from the first log step (common.train gives on_progress), then at
    most once a minute: a run killed without warning is still described."""
    from common.recording import Throttle

    recorder = RunRecorder(tmp_path, print_every_n_steps=100, warmup_steps=1, log_every_n_steps=1)
    recorder.t_start = 0.0
    calls = []
    recorder.on_progress = lambda: calls.append(len(recorder.history))
    trainer = SimpleNamespace(global_step=0, max_steps=100, is_global_zero=True, loggers=[])
    module = SimpleNamespace(last_lr=1e-3, device=torch.device("cpu"))
    for step in (1, 2, 3):
        _step(recorder, trainer, module, step, 1.0)
    assert calls == [1]  # the first log step, then nothing within the minute
    recorder.progress_due = Throttle(0.0)
    _step(recorder, trainer, module, 4, 1.0)
    assert calls == [1, 4]
    due = Throttle(3600)
    assert [due(), due()] == [True, False]
