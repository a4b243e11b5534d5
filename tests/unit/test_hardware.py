"""`auto` accelerator/precision: gloo + fp32 on CPU; on GPU fp32 master weights with bf16 compute
(FSDP2's bf16/fp32 policy under ModelParallelStrategy, bf16 autocast under DDP); bf16-true is an opt-in.
`auto` asynchronous checkpoint saves: on with a GPU, off on a CPU."""

import torch
from omegaconf import OmegaConf

from common.run import resolve_hardware


def _cfg(**trainer):
    strategy = {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}
    return OmegaConf.create({"trainer": {"accelerator": "auto", "precision": "auto", "strategy": strategy, **trainer},
                             "parallel": {"mixed_precision": "auto"}, "checkpoint": {"async_save": "auto"}})


def test_cpu_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg()
    resolve_hardware(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.parallel.mixed_precision) == ("cpu", "32-true", False)
    assert cfg.checkpoint.async_save is False


def test_gpu_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg()
    resolve_hardware(cfg)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.parallel.mixed_precision) == ("gpu", "32-true", True)
    assert cfg.checkpoint.async_save is True


def test_gpu_defaults_ddp(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto", "precision": "auto",
                                        "strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}},
                            "parallel": None})  # base.yaml: DDP recipes have no parallel block
    resolve_hardware(cfg)
    assert cfg.trainer.precision == "bf16-mixed"


def test_bf16_true_opt_in_turns_the_fsdp2_policy_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg(precision="bf16-true")
    resolve_hardware(cfg)
    assert (cfg.trainer.precision, cfg.parallel.mixed_precision) == ("bf16-true", False)


def test_explicit_settings_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg(precision="32-true")
    resolve_hardware(cfg)
    assert cfg.trainer.precision == "32-true"


def test_explicit_async_save_wins_and_is_a_boolean(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for given, used in ((True, True), ("true", True), (False, False), ("false", False)):
        cfg = _cfg()
        cfg.checkpoint.async_save = given
        resolve_hardware(cfg)
        assert cfg.checkpoint.async_save is used, given


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
