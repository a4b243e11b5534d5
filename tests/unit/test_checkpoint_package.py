"""The checkpoint package's parts on their own: Lightning's private API it relies on is there, publishing
and pruning keep only complete names, signals agree, and test faults come only from the caller."""

import re
import signal
from pathlib import Path

import lightning
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from common.checkpoint import (
    HOLD_STEP_ENV,
    LAST_LINK,
    PARTIAL_PREFIX,
    WRITE_DELAY_ENV,
    FaultHooks,
    RunCheckpoint,
)
from common.checkpoint.files import complete_checkpoints, partial_path
from common.checkpoint.lightning_api import CHECKED_AGAINST, PRIVATE_NAMES
from common.checkpoint.preemption import GO_ON, SIGINT, SIGTERM, StopSignal
from common.checkpoint.publish import prune, publish, remove_unfinished

ROOT = Path(__file__).resolve().parents[2]


def test_lightning_private_api_is_the_one_checked():
    # constraints.txt pins Lightning; a new pin must re-check lightning_api.py and update CHECKED_AGAINST.
    pinned = next(line.split("==")[1].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if line.startswith("lightning=="))
    assert pinned == CHECKED_AGAINST == lightning.__version__
    for name in PRIVATE_NAMES:
        assert callable(getattr(ModelCheckpoint, name, None)), name
    trainer = lightning.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1)
    assert callable(trainer._checkpoint_connector.dump_checkpoint)
    cb = ModelCheckpoint()
    assert cb._last_global_step_saved == 0 and cb._last_checkpoint_saved == ""


def test_private_api_is_called_only_in_its_adapter():
    for path in (ROOT / "common" / "checkpoint").glob("*.py"):
        if path.name == "lightning_api.py":
            continue
        text = path.read_text()
        for name in (*PRIVATE_NAMES, "_checkpoint_connector", "_last_global_step_saved", "_last_checkpoint_saved"):
            assert not re.search(rf"(?<!\w){name}\b", text), f"{path.name} calls Lightning's {name}: go through lightning_api.py"


def test_publish_then_prune_keep_only_complete_names(tmp_path):
    final = tmp_path / "step000004.ckpt"
    partial = partial_path(final)
    assert partial.name == PARTIAL_PREFIX + final.name
    partial.mkdir()
    (partial / "meta.pt").write_bytes(b"x")
    assert complete_checkpoints(tmp_path) == []  # a partial one is never a candidate
    publish(partial, final)
    assert complete_checkpoints(tmp_path) == [(4, final)] and not partial.exists()
    assert (tmp_path / LAST_LINK).resolve() == final.resolve()
    older = tmp_path / "step000002.ckpt"
    older.write_bytes(b"y")
    prune(older)
    prune(older)  # already gone: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_LINK, final.name]
    (tmp_path / (PARTIAL_PREFIX + "step000006.ckpt")).write_bytes(b"z")  # an earlier attempt's writer was killed
    remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_LINK, final.name]


def test_stop_signal_outside_a_process_group():
    stop = StopSignal(grace_s=3600)
    assert stop.agreed("cpu") == GO_ON
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop.install()
        signal.raise_signal(signal.SIGTERM)
        assert stop.name == "SIGTERM" and stop.agreed("cpu") == SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    exc = StopSignal.preempted(SIGINT, 7, "ckpt/step000007.ckpt")
    assert exc.status == "interrupted" and "after step 7" in str(exc) and "ckpt/step000007.ckpt" in str(exc)
    assert StopSignal.preempted(SIGTERM, 7, None).status == "preempted"


def test_faults_come_from_the_caller_never_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(HOLD_STEP_ENV, "3")
    monkeypatch.setenv(WRITE_DELAY_ENV, "2.5")
    assert RunCheckpoint(tmp_path, every_n_steps=1, keep_last=1).faults == FaultHooks()  # library code: no env
    assert FaultHooks.from_env({HOLD_STEP_ENV: "3", WRITE_DELAY_ENV: "2.5"}) == FaultHooks(3, 2.5)
    assert FaultHooks.from_env({}) == FaultHooks(-1, 0.0)
    with pytest.raises(ValueError):
        FaultHooks.from_env({HOLD_STEP_ENV: "three"})


@pytest.mark.parametrize("at_end,every_n,saved", [(True, 100, True), (False, 100, False), (False, 4, True),
                                                  (False, 2, True)])
def test_the_last_step_saves_when_asked_or_scheduled(tmp_path, at_end, every_n, saved):
    """checkpoint.at_end=false drops only the extra save at the end: a save the schedule puts on the
    last step is still made (it once left a run of every_n_steps == max_steps with no checkpoint)."""
    from types import SimpleNamespace

    cb = RunCheckpoint(tmp_path, every_n_steps=every_n, keep_last=1, at_end=at_end)
    calls = []
    cb.save_now = lambda trainer: calls.append(trainer.global_step)
    trainer = SimpleNamespace(global_step=4, max_steps=4, strategy=SimpleNamespace(root_device="cpu"))
    cb.on_train_batch_end(trainer, None, None, None, 3)
    assert calls == ([4] if saved else [])
