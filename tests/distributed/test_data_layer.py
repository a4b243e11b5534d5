"""Real 2-process training on user-format data: Shar + NeMo (other rates, stereo, offsets) mixed by
weight, with bad items of every kind; error mode; resuming keeps the data order."""

from __future__ import annotations

import json

import pytest

from common.data.__main__ import main as data_cli
from tests.conftest import jsonl_rows, run_recipe, tiny_overrides
from tests.corpora import BAD_KINDS, tone_cuts, write_bad_items, write_nemo_corpus


@pytest.fixture(scope="module")
def user_data(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("user_data")
    assert data_cli(["to-shar", str(tiny_corpus["train"]), str(root / "shar"), "--shard-size", "40"]) == 0
    nemo, _ = write_nemo_corpus(root, tone_cuts(tiny_corpus["val"], 8))
    bad, paths = write_bad_items(root, tone_cuts(tiny_corpus["train"], 1)[0])
    # Many unreadable items, so that some rank's whole shard is unreadable at some step.
    unreadable = [line for line in bad.read_text().splitlines()
                  if json.loads(line)["audio_filepath"] in (paths["missing_file"], paths["unreadable_audio"])]
    with open(bad, "a") as f:
        f.writelines(line + "\n" for line in unreadable * 6)
    return {"shar": root / "shar", "nemo": nemo, "bad": bad, "paths": paths}


def _sources(user_data) -> list[str]:
    train = (f"data.train=[{{path:{user_data['shar']},weight:2}},{{path:{user_data['nemo']},weight:1}},"
             f"{{path:{user_data['bad']},weight:2}}]")
    return [train, f"data.val=[{user_data['nemo']}]", "data.max_utterance_s=30", "data.max_duration_s=5"]


def test_bad_items_are_skipped_counted_and_all_ranks_keep_step(user_data, tiny_corpus, tmp_path):
    run_dir = tmp_path / "skip"
    # The bad source is 2/5 of the mix and mostly unreadable copies of one item, all in one bucket: in 12
    # steps they can be half of what the ranks load. The guard's own test is below; here it must not stop.
    proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=12", "trainer.val_check_interval=12",
                                                   *_sources(user_data), "data.max_bad_item_fraction=0.9"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = jsonl_rows(run_dir / "metrics.jsonl")
    assert summary["status"] == "completed" and [m["step"] for m in metrics] == list(range(1, 13))
    skipped = summary["data"]["skipped"]
    assert set(skipped["by_kind"]) == set(BAD_KINDS), skipped
    assert len(BAD_KINDS) <= skipped["total"] <= len(BAD_KINDS) + 12  # distinct items (12 extra unreadable copies)
    assert skipped["times"] >= skipped["total"]  # the mix repeats its sources: items are met again
    assert summary["data"]["substituted_batches"] >= 1  # a whole shard was unreadable, and no deadlock
    logged = jsonl_rows(run_dir / "skipped_items.jsonl")
    assert len(logged) == skipped["total"]
    assert {item["path"] for item in logged} >= set(user_data["paths"].values())
    assert "skipping bad data item" in proc.stdout + proc.stderr or "skipped bad data item" in proc.stdout + proc.stderr
    # Validation on the NeMo data (8 kHz, 22 kHz, 44.1 kHz stereo, offsets into one long file) ran.
    assert summary["val"]["loss"] > 0 and 0 < summary["data"]["padding_efficiency"] <= 1
    assert all(0 < m["padding_efficiency"] <= 1 for m in metrics)


def test_unreadable_shards_under_fsdp2_keep_every_collective(user_data, tiny_corpus, tmp_path):
    """The speech-LLM under FSDP2: a rank whose whole shard is unreadable still runs forward/backward
    (all-gathers and reduce-scatters match), with LLM-token-bounded batches."""
    run_dir = tmp_path / "fsdp2"
    proc = run_recipe("salm_fsdp2", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=8", "trainer.limit_val_batches=0",
                                                      *_sources(user_data)[:3], "data.max_tokens=60",
                                                      "data.max_bad_item_fraction=0.9"), run_dir)  # as above
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["data"]["substituted_batches"] >= 1, summary["data"]
    assert {"missing_file", "unreadable_audio"} & set(summary["data"]["skipped"]["by_kind"])  # found by reading


def test_error_mode_stops_and_names_the_file(user_data, tiny_corpus, tmp_path):
    corrupt_only = tmp_path / "corrupt.json"
    corrupt_only.write_text("".join(line + "\n" for line in user_data["bad"].read_text().splitlines()
                                    if user_data["paths"]["unreadable_audio"] in line))
    proc = run_recipe("asr_ddp", 1, tiny_overrides(tiny_corpus, 1, "trainer.max_steps=4", "data.on_bad_item=error",
                                                   f"data.train=[{corrupt_only}]", f"data.val=[{user_data['nemo']}]",
                                                   "trainer.num_sanity_val_steps=0"), tmp_path / "err")
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: bad data item"), proc.stderr[-3000:]
    assert user_data["paths"]["unreadable_audio"] in errors[0] and "unreadable or corrupt audio" in errors[0]


@pytest.fixture(scope="module")
def small_sources(tiny_corpus, tmp_path_factory) -> dict:
    """32 training items in each format users bring: a pass is a handful of steps, so a run crosses it."""
    from lhotse import CutSet

    root = tmp_path_factory.mktemp("small_sources")
    cuts = root / "cuts.jsonl.gz"
    CutSet.from_file(tiny_corpus["train"]).subset(first=32).to_file(cuts)
    assert data_cli(["to-shar", str(cuts), str(root / "shar"), "--shard-size", "12"]) == 0
    nemo, _ = write_nemo_corpus(root, tone_cuts(cuts, 32))
    return {"val": f"[{tiny_corpus['val']}]", "cuts": f"[{cuts}]", "shar": f"[{root / 'shar'}]", "nemo": f"[{nemo}]",
            # Endless by design (each source repeats): its pass boundary is a source's repeat, and
            # the 24-item NeMo share repeats within the first steps.
            "mix": f"[{{path:{root / 'shar'},weight:2}},{{path:{nemo},weight:1}}]"}


def _train_sampler(ckpt) -> dict:
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True)["SpeechDataModule"]["train_sampler"]


@pytest.mark.parametrize("source", ["cuts", "shar", "nemo", "mix"])
def test_resume_after_a_pass_boundary_repeats_the_losses(source, small_sources, tiny_corpus, tmp_path):
    """A checkpoint taken after the first pass ended (tails carried into the second pass; for the
    endless mix, after a source repeated) resumes in another run directory with the same global
    batches and the uninterrupted run's losses to 1e-6: model, optimizer, data position, carried
    cuts (Shar's as the offsets of their audio) and every rank's RNG states."""
    common = ("trainer.max_steps=14", "trainer.limit_val_batches=0", "checkpoint.every_n_steps=1",
              "checkpoint.keep_last=20", "data.max_duration_s=8", f"data.train={small_sources[source]}",
              f"data.val={small_sources['val']}")
    full = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *common), tmp_path / "full")
    assert full.returncode == 0, full.stderr[-4000:]
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("step*.ckpt"))
    states = {int(c.name[4:10]): _train_sampler(c) for c in ckpts}
    if source == "mix":
        step = 8
        assert all(s["epoch"] == 0 for s in states.values())  # one endless pass
    else:
        after = [k for k, s in sorted(states.items()) if s["epoch"] >= 1 and s["sampler"]["carried"] and 0 < s["consumed"]]
        assert after and after[0] <= 10, {k: (s["epoch"], s["consumed"]) for k, s in states.items()}
        step = after[0]
        carried = states[step]["sampler"]["carried"]
        if source == "shar":  # the tails travel as metadata: where their audio is, not the audio
            assert all(c["recording"]["sources"][0]["type"] == "shar" and "recording." in c["recording"]["sources"][0]
                       ["source"] for c in carried)
    resumed = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *common,
                                                      f"run.resume_from={tmp_path / 'full' / 'checkpoints' / f'step{step:06d}.ckpt'}"),
                         tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a = jsonl_rows(tmp_path / "full" / "metrics.jsonl")
    b = jsonl_rows(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(step + 1, 15))
    assert [m["batch"] for m in b] == [m["batch"] for m in a[step:]]  # the same global batches, in order
    for x, y in zip(a[step:], b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-6), x["step"]


def _unreadable_manifest(root, cuts, name: str):
    """A NeMo manifest whose every audio file is corrupt (real texts and durations)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, cut in enumerate(cuts):
        path = d / f"broken{i}.wav"
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
        lines.append(json.dumps({"audio_filepath": str(path), "duration": cut.duration,
                                 "text": cut.supervisions[0].text}))
    manifest = root / f"{name}.json"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_a_run_failing_while_an_async_checkpoint_is_written_keeps_the_previous_one_last(tiny_corpus, tmp_path):
    """Unreadable training data fails the run at step 10 or 20 (the data check), while the asynchronous
    save of step 9 or 18 is still being written (its writer starts 5 s late): that save is not
    published (it stays under its partial name, for the next attempt to remove), and the run's
    newest complete checkpoint, `last`, is the one before it (none at step 10, step 9 at step 20)."""
    from common.checkpoint import PARTIAL_PREFIX, WRITE_DELAY_ENV

    broken_train = _unreadable_manifest(tmp_path, tone_cuts(tiny_corpus["train"], 40), "broken_train")
    run_dir = tmp_path / "run"
    proc = run_recipe("asr_ddp", 1, tiny_overrides(tiny_corpus, 1, "trainer.max_steps=60", "trainer.limit_val_batches=0",
                                                   f"data.train=[{broken_train}]", f"data.val=[{tiny_corpus['val']}]",
                                                   "checkpoint.every_n_steps=9", "checkpoint.async_save=true"),
                      run_dir, timeout=300, extra_env={WRITE_DELAY_ENV: "5"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] in (10, 20), summary["steps"]
    in_flight = 9 if summary["steps"] == 10 else 18
    assert f"step{in_flight:06d}.ckpt was being written when the run failed: not published" in proc.stdout
    ckpts = run_dir / "checkpoints"
    assert (ckpts / f"{PARTIAL_PREFIX}step{in_flight:06d}.ckpt").exists()
    complete = sorted(p.name for p in ckpts.glob("step*.ckpt"))
    if in_flight == 9:
        assert complete == [] and summary["checkpoint"] is None and not (ckpts / "last.ckpt").exists()
    else:
        assert complete == ["step000009.ckpt"] and summary["checkpoint"].endswith("step000009.ckpt")
        assert (ckpts / "last.ckpt").resolve().name == "step000009.ckpt"


def test_a_run_that_cannot_read_its_data_fails_instead_of_completing(tiny_corpus, tmp_path):
    """Every training item unreadable: failed (not 'completed' with loss 0), naming the share and
    an example; a validation set with no readable item: failed at the step-0 validation."""
    train_cuts = tone_cuts(tiny_corpus["train"], 40)
    broken_train = _unreadable_manifest(tmp_path, train_cuts, "broken_train")
    run_dir = tmp_path / "no_train_data"
    proc = run_recipe("asr_ddp", 1, tiny_overrides(tiny_corpus, 1, "trainer.max_steps=60", "trainer.limit_val_batches=0",
                                                   f"data.train=[{broken_train}]", f"data.val=[{tiny_corpus['val']}]"),
                      run_dir, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # Stopped by the periodic check (every 10 steps once 100 items were met), not at the last step.
    assert summary["status"] == "failed" and summary["steps"] in (10, 20), summary["steps"]
    assert "100% of the training items met so far could not be used" in summary["error"]
    assert "data.max_bad_item_fraction=0.5" in summary["error"] and "broken" in summary["error"]
    assert "error: 100% of the training items" in proc.stderr
    assert 'common/train.py", line' not in proc.stderr and "[rank0]: Traceback" not in proc.stderr

    # Launched again, as a restart would: the same failure at the same step. With run.max_failures_at_step=2
    # the next launch is refused before anything starts, naming the step and the error (issue: restart budget).
    budget = tiny_overrides(tiny_corpus, 1, "trainer.max_steps=60", "trainer.limit_val_batches=0",
                            f"data.train=[{broken_train}]", f"data.val=[{tiny_corpus['val']}]", "run.max_failures_at_step=2")
    again = run_recipe("asr_ddp", 1, budget, run_dir, timeout=300)
    assert again.returncode != 0 and json.loads((run_dir / "summary.json").read_text())["steps"] == summary["steps"]
    rows = (run_dir / "attempts.jsonl").read_text()
    refused = run_recipe("asr_ddp", 1, budget, run_dir, timeout=300)
    assert refused.returncode != 0, refused.stderr[-3000:]  # the rank exits 2; torchrun reports 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: the last 2 attempts of {run_dir} failed at step {summary['steps']} (DataQualityError: 100% of the "
        "training items met so far could not be used"), refused.stderr[-3000:]
    assert "not starting it again" in refused.stderr and "run.max_failures_at_step=3" in refused.stderr
    assert (run_dir / "attempts.jsonl").read_text() == rows  # refused before an attempt began

    broken_val = _unreadable_manifest(tmp_path, tone_cuts(tiny_corpus["val"], 8), "broken_val")
    run_dir = tmp_path / "no_val_data"
    proc = run_recipe("asr_ddp", 1, tiny_overrides(tiny_corpus, 1, "trainer.max_steps=4",
                                                   f"data.train=[{tiny_corpus['train']}]", f"data.val=[{broken_val}]"),
                      run_dir, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0
    assert "the validation set has no readable item: 8 of 8 skipped" in summary["error"]


@pytest.mark.parametrize("sampler", ["buckets_2d", "lhotse_1d"])
def test_each_pass_trains_on_every_item_that_passed_the_checks(sampler, tiny_corpus, tmp_path):
    """100 utterances (one used to be 32 per step, the same ones: drop_last kept one bucket):
    a 2-process run covers all of them in each pass, and summary.json says so; with either
    training sampler (lhotse_1d: lhotse's duration buckets, which carry no tails)."""
    from lhotse import CutSet

    hundred = tmp_path / "hundred.jsonl.gz"
    CutSet.from_file(tiny_corpus["train"]).subset(first=100).to_file(hundred)
    run_dir = tmp_path / "hundred"
    proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, "trainer.max_steps=30", "trainer.limit_val_batches=0",
                                                   "data.max_duration_s=30", f"data.train=[{hundred}]",
                                                   f"data.val=[{tiny_corpus['val']}]", f"data.sampler={sampler}",
                                                   # lhotse's 1-D buckets: ~4 items each of 24, one per batch
                                                   *(["data.num_buckets=4"] if sampler == "lhotse_1d" else [])),
                     run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sampler: {sampler}" in (run_dir / "config.yaml").read_text()
    coverage = json.loads((run_dir / "summary.json").read_text())["data"]["coverage"]
    # every item of a pass is in its batches or carried to the start of the next one: none dropped
    assert len(coverage) >= 2 and all(c["used"] == c["passed_checks"] == 100 for c in coverage), coverage
    assert all(c["items"] == 100 - c["carried_out"] + c["carried_in"] for c in coverage)
    assert coverage[1]["carried_in"] == coverage[0]["carried_out"]
    assert "data pass 0: 100 of the 100 items that passed the checks" in proc.stdout + proc.stderr
    batches = [json.loads(x)["batch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(set(batches)) > 5  # not the same batch again and again
    if sampler == "lhotse_1d":
        assert all(c["carried_out"] == c["carried_in"] == 0 for c in coverage), coverage


def test_a_run_from_s3_trains_like_the_same_corpus_on_local_disk(small_sources, tiny_corpus, tmp_path):
    """2-process training from Shar on an S3-compatible store (moto, credentials from the environment)
    takes the same global batches with the same losses as from the local copy, crossing a pass; the
    secret key is in no file of the run directory."""
    from tests.object_store import SECRET_KEY, s3_store

    local = small_sources["shar"].strip("[]")
    common = ("trainer.max_steps=8", "trainer.limit_val_batches=0", "data.max_duration_s=8",
              f"data.val={small_sources['val']}")
    runs = {}
    with s3_store() as store:
        url = store.upload(local, "corpus", "shar/train")
        for name, source in (("s3", url), ("local", local)):
            proc = run_recipe("asr_ddp", 2, tiny_overrides(tiny_corpus, 2, *common, f"data.train=[{source}]"),
                              tmp_path / name, extra_env=store.env)
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[name] = jsonl_rows(tmp_path / name / "metrics.jsonl")
    assert [m["batch"] for m in runs["s3"]] == [m["batch"] for m in runs["local"]] and len(runs["s3"]) == 8
    for a, b in zip(runs["s3"], runs["local"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), a["step"]
    summary = json.loads((tmp_path / "s3" / "summary.json").read_text())
    assert summary["data"]["coverage"][0]["epoch"] == 0  # a whole pass read from S3
    assert "s3://corpus/shar/train" in (tmp_path / "s3" / "config.yaml").read_text()
    for path in (tmp_path / "s3").rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET_KEY.encode() not in path.read_bytes(), path
