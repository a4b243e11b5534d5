import pytest
from omegaconf import OmegaConf
from transformers import Qwen3Config

from common.errors import ConfigError
from common.parallel import check_launch, check_tensor_parallel, resolve_layout

MP = "lightning.pytorch.strategies.ModelParallelStrategy"


def trainer_cfg(devices=4, num_nodes=1, dp=2, tp=2, target=MP):
    return OmegaConf.create({"devices": devices, "num_nodes": num_nodes,
                             "strategy": {"_target_": target, "data_parallel_size": dp, "tensor_parallel_size": tp}})


def test_valid_2d_layout():
    layout = resolve_layout(trainer_cfg())
    assert (layout.data_parallel_size, layout.tensor_parallel_size, layout.world_size) == (2, 2, 4)


def test_auto_data_parallel_size_fills_the_world():
    layout = resolve_layout(trainer_cfg(devices=8, num_nodes=2, dp="auto", tp=4))
    assert layout.data_parallel_size == 4


def test_dp_times_tp_must_equal_world_size_message_names_everything():
    with pytest.raises(ConfigError) as e:
        resolve_layout(trainer_cfg(devices=4, dp=3, tp=2))
    assert "data_parallel_size (3) x tensor_parallel_size (2) = 6 != world size 4 (devices 4 x num_nodes 1)" in str(e.value)


def test_unknown_strategy_lists_supported():
    with pytest.raises(ConfigError, match=r"'lightning.pytorch.strategies.FooStrategy'.*ModelParallelStrategy.*DDPStrategy"):
        resolve_layout(trainer_cfg(target="lightning.pytorch.strategies.FooStrategy"))


def test_ddp_layout_is_all_data_parallel():
    cfg = OmegaConf.create({"devices": 2, "num_nodes": 3, "strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}})
    layout = resolve_layout(cfg)
    assert (layout.strategy, layout.data_parallel_size, layout.tensor_parallel_size) == ("ddp", 6, 1)


@pytest.mark.parametrize("devices", [0, -1, "four", None])
def test_devices_must_be_positive_int(devices):
    with pytest.raises(ConfigError, match="trainer.devices must be a positive integer"):
        resolve_layout(trainer_cfg(devices=devices))


def test_launch_must_match_config():
    layout = resolve_layout(trainer_cfg())
    check_launch(layout, env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match=r"started 2 process\(es\), 2 per node.*trainer.devices \(4\)"):
        check_launch(layout, env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})


@pytest.mark.parametrize("field,value,expected", [
    ("num_attention_heads", 6, "num_attention_heads (6)"),
    ("num_key_value_heads", 1, "num_key_value_heads (1)"),
    ("intermediate_size", 255, "intermediate_size (255)"),
])
def test_tp_must_divide_backbone_dims(field, value, expected):
    kwargs = {"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
              "head_dim": 24, "tie_word_embeddings": False}
    kwargs[field] = value
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(4 if field != "intermediate_size" else 2, Qwen3Config(**kwargs), 32)
    assert "tensor_parallel_size" in str(e.value) and expected in str(e.value)


def test_tp_must_divide_vocab_tied_embeddings_and_lora_are_fine():
    cfg = Qwen3Config(num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False)
    with pytest.raises(ConfigError, match=r"vocabulary size \(31\)"):
        check_tensor_parallel(2, cfg, 31)
    check_tensor_parallel(1, cfg, 31)  # no TP: nothing to divide
    cfg.tie_word_embeddings = True  # embedding and LM head both shard vocabulary rows: kept tied under TP
    check_tensor_parallel(2, cfg, 32)
    check_tensor_parallel(2, cfg, 32, lora=True)  # LoRA on column-wise projections (tests/distributed)


def test_lora_on_a_row_wise_projection_is_refused_under_tp_naming_it():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from common.parallel.tensor_parallel import backbone_tp_plan

    llm = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=32))
    ok = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    plan = backbone_tp_plan(ok.get_decoder())
    assert "layers.0.self_attn.q_proj.base_layer" in plan and "layers.0.self_attn.q_proj.lora_B.default" in plan
    assert "layers.0.self_attn.q_proj" not in plan
    llm = Qwen3ForCausalLM(llm.config)
    bad = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    with pytest.raises(ConfigError, match=r"layers.0.self_attn.o_proj.*'rowwise'.*column-wise"):
        backbone_tp_plan(bad.get_decoder())


@pytest.mark.parametrize("recipe", ["asr_ddp", "tts_ddp"])
def test_ddp_yaml_builds_the_same_strategy_as_python(recipe):
    from lightning.pytorch.strategies import DDPStrategy

    from common.parallel import build_strategy
    from tests.conftest import recipe_config

    cfg = recipe_config(recipe)
    from_yaml = build_strategy(cfg.trainer.strategy)
    from_python = DDPStrategy(gradient_as_bucket_view=True, find_unused_parameters=False)
    assert type(from_yaml) is DDPStrategy
    assert from_yaml._ddp_kwargs == from_python._ddp_kwargs == {"gradient_as_bucket_view": True,
                                                                 "find_unused_parameters": False}
    layout = resolve_layout(cfg.trainer)
    assert (layout.strategy, layout.data_parallel_size, layout.tensor_parallel_size) == ("ddp", 2, 1)
