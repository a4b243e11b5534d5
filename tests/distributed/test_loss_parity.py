"""Loss parity: the same global batches give the same per-step train_loss in every layout (fp32, CPU, gloo).

What holds across data-parallel sizes, and why: every rank plans the global batches from metadata
alone (common/data/loading.py; Shar items are then fetched by offset, common/data/shar.py), so the
global batch of step N is the same at dp = 1, 2 and 4, with or without TP: the loss, normalised over
the global batch, is the same to float rounding (here 1 = FSDP2 dp2 = TP2 x FSDP2 dp2 with activation
checkpointing). Only
what is summed per rank differs (the order of the gradient reduction), hence the tolerance."""

import json

import pytest

from tests.conftest import jsonl_rows, run_recipe

# TP alone is checked against one process with a real pretrained backbone (SmolLM2, TP 3:
# tests/distributed/test_pretrained_parity.py); the 2-D layout runs with activation checkpointing,
# which must not change a loss either (one 4-process run for both, for CI's time).
LAYOUTS = {  # name: (processes, data_parallel_size, tensor_parallel_size, extra overrides)
    "single": (1, 1, 1, []),
    "fsdp2_dp2": (2, 2, 1, []),
    "tp2_x_fsdp2_dp2": (4, 2, 2, ["parallel.activation_checkpointing=true"]),
}
STEPS = 6
RUN_DIRS: dict = {}  # layout name -> its run directory (filled by the `losses` fixture)


@pytest.fixture(scope="module")
def losses(tiny_corpus, tmp_path_factory):
    out = {}
    for name, (nproc, dp, tp, extra) in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp("parity") / name
        proc = run_recipe("salm_tp_fsdp2", nproc, [
            f"trainer.devices={nproc}", f"trainer.strategy.data_parallel_size={dp}",
            f"trainer.strategy.tensor_parallel_size={tp}", f"trainer.max_steps={STEPS}",
            "trainer.limit_val_batches=0", "logger.wandb=false", "data.max_tokens=216",
            f"data.dir={tiny_corpus['dir']}", "data.generated.num_train=120", "data.generated.num_val=16", *extra,
        ], run_dir)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
        RUN_DIRS[name] = run_dir
        out[name] = jsonl_rows(run_dir / "metrics.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["data_parallel_size"], summary["tensor_parallel_size"]) == (dp, tp)
    return out


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_train_loss_matches_single_process(losses, layout):
    ref, got = losses["single"], losses[layout]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for r, g in zip(ref, got):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4), (layout, r["step"])
        assert g["utterances"] == r["utterances"]  # same global batch
    # and training moves: later losses differ from the first (the optimizer really stepped)
    assert abs(ref[-1]["train_loss"] - ref[0]["train_loss"]) > 1e-3


def test_gradient_norms_match_across_layouts(losses):
    """Clipping sees the same global gradient norm whether parameters are plain, FSDP2 or TP x FSDP2 DTensors."""
    ref = [r["grad_norm"] for r in losses["single"]]
    for layout in ("fsdp2_dp2", "tp2_x_fsdp2_dp2"):
        assert [g["grad_norm"] for g in losses[layout]] == pytest.approx(ref, rel=1e-3), layout


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_memory_plan_matches_measured_bytes(losses, layout):
    """`make plan`'s parameter, gradient and optimizer-state bytes are what each rank really held (within 1%:
    exact quantities; only padding of uneven shards may differ)."""
    from common.tools.plan import plan

    nproc, dp, tp, extra = LAYOUTS[layout]
    summary = json.loads((RUN_DIRS[layout] / "summary.json").read_text())
    result = plan("salm_tp_fsdp2", gpus_per_node=nproc, nodes=1, overrides=["data.max_tokens=216", *extra],
                  precision=summary["precision"], tokenizer=RUN_DIRS[layout] / "tokenizer")
    predicted = next(lay for lay in result["layouts"] if (lay["dp"], lay["tp"]) == (dp, tp))["per_rank"]
    measured = sorted(summary["memory"]["per_rank"], key=lambda r: r["rank"])
    assert [r["rank"] for r in measured] == [r["rank"] for r in predicted] == list(range(nproc))
    for m, p in zip(measured, predicted):
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
            assert abs(p[key] - m[key]) / m[key] <= 0.01, (layout, m["rank"], key, p[key], m[key])


def test_every_rank_holds_about_a_world_share_of_the_training_state(losses):
    """FSDP2 and TP x FSDP2 split parameters, gradients and optimizer state over all ranks: the encoder,
    which TP leaves whole, is sharded over dp x tp ranks, not kept once per TP rank."""
    def state(layout):
        summary = json.loads((RUN_DIRS[layout] / "summary.json").read_text())
        return [r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] for r in summary["memory"]["per_rank"]]

    (total,) = state("single")
    for layout in ("fsdp2_dp2", "tp2_x_fsdp2_dp2"):
        world = LAYOUTS[layout][0]
        assert max(state(layout)) <= 1.05 * total / world, (layout, state(layout), total)
