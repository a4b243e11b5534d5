"""Every layout error is raised before training, with its message, on real torchrun launches (no hang)."""


import pytest

from tests.conftest import run_recipe

CASES = {
    "dp_x_tp_vs_world": (2, ["trainer.devices=4", "trainer.strategy.data_parallel_size=3",
                             "trainer.strategy.tensor_parallel_size=2"],
                         "data_parallel_size (3) x tensor_parallel_size (2) = 6 != world size 4 (devices 4 x num_nodes 1)"),
    "launch_vs_devices": (2, ["trainer.devices=4"],
                          "the launcher started 2 process(es), 2 per node (WORLD_SIZE=2, LOCAL_WORLD_SIZE=2), but trainer.devices (4)"),
    "unknown_strategy": (2, ["trainer.devices=2", "trainer.strategy._target_=lightning.pytorch.strategies.FooStrategy"],
                         "trainer.strategy._target_ is 'lightning.pytorch.strategies.FooStrategy'; supported strategies"),
    "tp_vs_kv_heads": (4, ["trainer.devices=4", "trainer.strategy.data_parallel_size=1",
                           "trainer.strategy.tensor_parallel_size=4"],
                       "tensor_parallel_size (4) must divide the backbone's num_key_value_heads (2)"),
    "tp_vs_heads": (2, ["trainer.devices=2", "trainer.strategy.data_parallel_size=1",
                        "trainer.strategy.tensor_parallel_size=2", "model.llm.num_attention_heads=3",
                        "model.llm.num_key_value_heads=1"],
                    "tensor_parallel_size (2) must divide the backbone's num_attention_heads (3)"),
    "tp_vs_mlp_width": (2, ["trainer.devices=2", "trainer.strategy.data_parallel_size=1",
                            "trainer.strategy.tensor_parallel_size=2", "model.llm.intermediate_size=255"],
                        "tensor_parallel_size (2) must divide the backbone's intermediate_size (255)"),
}


@pytest.mark.parametrize("case", CASES)
def test_layout_error_is_reported_without_hanging(case, tiny_corpus, tmp_path):
    nproc, overrides, message = CASES[case]
    proc = run_recipe("salm_tp_fsdp2", nproc, [*overrides, "logger.wandb=false", f"data.dir={tiny_corpus['dir']}",
                                               "data.generated.num_train=120", "data.generated.num_val=16"],
                      tmp_path / "run", timeout=600)  # no hang: a layout error ends the launch, however loaded the machine
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    # A clear one-line error from our ranks, not a stack dump per rank (torchrun adds its own summary).
    assert 'common/train.py", line' not in proc.stderr and "[rank0]: Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
