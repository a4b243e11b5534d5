"""data=librispeech: lhotse's LibriSpeech recipe manifests (the names `lhotse prepare librispeech` writes)
are what a run reads; a missing part is a clear error naming the file."""

import json

from lhotse import CutSet

from tests.conftest import run_recipe

PARTS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean")


def _write_librispeech_manifests(tiny_corpus, manifests):
    """The tiny corpus' audio as recordings + supervisions manifests named as lhotse's recipe names them."""
    manifests.mkdir(parents=True)
    train = CutSet.from_file(tiny_corpus["train"]).to_eager()
    val = CutSet.from_file(tiny_corpus["val"]).to_eager()
    for part in PARTS:
        cuts = val if part == "dev-clean" else train
        cuts.decompose()[0].to_file(manifests / f"librispeech_recordings_{part}.jsonl.gz")
        cuts.decompose()[1].to_file(manifests / f"librispeech_supervisions_{part}.jsonl.gz")


def test_librispeech_preset_trains_from_recipe_manifests(tiny_corpus, tmp_path):
    data_dir = tmp_path / "data"
    _write_librispeech_manifests(tiny_corpus, data_dir / "librispeech" / "manifests")
    run_dir = tmp_path / "run"
    proc = run_recipe("asr_ddp", 1, ["trainer.devices=1", "logger.wandb=false", "data=librispeech",
                                     f"data.dir={data_dir}", "data.max_duration_s=12", "trainer.max_steps=3",
                                     "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    config = (run_dir / "config.yaml").read_text()
    assert f"{data_dir}/librispeech/manifests/librispeech_recordings_train-other-500.jsonl.gz" in config


def test_librispeech_preset_without_manifests_names_the_missing_file(tmp_path):
    proc = run_recipe("asr_ddp", 1, ["trainer.devices=1", "logger.wandb=false", "data=librispeech",
                                     f"data.dir={tmp_path / 'empty'}"], tmp_path / "run", timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "data.train" in errors[0] and "librispeech_recordings_train-clean-100.jsonl.gz" in errors[0], \
        proc.stderr[-3000:]
