"""Resuming after a default changed: the run names the model settings its checkpoint was written with."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from common.checkpoint import model_settings_changed, resolve_resume


def _checkpoint(path, model: dict):
    torch.save({"run_config": {"model": model}, "state_dict": {}}, path)
    return path


def test_changed_model_settings_are_named_as_the_overrides_that_restore_them(tmp_path):
    # a model this version does not register: compared as stored
    old = {"name": "toy", "about": {"parameters": 1}, "projector": {"stack_frames": 2, "ctc_compress": False},
           "lora": None, "gone": 3}
    new = {"name": "toy", "about": {"parameters": 2}, "projector": {"stack_frames": 1, "ctc_compress": True},
           "lora": None, "added": 4}
    ckpt = _checkpoint(tmp_path / "step000003.ckpt", old)
    cfg = OmegaConf.create({"model": new})
    assert model_settings_changed(ckpt, cfg) == [
        "~model.added", "model.gone=3", "model.projector.ctc_compress=False", "model.projector.stack_frames=2"]
    assert model_settings_changed(ckpt, OmegaConf.create({"model": {**old, "about": {}}})) == []
    assert model_settings_changed(tmp_path / "missing.ckpt", cfg) == []  # not one of ours: nothing to say
    # a checkpoint written before settings existed: filled in with what it was trained with (its spec's
    # legacy_settings), so today's run with those values is the same model
    legacy = {"ctc_aux_weight": 0.0, "prompt_format": "plain", "pad_to_multiple_of": 1, "encoder_conv_norm": "auto",
              "llm_init": "pretrained", "ctc_head_vocab": None}
    ckpt = _checkpoint(tmp_path / "step000004.ckpt", {"name": "salm", "projector": {"stack_frames": 2}})
    today = {"name": "salm", "projector": {"stack_frames": 2, "ctc_compress": False, "piece_embeddings": False},
             **legacy}
    assert model_settings_changed(ckpt, OmegaConf.create({"model": today})) == []
    assert model_settings_changed(ckpt, OmegaConf.create({"model": {**today, "projector": {
        "stack_frames": 2, "ctc_compress": True, "piece_embeddings": False}}})) == ["model.projector.ctc_compress=False"]


def test_auto_resume_with_other_model_settings_is_refused_naming_them(tmp_path):
    """Refused before anything in the run directory changes (the checkpoint would not load, or would
    load into another model), with the overrides that resume it."""
    import pytest

    from common.errors import ConfigError

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _checkpoint(run_dir / "checkpoints" / "step000003.ckpt", {"name": "toy", "projector": {"stack_frames": 2}})
    cfg = OmegaConf.create({"run": {"name": "run", "resume": True},
                            "model": {"name": "toy", "projector": {"stack_frames": 1}}})
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(ConfigError, match=r"holds checkpoints of another model than this launch's \(step000003\.ckpt\); "
                                          r"to resume it, launch with its settings: model\.projector\.stack_frames=2"):
        resolve_resume(cfg, run_dir)
    assert sorted(p.name for p in run_dir.rglob("*")) == before
    cfg.model.projector.stack_frames = 2
    path, step = resolve_resume(cfg, run_dir)
    assert step == 3 and path.endswith("step000003.ckpt")


def test_run_resume_from_that_cannot_work_is_one_error_naming_what_it_is(tmp_path):
    import pytest

    from common.checkpoint import check_resume_from
    from common.errors import ConfigError

    cfg = OmegaConf.create({"recipe": "asr_ddp", "model": {"name": "asr_ctc"}, "run": {"resume": True},
                            "trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}})
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "attempts.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    partial = _checkpoint(tmp_path / ".partial-step000004.ckpt", {"name": "asr_ctc"})
    other = _checkpoint(tmp_path / "step000002.ckpt", {"name": "salm"})
    for path, message in ((tmp_path / "gone.ckpt", "no such checkpoint"),
                          (partial, "is an incomplete checkpoint"),
                          (tmp_path / "run", "is a run directory; give one of its checkpoints"),
                          (tmp_path / "notes.txt", "cannot be read"),
                          (other, "is a 'salm' checkpoint (recipe None); this run trains 'asr_ctc'")):
        with pytest.raises(ConfigError, match=f"run.resume_from={path}.* {message}".replace("(", r"\(").replace(")", r"\)")):
            check_resume_from(str(path), cfg)
    cfg.run.resume_from = str(tmp_path / "gone.ckpt")  # resolve_resume refuses it the same way
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(cfg, tmp_path / "run")
