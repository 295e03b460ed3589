"""Run by tests/test_distributed.py under torchrun, two processes sharing one GPU (gloo: NCCL refuses two ranks on
one device). Each loads a 4-bit LoRA model on the GPU, then in CPU memory (train.fsdp_loading cpu), and shards it with
accelerate's real `fsdp2_prepare_model` over both processes; then one forward and backward. Rank 0 writes JSON to
argv[2]: per loading, the GPU memory after loading, where every tensor ended up, the shard's shape, loss and
gradients."""

import json
import sys
from pathlib import Path

import accelerate.accelerator as acc
import torch
import torch.distributed as dist
from fsdp_helpers import accelerator_for
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh

from lorapipe import train
from lorapipe.config import ModelCfg, QuantCfg
from lorapipe.models import load_model

dist.init_process_group("gloo")
torch.cuda.set_device(0)
mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
train.shard_without_copy()


def shard(on_cpu: bool) -> dict:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_model(sys.argv[1], ModelCfg(name_or_path=sys.argv[1]), QuantCfg(), torch.bfloat16, on_cpu=on_cpu)
    after_load = torch.cuda.memory_allocated() - before
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    whole = tuple(q.weight.shape)
    model = acc.fsdp2_prepare_model(accelerator_for(model, mesh, torch.device("cuda", 0), dist.get_rank() == 0),
                                    model)
    qs = q.quant_state
    devices = {str(t.device) for t in [*model.parameters(), *model.buffers(), qs.absmax, qs.code, qs.state2.absmax]}
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]], device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"gpu_after_load": after_load, "devices": sorted(devices), "whole": whole,
            "shard": list(q.weight.to_local().shape), "loss": loss.item(),
            "grads": sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained),
            "trainable": len(trained)}


result = {"gpu": shard(on_cpu=False), "cpu": shard(on_cpu=True)}
if dist.get_rank() == 0:
    Path(sys.argv[2]).write_text(json.dumps(result))
dist.destroy_process_group()
