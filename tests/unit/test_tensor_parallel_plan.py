import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from transformers import LlamaConfig, Qwen3Config, Qwen3Model

from common.errors import ConfigError
from common.parallel.tensor_parallel import ReplicateOnShardedActivations, backbone_tp_plan


@pytest.fixture(scope="module")
def backbone():
    return Qwen3Model(Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, intermediate_size=128, vocab_size=32))


def test_hf_plan_is_translated_for_every_layer(backbone):
    plan = backbone_tp_plan(backbone, sequence_parallel=True)
    for i in range(2):
        assert isinstance(plan[f"layers.{i}.self_attn.q_proj"], ColwiseParallel)
        assert isinstance(plan[f"layers.{i}.mlp.up_proj"], ColwiseParallel)
        down = plan[f"layers.{i}.mlp.down_proj"]
        assert isinstance(down, RowwiseParallel) and down.output_layouts == (Shard(1),)  # reduce-scatter to SP
        assert isinstance(plan[f"layers.{i}.self_attn.q_norm"], ReplicateOnShardedActivations)
        assert isinstance(plan[f"layers.{i}.input_layernorm"], SequenceParallel)
        assert isinstance(plan[f"layers.{i}.self_attn"], PrepareModuleInput)
    assert isinstance(plan["norm"], SequenceParallel)
    assert isinstance(plan["layers.0"], PrepareModuleInput)


def test_without_sequence_parallel_rowwise_outputs_are_replicated(backbone):
    plan = backbone_tp_plan(backbone, sequence_parallel=False)
    assert plan["layers.1.self_attn.o_proj"].output_layouts == (Replicate(),)
    assert not any(isinstance(s, SequenceParallel) for s in plan.values())


def test_backbone_without_plan_is_a_clear_error(backbone, monkeypatch):
    monkeypatch.setattr(type(backbone.config), "base_model_tp_plan", None)
    monkeypatch.setattr(backbone, "_tp_plan", None, raising=False)
    with pytest.raises(ConfigError, match="no Hugging Face base_model_tp_plan.*tensor_parallel_size=1"):
        backbone_tp_plan(backbone)


def test_unknown_style_is_a_clear_error(backbone, monkeypatch):
    monkeypatch.setattr(type(backbone.config), "base_model_tp_plan", {"layers.*.mlp.up_proj": "ep_router"})
    with pytest.raises(ConfigError, match="'layers.0.mlp.up_proj' uses style 'ep_router'"):
        backbone_tp_plan(backbone)


def test_llama_plan_is_translated_too():
    from transformers import LlamaModel

    model = LlamaModel(LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=32))
    plan = backbone_tp_plan(model)
    assert isinstance(plan["layers.0.self_attn.k_proj"], ColwiseParallel)
