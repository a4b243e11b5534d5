"""The GPU precision default, run on CPU: fp32 master weights and optimizer state with bf16 compute
(FSDP2's MixedPrecisionPolicy, applied at dp=1 too), against fp32 and the bf16-true opt-in."""

from __future__ import annotations

import json

from tests.conftest import run_recipe, tiny_overrides

STEPS = 4


def _run(tiny_corpus, root, name, *extra):
    run_dir = root / name
    proc = run_recipe("salm_fsdp2", 1, tiny_overrides(
        tiny_corpus, 1, f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "trainer.strategy.data_parallel_size=1",
        *extra), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(x)["train_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, losses


def test_bf16_compute_keeps_fp32_master_weights_at_dp1(tiny_corpus, tmp_path):
    fp32, fp32_losses = _run(tiny_corpus, tmp_path, "fp32", "parallel.mixed_precision=false")
    mixed, mixed_losses = _run(tiny_corpus, tmp_path, "mixed", "parallel.mixed_precision=true")
    true16, _ = _run(tiny_corpus, tmp_path, "bf16true", "trainer.precision=bf16-true", "parallel.mixed_precision=false")
    state = lambda s: s["memory"]["per_rank"][0]  # noqa: E731
    # Master weights, gradients and AdamW state stay fp32 under the policy; bf16-true halves them.
    for key in ("param_bytes", "grad_bytes"):
        assert state(mixed)[key] == state(fp32)[key] == 2 * state(true16)[key]
    assert state(mixed)["optimizer_state_bytes"] == state(fp32)["optimizer_state_bytes"]
    # The forward really ran in bf16 (not bit-identical to fp32), and trains the same way.
    assert mixed_losses != fp32_losses
    assert all(abs(m - f) <= 0.02 * abs(f) for m, f in zip(mixed_losses, fp32_losses))
    assert mixed_losses[-1] < mixed_losses[0]
    assert (mixed["bf16_compute"], fp32["bf16_compute"], true16["bf16_compute"]) == (True, False, True)
    # Model FLOPs are counted for a model FSDP2 wrapped (its class becomes FSDPSALM).
    assert mixed["throughput"]["model_tflops_per_s"] > 0
