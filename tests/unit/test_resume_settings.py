"""Resuming after a default changed: the run names the model settings its checkpoint was written with."""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf

from common.checkpointing import model_settings_changed, resolve_resume


def _checkpoint(path, model: dict):
    torch.save({"run_config": {"model": model}, "state_dict": {}}, path)
    return path


def test_changed_model_settings_are_named_as_the_overrides_that_restore_them(tmp_path):
    old = {"name": "salm", "about": {"parameters": 1}, "projector": {"stack_frames": 2, "ctc_compress": False},
           "lora": None, "gone": 3}
    new = {"name": "salm", "about": {"parameters": 2}, "projector": {"stack_frames": 1, "ctc_compress": True},
           "lora": None, "added": 4}
    ckpt = _checkpoint(tmp_path / "step000003.ckpt", old)
    cfg = OmegaConf.create({"model": new})
    assert model_settings_changed(ckpt, cfg) == [
        "~model.added", "model.gone=3", "model.projector.ctc_compress=False", "model.projector.stack_frames=2"]
    assert model_settings_changed(ckpt, OmegaConf.create({"model": {**old, "about": {}}})) == []
    assert model_settings_changed(tmp_path / "missing.ckpt", cfg) == []  # not one of ours: nothing to say


def test_auto_resume_warns_with_the_checkpoint_settings(tmp_path, caplog):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _checkpoint(run_dir / "checkpoints" / "step000003.ckpt", {"name": "salm", "projector": {"stack_frames": 2}})
    cfg = OmegaConf.create({"run": {"name": "run", "resume": True},
                            "model": {"name": "salm", "projector": {"stack_frames": 1}}})
    with caplog.at_level(logging.WARNING):
        path, step = resolve_resume(cfg, run_dir)
    assert step == 3 and path.endswith("step000003.ckpt")
    assert "resume with the checkpoint's: model.projector.stack_frames=2" in caplog.text
