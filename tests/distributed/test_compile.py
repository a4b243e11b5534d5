"""torch.compile settles: audio padded to the bucket edges and dynamic batch/sequence sizes compile a
bounded number of graphs, all of them in the first pass over the data (a real run, tiny model)."""

from __future__ import annotations

import json

from tests.conftest import jsonl_rows, run_recipe, tiny_overrides

STEPS = 24
BUCKETS = 2


def test_a_compiled_run_stops_compiling_after_the_first_pass(tiny_corpus, tmp_path):
    run_dir = tmp_path / "compiled"
    proc = run_recipe("salm_fsdp2", 1, tiny_overrides(
        tiny_corpus, 1, f"trainer.max_steps={STEPS}", "trainer.strategy.data_parallel_size=1", "parallel.compile=true",
        # Graph counting does not depend on the backend; inductor's C++ compiles take minutes on a CPU.
        "parallel.compile_backend=aot_eager", f"data.num_buckets={BUCKETS}", "trainer.log_every_n_steps=3",
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = jsonl_rows(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    graphs = {r["step"]: r["compiled_graphs"] for r in rows if "compiled_graphs" in r}
    assert sorted(graphs) == list(range(3, STEPS + 1, 3))
    # The step that finished the first pass over the training data (its items, from data.coverage).
    first_pass_items = summary["data"]["coverage"][0]["items"]
    seen, epoch_steps = 0, None
    for r in rows:
        seen += r["utterances"]
        if seen >= first_pass_items:
            epoch_steps = r["step"]
            break
    assert epoch_steps is not None and epoch_steps < STEPS - 6, "the run must reach its second pass"
    # Bounded: an encoder graph per audio length (num_buckets + 1 edges), each possibly twice (a batch
    # of one utterance is specialized), plus the LLM's one dynamic-shape graph (twice likewise).
    bound = 2 * (BUCKETS + 1) + 2
    assert 0 < graphs[STEPS] <= bound, graphs
    # Settled: the last steps, well into the second pass, compiled nothing.
    assert graphs[STEPS] == graphs[STEPS - 6], graphs
    assert summary["compile"]["graphs"] == graphs[STEPS]
    assert summary["status"] == "completed" and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "torch.compile:" in proc.stdout
