"""`make export`: a sharded (TP=2 x FSDP2 dp=2) salm checkpoint consolidated into safetensors +
config.json + tokenizer, loaded back in one process: the same weights, logits and transcripts."""

from __future__ import annotations

import json
import subprocess
import sys

import soundfile as sf
import torch
from lhotse import CutSet

from tests.conftest import ROOT, run_recipe, tiny_overrides


def test_export_of_a_sharded_checkpoint_gives_the_same_outputs(tiny_corpus, tmp_path):
    from common.inference import CONFIG_FILE, WEIGHTS_FILE, load_exported, load_model
    from common.tools.transcribe import read_features, transcribe

    run_dir = tmp_path / "run"
    proc = run_recipe("salm_tp_fsdp2", 4, tiny_overrides(tiny_corpus, 4, "trainer.max_steps=3",
                                                        "trainer.limit_val_batches=0", "data.max_tokens=216"), run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.resolve().is_dir() and (ckpt / "meta.pt").exists()  # a DCP directory, a shard per rank

    out = tmp_path / "export"
    make = subprocess.run(["make", "-s", "export", "RECIPE=salm_tp_fsdp2", f"CKPT={ckpt}", f"OUT={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert make.returncode == 0, make.stderr[-3000:]
    assert {CONFIG_FILE, WEIGHTS_FILE, "word_tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_type"] == "salm" and config["global_step"] == 3 and config["data"]["sample_rate"] == 16000

    sharded, tok_a, cfg_a = load_model(ckpt)
    exported, tok_b, cfg_b = load_exported(out)
    assert tok_b.vocab == tok_a.vocab
    a, b = sharded.state_dict(), exported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert exported.llm.lm_head.weight.data_ptr() == exported.llm.get_input_embeddings().weight.data_ptr() or \
        not sharded.llm.config.tie_word_embeddings  # tied weights stay tied

    # Logits and greedy decoding on validation utterances: identical.
    cuts = list(CutSet.from_file(tiny_corpus["val"]))[:3]
    paths = []
    for i, cut in enumerate(cuts):
        paths.append(tmp_path / f"val{i}.wav")
        sf.write(paths[-1], cut.load_audio()[0], 16000)
    feats = [read_features(p, 16000, cfg_a.data.num_mel_bins) for p in paths]
    batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    mask = torch.arange(batch.shape[1])[None] < torch.tensor([len(f) for f in feats])[:, None]
    targets = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok_a.encode(c.supervisions[0].text)) for c in cuts],
                                              batch_first=True, padding_value=tok_a.pad_id)
    target_lens = torch.tensor([len(tok_a.encode(c.supervisions[0].text)) for c in cuts])
    with torch.no_grad():
        logits = []
        for model in (sharded, exported):
            audio, audio_lens, _ = model.encode_audio(batch, mask)
            width = 1 + audio.shape[1] + len(model.prompt_ids) + targets.shape[1]
            logits.append(model._logits(model._sequence(audio, audio_lens, targets, target_lens, width)[0]))
    assert torch.equal(logits[0], logits[1])
    assert sharded.generate(batch, mask) == exported.generate(batch, mask)

    # The transcribe CLI takes the export directory like a checkpoint: the same text.
    cli = subprocess.run([sys.executable, "-m", "common.tools.transcribe", str(out), *map(str, paths)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    texts = [line.split("\t")[1] for line in cli.stdout.splitlines()]
    assert texts == [transcribe(sharded, tok_a, cfg_a, p) for p in paths]

    # Pointed at the run directory itself: refused, and the run's record is untouched.
    before = sorted(p.name for p in run_dir.iterdir())
    summary = (run_dir / "summary.json").read_bytes()
    into_run = subprocess.run(["make", "-s", "export", "RECIPE=salm_tp_fsdp2", f"CKPT={ckpt}", f"OUT={run_dir}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert into_run.returncode != 0 and f"OUT {run_dir} is a run directory" in into_run.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before and (run_dir / "summary.json").read_bytes() == summary
    # Again into the earlier export: replaced in place, nothing left beside it.
    again = subprocess.run(["make", "-s", "export", "RECIPE=salm_tp_fsdp2", f"CKPT={ckpt}", f"OUT={out}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == ["export"]
