"""The run layer (common/run.py): one way to build a run, settings checked once, then read-only."""

import pytest
from omegaconf.errors import ReadonlyConfigError

from common.errors import ConfigError
from common.run import RecipeError, build_run, check_run, compose
from tests.conftest import tiny_overrides


def test_check_run_completes_the_config_once_and_then_it_is_read_only():
    cfg = compose("salm_tp_fsdp2", ["run.name=x", "trainer.strategy.data_parallel_size=auto",
                                    "data.max_duration_s_per_gpu=5"])
    checked = check_run(cfg)
    layout = checked.layout
    assert (layout.data_parallel_size, layout.tensor_parallel_size) == (2, 2)
    assert checked.derived == {  # listed for summary.json, beside the completed config
        "trainer.strategy.data_parallel_size": {"given": "auto", "used": 2},
        "trainer.accelerator": {"given": "auto", "used": "cpu"},
        "trainer.precision": {"given": "auto", "used": "32-true"},
        "parallel.mixed_precision": {"given": "auto", "used": False},
        "checkpoint.async_save": {"given": "auto", "used": False},
        "data.max_duration_s": {"given": 30, "used": 20.0}}
    # What the run derives is in the config now (so in its config.yaml), not computed again later.
    assert cfg.trainer.strategy.data_parallel_size == 2 and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.precision == "32-true" and cfg.data.max_duration_s == 5 * 4  # per GPU x world size
    with pytest.raises(ReadonlyConfigError):
        cfg.data.max_duration_s = 1
    with pytest.raises(ReadonlyConfigError):
        cfg.trainer.strategy.data_parallel_size = 4


def test_a_bad_setting_stops_the_check_naming_it():
    with pytest.raises(ConfigError, match=r"data.on_bad_item must be one of skip, error, got 'ignore'"):
        check_run(compose("asr_ddp", ["run.name=x", "data.on_bad_item=ignore"]))
    with pytest.raises(ConfigError, match="data.max_tokens bounds speech-LLM batches by LLM positions; model 'asr_ctc'"):
        check_run(compose("asr_ddp", ["run.name=x", "data.max_tokens=100"]))
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        compose("nope")


def test_build_run_gives_the_data_tokenizer_model_and_spec_a_run_trains_on(tiny_corpus):
    cfg = compose("asr_ddp", ["run.name=x", *tiny_overrides(tiny_corpus, 2)])
    layout = check_run(cfg).layout
    run = build_run(cfg, layout)
    assert run.spec.name == "asr_ctc" and run.spec.transcribes and run.model is not None
    assert [s.path for s in run.sources["train"]] == [str(tiny_corpus["train"])]
    again = build_run(cfg, layout)  # seeded: every rank builds the same weights
    assert all((a == b).all() for a, b in zip(run.model.state_dict().values(), again.model.state_dict().values()))
    loader = run.datamodule(one_rank=True).train_dataloader()
    batch = next(iter(loader))
    assert batch["global_num_utterances"] >= 1 and batch["ids"]
    meta = build_run(cfg, tokenizer=run.tokenizer, device="meta")  # the planner: shapes only, no data prepared
    assert meta.sources is None and next(meta.model.parameters()).is_meta
