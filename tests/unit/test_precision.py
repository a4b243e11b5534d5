"""bf16-true (the GPU default) converts the whole LightningModule; validation metrics must stay fp32."""

import torch
from torch import nn

from common.models.spec import ModelSpec
from common.module import TrainingModule


class _Recognizer(nn.Module):
    """The smallest model the TrainingModule scores by WER (it has ``generate``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def generate(self, features, feature_mask):
        return [[1]] * features.shape[0]


def test_bf16_true_keeps_metric_states_fp32():
    spec = ModelSpec(name="recognizer", build=None, tokenizer=None, flops=None, activation_values=None, transcribes=True)
    module = TrainingModule(_Recognizer(), tokenizer=None, spec=spec, optim={})
    module.to(dtype=torch.bfloat16)  # what HalfPrecision("bf16-true").convert_module does
    assert module.model.proj.weight.dtype == torch.bfloat16
    assert module.val_wer.errors.dtype == module.val_wer.total.dtype == torch.float32
    assert module.val_loss.mean_value.dtype == torch.float32
    # 1001 reference words with one error: exact in fp32; bf16 counts would round 1001 to 1000.
    module.val_wer.update(["a"] * 1000 + ["b"], ["a"] * 1000 + ["c"])
    assert abs(float(module.val_wer.compute()) - 1 / 1001) < 1e-7
    module.val_loss.update(torch.tensor(1.0, dtype=torch.bfloat16), weight=1001)
    module.val_loss.update(torch.tensor(0.0), weight=1)
    assert abs(float(module.val_loss.compute()) - 1001 / 1002) < 1e-7
