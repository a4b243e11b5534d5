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


def test_restarts_with_the_shared_rendezvous_store_are_warned_about(monkeypatch, caplog):
    import logging

    from common import train

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # what torchrun sets unless told otherwise
    with caplog.at_level(logging.WARNING, logger="common.train"):
        train.warn_if_restarts_reuse_the_store()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    train.warn_if_restarts_reuse_the_store()
    assert not caplog.text
