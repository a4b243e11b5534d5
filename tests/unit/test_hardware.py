"""`auto` accelerator/precision: gloo + fp32 on CPU; on GPU bf16-true with the FSDP2 bf16/fp32 policy."""

import torch
from omegaconf import OmegaConf

from common.train import resolve_hardware


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"accelerator": "auto", "precision": "auto", **trainer},
                             "parallel": {"mixed_precision": "auto"}})


def test_cpu_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg()
    resolve_hardware(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.parallel.mixed_precision) == ("cpu", "32-true", False)


def test_gpu_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg()
    resolve_hardware(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.parallel.mixed_precision) == ("gpu", "bf16-true", True)


def test_explicit_settings_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg(precision="32-true")
    resolve_hardware(cfg)
    assert cfg.trainer.precision == "32-true"
