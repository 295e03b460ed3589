"""Run by tests/test_train.py in its own process (gloo, one CPU process): accelerate's real `fsdp2_prepare_model`
shards a tiny 4-bit LoRA model layer by layer, with and without lorapipe's `shard_without_copy`. After each
`fully_shard` it notes how many of the already-sharded layers' whole 4-bit weights are still alive when the next
call starts, and at the last (the root's) whether the embedding's whole weight is; then the same with the base
read back from lorapipe's cache of it (train.fsdp_loading cpu). Writes JSON to argv[2]."""

import json
import os
import sys
import weakref
from pathlib import Path

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.fsdp as fsdp_mod  # noqa: E402
from fsdp_helpers import accelerator_for  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from lorapipe import train  # noqa: E402
from lorapipe.config import ModelCfg, QuantCfg  # noqa: E402
from lorapipe.models import _quantized_in_cpu_memory, load_model  # noqa: E402

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
real_fully_shard = fsdp_mod.fully_shard


def cached_base():
    """The base as train.fsdp_loading cpu reads it back from lorapipe's cache (made by the first call)."""
    return _quantized_in_cpu_memory(sys.argv[1], ModelCfg(name_or_path=sys.argv[1]), QuantCfg(), torch.bfloat16)


def shard(patched: bool, cached: bool = False) -> dict:
    import accelerate.accelerator as acc

    model = cached_base() if cached else load_model(sys.argv[1], ModelCfg(name_or_path=sys.argv[1]), QuantCfg(),
                                                    torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = model.base_model.model.model.layers
    whole = {i: [weakref.ref(p.untyped_storage()) for p in layer.parameters() if not p.requires_grad]
             for i, layer in enumerate(layers)}  # the memory, whichever tensor holds it
    embeddings = [weakref.ref(w.untyped_storage())  # tied: one weight
                  for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}]
    done, alive, at_root = [], [], []

    def recording_fully_shard(module, *args, **kwargs):
        # on entry, so after lorapipe's wrapper has finished with the call before
        alive.append(sum(r() is not None for j in done for r in whole[j]))
        if module is model:  # the last call: every other group is sharded
            at_root.append(sum(r() is not None for r in embeddings))
        out = real_fully_shard(module, *args, **kwargs)
        done.extend(i for i, layer in enumerate(layers) if module is layer)
        return out

    accelerator = accelerator_for(model, mesh, torch.device("cpu"))
    saved = acc.fsdp2_prepare_model
    if patched:
        train.shard_without_copy()
    fsdp_mod.fully_shard = recording_fully_shard
    try:
        model = acc.fsdp2_prepare_model(accelerator, model)
    finally:
        fsdp_mod.fully_shard = real_fully_shard
        acc.fsdp2_prepare_model = saved
    loss = model(input_ids=torch.tensor([[1, 5, 9, 3]]), labels=torch.tensor([[1, 5, 9, 3]])).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"layers": len(layers), "whole_alive_at_each_call": alive, "embeddings_alive_at_root": at_root,
            "embeddings": len(embeddings),
            "weights_per_layer": len(whole[0]), "state_dict_keys": len(model.state_dict()),
            "loss": loss.item(), "grads": sum(p.grad is not None for p in trained), "trainable": len(trained)}


cached_base()  # fills the cache (LORAPIPE_CACHE: the test's folder)
result = {"accelerate": shard(patched=False), "lorapipe": shard(patched=True), "cached": shard(True, cached=True)}
Path(sys.argv[2]).write_text(json.dumps(result))
dist.destroy_process_group()
