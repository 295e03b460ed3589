"""What the FSDP helper scripts (fsdp_copy.py, fsdp_cpu_loading.py) share: the stand-in for the `Accelerator` that
accelerate's own `fsdp2_prepare_model` reads, with the plugin settings lorapipe's FSDP runs use."""

from types import SimpleNamespace

import torch
from accelerate.utils import FullyShardedDataParallelPlugin


def accelerator_for(model, mesh, device: torch.device, main: bool = True) -> SimpleNamespace:
    """What `fsdp2_prepare_model(accelerator, model)` needs of an Accelerator: one shard group per decoder layer."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(model.base_model.model._no_split_modules),
        reshard_after_forward=True, cpu_ram_efficient_loading=False, state_dict_type="SHARDED_STATE_DICT")
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh,
                           parallelism_config=SimpleNamespace(fsdp_dim_names=("dp_shard",)),
                           mixed_precision="bf16", is_main_process=main, device=device)
