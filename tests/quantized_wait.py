"""Run by tests/test_models.py under torchrun, two processes (no process group: they share nothing but the cache
folder). Each loads the base as train.fsdp_loading cpu does, counting bitsandbytes' quantizer calls. argv: model
folder, output JSON prefix, 'short' to make local rank 0 find the disk too short to keep the base."""

import json
import os
import sys
from collections import namedtuple
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch

from lorapipe import models
from lorapipe.config import ModelCfg, QuantCfg

calls = []
real = bnbf.quantize_4bit
bnbf.quantize_4bit = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
rank = os.environ["LOCAL_RANK"]
if sys.argv[3] == "short" and rank == "0":
    usage = namedtuple("usage", "total used free")
    models.shutil = type("shutil", (), {"disk_usage": staticmethod(lambda p: usage(1, 1, 1))})
model = models._quantized_in_cpu_memory(sys.argv[1], ModelCfg(name_or_path=sys.argv[1]), QuantCfg(), torch.bfloat16)
w = model.model.layers[0].mlp.down_proj.weight
Path(f"{sys.argv[2]}-{rank}.json").write_text(json.dumps({
    "quantized": len(calls), "codes": w.view(torch.uint8).to(torch.int64).sum().item(),
    "absmax": w.quant_state.absmax.sum().item(), "base": model.config._name_or_path}))
