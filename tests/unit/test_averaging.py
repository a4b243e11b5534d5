"""The weight average (ema.decay) keeps fp32 where the model is bf16: a bf16 average would not move."""

import lightning as L
import torch

from common.averaging import WeightEMA


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def configure_model(self):  # as the recipes' module has (no sharding here): no warning, no error
        pass


def test_the_average_of_bf16_weights_is_fp32_and_moves_by_each_step():
    module = _Tiny().to(torch.bfloat16)
    ema = WeightEMA(decay=0.999)
    ema.setup(None, module, "fit")
    average = ema._average_model.module
    assert all(p.dtype == torch.float32 for p in average.parameters())
    ema._average_model.update_parameters(module)  # the first update copies
    before = average.layer.weight.detach().clone()
    with torch.no_grad():
        module.layer.weight.add_(1.0)
    ema._average_model.update_parameters(module)
    moved = average.layer.weight - before
    torch.testing.assert_close(moved, torch.full_like(moved, 0.001), rtol=0.02, atol=1e-5)  # (1 - decay) x 1.0
