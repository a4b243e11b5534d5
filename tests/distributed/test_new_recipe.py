"""A new recipe is configuration plus one model file (README "Add a recipe"): a recipe directory
and a model module, both written by this test into a temporary directory, train for real on 2
DDP processes, with the MFU counter on its own FLOPs formula; no file of the repository is edited."""

import json
import os
import subprocess
import textwrap

from tests.conftest import ROOT, jsonl_rows, recipe_command, recipe_env, tiny_overrides

MODEL_FILE = '''
"""A toy CTC recognizer: one linear layer from log-mel frames to the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from common.flops import ModelFlops, Part, trainable_share
from common.models.asr_ctc import ctc_greedy_decode
from common.models.spec import LossSums, ModelSpec, bpe_tokenizer, register
from common.parallel.spec import ParallelHooks


class ToyCTC(nn.Module):
    def __init__(self, cfg, tokenizer, num_mel_bins):
        super().__init__()
        self.proj = nn.Linear(num_mel_bins, tokenizer.vocab_size)
        self.blank_id = tokenizer.blank_id
        self.parallel_hooks = ParallelHooks()

    def _log_probs(self, features):
        return self.proj(features).float().log_softmax(-1)

    def forward(self, batch):
        log_probs, lens = self._log_probs(batch["input_features"]), batch["feature_mask"].sum(-1)
        loss = F.ctc_loss(log_probs.transpose(0, 1), batch["target_ids"], lens, batch["target_lens"],
                          blank=self.blank_id, reduction="sum", zero_infinity=True)
        return LossSums(loss, int(batch["target_lens"].sum()))

    @torch.no_grad()
    def generate(self, features, feature_mask):
        return ctc_greedy_decode(self._log_probs(features), feature_mask.sum(-1), self.blank_id)


def toy_flops(model):
    i, o = model.proj.in_features, model.proj.out_features
    return ModelFlops(lambda frames, tokens: [Part(weights=2 * frames * i * o)], [trainable_share([model])])


SPEC = register(ModelSpec(
    name="toy_ctc", build=lambda cfg, tok: ToyCTC(cfg.model, tok, cfg.data.num_mel_bins), tokenizer=bpe_tokenizer,
    flops=toy_flops, activation_values=lambda cfg, model, batch: batch.frames * model.proj.out_features * 3,
    transcribes=True,
))
'''

RECIPE = '''
hydra:
  searchpath: [pkg://common.conf]
defaults:
  - base
  - override hydra/job_logging: none
  - override hydra/hydra_logging: none
  - _self_

recipe: toy_ddp
family: toy_ctc
trainer:
  devices: 2
  strategy:
    _target_: lightning.pytorch.strategies.DDPStrategy
optim:
  lr: 1.0e-2
  betas: [0.9, 0.98]
  weight_decay: 0.0
  warmup_steps: 0
  min_lr_ratio: 0.1
  max_grad_norm: 1.0
model:
  name: toy_ctc
  module: toy_ctc_model
  tokenizer:
    vocab_size: 48
'''


def test_a_recipe_and_model_file_outside_the_repository_train_on_two_processes(tiny_corpus, tmp_path):
    (tmp_path / "toy_ctc_model.py").write_text(textwrap.dedent(MODEL_FILE))
    recipe_dir = tmp_path / "recipes" / "toy_ddp"
    recipe_dir.mkdir(parents=True)
    (recipe_dir / "config.yaml").write_text(RECIPE)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout

    run_dir = tmp_path / "outputs" / "toy"
    env = recipe_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])})
    proc = subprocess.run(recipe_command(recipe_dir, 2, run_dir,
                                         tiny_overrides(tiny_corpus, 2, "trainer.max_steps=2", "trainer.limit_val_batches=0")),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["recipe"], summary["status"], summary["steps"], summary["world_size"]) == ("toy_ddp", "completed", 2, 2)
    rows = jsonl_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["train_loss"] > 0 for r in rows)
    assert rows[0]["model_tflop"] > 0  # the MFU counter uses the model file's own FLOPs formula
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout == before
