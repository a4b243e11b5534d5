"""Checkpoints with real multi-process runs: atomic checkpoints, auto-resume, exact resume from
asynchronous checkpoints (DDP, FSDP2, TP x FSDP2), resharded resume, damaged checkpoints passed
over. Synchronous saves: every run's last step (and tests/distributed/test_faults.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from common.checkpoint import WRITE_DELAY_ENV
from tests.conftest import jsonl_rows, run_recipe, tiny_overrides


def _metrics(run_dir) -> list[dict]:
    return jsonl_rows(run_dir / "metrics.jsonl")


def _ckpts(run_dir) -> list[str]:
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step*.ckpt"))  # not last.ckpt, unreadable/
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == names[-1]  # links the newest
    return names


def _assert_same_losses(expected: list[dict], got: list[dict], rel: float) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    assert [m["batch"] for m in got] == [m["batch"] for m in expected]  # the same global batches
    for x, y in zip(expected, got):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=rel), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=rel), x["step"]
        assert y["lr"] == pytest.approx(x["lr"], rel=rel), x["step"]


ASR = ("trainer.max_steps=6", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=3", "data.max_duration_s=8")
# Every training-time augmentation and the weight average on: each must resume exactly too.
AUGMENTED = ("data.speed_perturb=[0.9,1.1]", "data.noise={snr_db:[5,20],p:1.0}", "ema.decay=0.9")
ASYNC = "checkpoint.async_save=true"  # the step-3 checkpoints written in the background, the last step's in the loop
# The writer starts 2 s late: steps 4.. have changed the live tensors by then, so an exact resume
# shows that the staged copy of step 3, not the live state, was written.
LATE_WRITER = {WRITE_DELAY_ENV: "2"}


def _assert_async_then_sync(run_dir) -> None:
    """The step-3 save was staged and written in the background (its write done and recorded), the
    last step's was synchronous."""
    saves = json.loads((run_dir / "summary.json").read_text())["checkpoint_saves"]
    assert [(s["step"], s["mode"]) for s in saves] == [(3, "async"), (6, "sync")], saves
    assert saves[0]["write_s"] is not None and saves[0]["stall_s"] >= 0


def test_ddp_auto_resume_is_exact_and_ignores_an_incomplete_checkpoint(tiny_corpus, tmp_path):
    """asr_ddp (speed perturbation, additive noise and SpecAugment drawn per batch, an EMA of the
    weights): stopped after step 3 and started again under the same run name (no flag), steps 4..6
    repeat the uninterrupted run's losses to 1e-6 and end with the same weights and the same average,
    from a step-3 checkpoint written asynchronously (rank 0 wrote its staged copy while steps 4..
    ran). The interrupted attempt also left a half-written step-6 checkpoint: it is never resumed from."""
    full_dir = tmp_path / "full"
    full = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *ASR, *AUGMENTED, ASYNC), full_dir,
                      extra_env=LATE_WRITER)
    assert full.returncode == 0, full.stderr[-4000:]
    assert _ckpts(full_dir) == ["step000003.ckpt", "step000006.ckpt"]  # every 3 steps, and the last one
    _assert_async_then_sync(full_dir)
    summary = json.loads((full_dir / "summary.json").read_text())
    assert summary["checkpoint"].endswith("step000006.ckpt") and summary["resumed_from"] is None
    import torch

    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["global_step"] == 6 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert len(ckpt["rng_states"]) == 2 and {"epoch", "consumed"} <= ckpt["SpeechDataModule"]["train_sampler"].keys()

    # The interrupted attempt: its complete step-3 checkpoint, its records up to step 4, and the
    # debris of a writer killed while saving step 6 (half of the bytes, under the partial name).
    run_dir = tmp_path / "attempt"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full_dir / "checkpoints" / "step000003.ckpt", run_dir / "checkpoints")
    half = (full_dir / "checkpoints" / "step000006.ckpt").read_bytes()
    (run_dir / "checkpoints" / ".partial-step000006.ckpt").write_bytes(half[: len(half) // 2])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics(full_dir)[:4]))

    again = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *ASR, *AUGMENTED), run_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step000003.ckpt") and summary["status"] == "completed"
    # The records continue: steps 1..3 of the attempt, then 4..6 trained again (step 4's old row dropped).
    _assert_same_losses(_metrics(full_dir), _metrics(run_dir), rel=1e-6)
    assert _ckpts(run_dir) == ["step000003.ckpt", "step000006.ckpt"]  # debris replaced by a complete one
    # The same trained weights and the same average: state_dict is the EMA (what export and the test
    # sets read), current_model_state the weights training continues from; they differ.
    ends = [torch.load(d / "checkpoints" / "step000006.ckpt", map_location="cpu", weights_only=True)
            for d in (full_dir, run_dir)]
    assert int(ends[1]["averaging_state"]["n_averaged"]) == 6
    for key in ("state_dict", "current_model_state"):
        for name, value in ends[0][key].items():
            torch.testing.assert_close(ends[1][key][name], value, rtol=1e-5, atol=1e-7, msg=f"{key} {name}")
    assert any(not torch.equal(ends[0]["state_dict"][n], v) for n, v in ends[0]["current_model_state"].items())
    # Inference reads the average; --weights trained (python -m common.tools.score) the other set.
    from common.inference import STATE_PREFIX, load_model

    path = full_dir / "checkpoints" / "step000006.ckpt"
    for weights, key in (("average", "state_dict"), ("trained", "current_model_state")):
        model = load_model(path, weights=weights)[0]
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, ends[0][key][STATE_PREFIX + name], rtol=0, atol=0)

    # run.resume=false: the same name starts afresh (step 1), the old checkpoints moved aside.
    fresh = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *ASR, *AUGMENTED, "run.resume=false",
                                                    "checkpoint.every_n_steps=1000"), run_dir)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is None
    _assert_same_losses(_metrics(full_dir), _metrics(run_dir), rel=1e-6)  # also: a fresh run is deterministic
    assert _ckpts(run_dir) == ["step000006.ckpt"]
    assert len(list(tmp_path.glob("attempt/checkpoints.replaced-*/step000003.ckpt"))) == 1


SALM = ("trainer.max_steps=6", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=3", "data.max_tokens=216")


def test_tp_fsdp2_resume_from_a_sharded_checkpoint_is_exact_and_passes_a_damaged_one(tiny_corpus, tmp_path):
    """salm_tp_fsdp2 (TP=2 x FSDP2 dp=2, 4 processes): DCP checkpoint directories, the step-3 one
    written asynchronously (each rank's staged shards, over the writers' own gloo group), resumed
    under the same run name: steps 4..6 equal the uninterrupted run's to 1e-6. The attempt's newer
    step-6 checkpoint has a shard cut short (a full disk): it is set aside into
    checkpoints/unreadable/, and the run resumes from step 3 instead of failing on it."""
    full_dir, run_dir, _ = _run_then_resume_from_step3("salm_tp_fsdp2", 4,
                                                       tiny_overrides(tiny_corpus, 4, *SALM, ASYNC), tmp_path,
                                                       damaged_step6=True)
    _assert_async_then_sync(full_dir)
    step3 = full_dir / "checkpoints" / "step000003.ckpt"
    assert step3.is_dir() and (step3 / "meta.pt").exists() and _ckpts(full_dir) == ["step000003.ckpt",
                                                                                     "step000006.ckpt"]
    _assert_same_losses(_metrics(full_dir)[3:], _metrics(run_dir), rel=1e-6)
    (aside,) = (run_dir / "checkpoints" / "unreadable").iterdir()
    assert aside.name.startswith("step000006.ckpt.") and aside.is_dir()
    assert _ckpts(run_dir) == ["step000003.ckpt", "step000006.ckpt"]  # step 6 written again, complete


def _run_then_resume_from_step3(recipe: str, nproc: int, overrides: list[str], tmp_path, damaged_step6: bool = False):
    """A full 6-step run (a late background writer, if the overrides save asynchronously), then a
    new attempt resumed from its step-3 checkpoint (:func:`_resume_step3_in`)."""
    full_dir, run_dir = tmp_path / "full", tmp_path / "attempt"
    full = run_recipe(recipe, nproc, overrides, full_dir, extra_env=LATE_WRITER)
    assert full.returncode == 0, full.stderr[-4000:]
    _resume_step3_in(full_dir, recipe, nproc, overrides, run_dir, damaged_step6=damaged_step6)
    return full_dir, run_dir, full


def test_fsdp2_checkpoint_resumes_resharded_under_tp_x_fsdp2(tiny_corpus, tmp_path):
    """A salm checkpoint written (asynchronously, by a late writer) by FSDP2 over 4 ranks resumes under
    TP=2 x FSDP2 dp=2 and in one process with plain parameters (DCP reshards model and optimizer
    state on load); steps 4..6 match the FSDP2 run to 1e-4."""
    fsdp_dir = tmp_path / "fsdp2_dp4"
    first = run_recipe("salm_fsdp2", 4, tiny_overrides(tiny_corpus, 4, *SALM, "trainer.strategy.data_parallel_size=4",
                                                       ASYNC), fsdp_dir, extra_env=LATE_WRITER)
    assert first.returncode == 0, first.stderr[-4000:]
    _assert_async_then_sync(fsdp_dir)
    run_dir = tmp_path / "tp2_dp2"
    _resume_step3_in(fsdp_dir, "salm_tp_fsdp2", 4, tiny_overrides(tiny_corpus, 4, *SALM), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["tensor_parallel_size"] == 2
    _assert_same_losses(_metrics(fsdp_dir)[3:], _metrics(run_dir), rel=1e-4)

    one_dir = tmp_path / "one_process"
    one = _resume_step3_in(fsdp_dir, "salm_fsdp2", 1, tiny_overrides(tiny_corpus, 1, *SALM,
                                                                     "trainer.strategy.data_parallel_size=1"), one_dir)
    assert "(one process, no FSDP2)" in one.stdout
    _assert_same_losses(_metrics(fsdp_dir)[3:], _metrics(one_dir), rel=1e-4)


def _resume_step3_in(source_dir, recipe: str, nproc: int, overrides: list[str], run_dir, damaged_step6: bool = False):
    """A new run directory holding ``source_dir``'s step-3 checkpoint (``damaged_step6``: and its
    newer step-6 one with a shard cut to half, which must be passed over), resumed from step 3 by ``recipe``."""
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (3, 6) if damaged_step6 else (3,):
        name = f"step{step:06d}.ckpt"
        shutil.copytree(source_dir / "checkpoints" / name, run_dir / "checkpoints" / name)
    if damaged_step6:
        shard = max((run_dir / "checkpoints" / "step000006.ckpt").glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_recipe(recipe, nproc, overrides, run_dir)
    if damaged_step6:
        assert "step000006.ckpt cannot be read (shard" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("step000003.ckpt")
    return proc


def test_one_process_model_parallel_run_resumes_exactly_and_under_fsdp2(tiny_corpus, tmp_path):
    """salm_fsdp2 on one CPU process (dp=1, as on a laptop): plain parameters, no FSDP2 (it would
    shard nothing and cost ~10% of the step, bench/README.md). Its DCP checkpoint, written
    asynchronously, resumes exactly (steps 4..6 equal the uninterrupted run's: the strategy loads
    into plain parameters, common.parallel.strategy), and resumes under FSDP2 over 2 ranks too
    (DCP reshards; 1e-4 as any resharded resume)."""
    one = tiny_overrides(tiny_corpus, 1, *SALM, "trainer.strategy.data_parallel_size=1", ASYNC)
    full_dir, run_dir, full = _run_then_resume_from_step3("salm_fsdp2", 1, one, tmp_path)
    _assert_same_losses(_metrics(full_dir)[3:], _metrics(run_dir), rel=1e-6)
    _assert_async_then_sync(full_dir)
    assert "dp=1 (one process, no FSDP2)" in full.stdout

    dp2_dir = tmp_path / "fsdp2_dp2"
    dp2 = _resume_step3_in(full_dir, "salm_fsdp2", 2, tiny_overrides(tiny_corpus, 2, *SALM,
                                                                     "trainer.strategy.data_parallel_size=2"), dp2_dir)
    assert "dp=2 (FSDP2)" in dp2.stdout
    _assert_same_losses(_metrics(full_dir)[3:], _metrics(dp2_dir), rel=1e-4)
