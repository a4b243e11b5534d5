"""Run under torchrun: each rank writes the cut ids its data loader yields (2-D mesh dp x tp)."""

import json
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh

from common.data.datamodule import SpeechDataModule
from common.data.sources import parse_sources
from common.data.tokenizer import WordTokenizer

out_dir, train_manifest, val_manifest, dp, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "..", "common", "conf", "base.yaml")).data
cfg.max_duration_s = 15
tok = WordTokenizer.build(["alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"])
sources = {"train": parse_sources(train_manifest, "data.train"), "val": parse_sources(val_manifest, "data.val")}
dm = SpeechDataModule(cfg, tok, sources, seed=0)
dm.trainer = SimpleNamespace(strategy=SimpleNamespace(_device_mesh=mesh), global_rank=rank, world_size=dp * tp)
batches = [b["ids"] for b in dm.train_dataloader()]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"batches": batches, "dp_rank": mesh["data_parallel"].get_local_rank(),
               "tp_rank": mesh["tensor_parallel"].get_local_rank()}, f)
dist.destroy_process_group()
