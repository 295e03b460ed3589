"""Fuse the LoRA adapter into a full-precision copy of the base: runs/<name>/merged/ (safetensors + tokenizer).

Never merges into 4-bit weights: the base is reloaded unquantized in float32 and the adapter is added there. The
result is saved in float32 by default: a LoRA delta is small next to W, and rounding W + BA back to bf16 erases much
of it (measured on the demo: the bf16 merge agreed with the adapter on 48% of greedy tokens, the float32 merge on
~100%). `dtype="auto"` saves in the base checkpoint's own dtype instead (half the size, less faithful).

The merge streams: each tensor of the base's safetensors files is read, has its LoRA delta added in float32 (W +
scaling * B @ A, PEFT's own formula for its plain LoRA), is cast, and each shard is written before the next is read.
So merging needs one shard in memory, not the whole base in float32: 32 GB for an 8B model, 280 GB for 70B (the
in-memory merge below needed that, on the GPU when there was one). A test holds the streamed files equal to PEFT's
`merge_and_unload`. Adapters PEFT's plain formula does not cover (DoRA, per-module ranks, extra trained modules),
and bases not in safetensors, are merged in memory through PEFT as before.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe import cards
from lorapipe.errors import UserError
from lorapipe.models import load_model, param_count, resolve_model
from lorapipe.runs import SAFETENSORS_DTYPES, atomic_dir, load_run, nearest_existing, write_safetensors

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    merged_dir: Path
    dtype: str
    params: int


def checkpoint_dtype(base: str) -> torch.dtype:
    """The dtype the base was published in (config.json), defaulting to bfloat16."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.bfloat16


def run(run_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> MergeResult:
    """Merge runs/<name>/adapter into the full-precision base and save runs/<name>/merged/."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    target = run_dir / "merged"
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to merge again")
    base = resolve_model(cfg.model)
    base_dtype = checkpoint_dtype(base)
    save_dtype = base_dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    check_disk(run_dir, param_count(base, cfg.model), save_dtype, base_dtype)
    plan = _streaming_plan(base, cfg.model, run_dir / "adapter")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        if plan is not None:
            n = _merge_streaming(run_dir / "adapter", *plan, save_dtype, tmp)
            how = "streamed: each safetensors shard of the base with its LoRA deltas added in float32"
        else:
            n = _merge_in_memory(base, cfg, run_dir / "adapter", save_dtype, tmp)
            how = "in memory: PEFT's merge_and_unload on the base loaded in float32"
        tokenizer.save_pretrained(tmp)
        (tmp / "lorapipe_merge.json").write_text(json.dumps(
            {"base": base, "adapter": str((run_dir / "adapter").resolve()), "dtype": str(save_dtype), "how": how},
            indent=2))
    cards.write(run_dir)  # merged/README.md, and the adapter's card names the merge
    log.info("merged %s into %s (%s, %.1fM params; %s)", run_dir / "adapter", target, save_dtype, n / 1e6, how)
    return MergeResult(target, str(save_dtype).replace("torch.", ""), n)


def check_disk(run_dir: Path, params: int, save_dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    """Refuse before writing when the run's disk cannot take the merged model (a 70B base is 280 GB in float32):
    found out now, not when the disk fills minutes in. The old merged/ stays until the new one is complete, so its
    space does not count as free. `run_dir` need not exist yet (preflight asks before training)."""
    need = params * torch.finfo(save_dtype).bits / 8 * 1.01  # + the tokenizer and the files' headers
    folder = nearest_existing(run_dir)
    free = shutil.disk_usage(folder).free
    if need <= free:
        return
    name = {d: str(d).removeprefix("torch.") for d in (save_dtype, base_dtype)}
    hint = ""
    if torch.finfo(base_dtype).bits < torch.finfo(save_dtype).bits:
        smaller = need * torch.finfo(base_dtype).bits / torch.finfo(save_dtype).bits
        hint = (f", or pass --dtype auto (the base's {name[base_dtype]}: about {smaller / 2**30:.1f} GiB; less "
                "faithful to the adapter, see the README's Verify)")
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    raise UserError(f"merge: the merged model in {name[save_dtype]} ({size} parameters) needs about "
                    f"{need / 2**30:.1f} GiB and {folder} has {free / 2**30:.1f} GiB free. Free space there{hint}")


def _merge_in_memory(base: str, cfg, adapter: Path, save_dtype: torch.dtype, out: Path) -> int:
    """PEFT's merge on the whole base in float32 (on the GPU when there is one): for what streaming does not cover."""
    from peft import PeftModel

    model = load_model(base, cfg.model, quant=None, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"merge left LoRA modules behind: {leftover[:3]}")
    model = model.to(save_dtype)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _streaming_plan(base: str, model_cfg, adapter: Path) -> tuple[Path, list[str], dict, float] | None:
    """What the streamed merge needs: the base's folder, its safetensors files, {base weight name:
    (lora A name, lora B name)} and the scaling. None where it does not apply (PEFT then merges in memory): an
    adapter beyond plain LoRA, a base not in safetensors or already quantized, or a LoRA pair that is not a Linear
    weight of the base by name and shape."""
    from safetensors import safe_open

    acfg = json.loads((adapter / "adapter_config.json").read_text())
    plain = (acfg.get("peft_type") == "LORA" and not acfg.get("use_dora") and not acfg.get("fan_in_fan_out")
             and not acfg.get("rank_pattern") and not acfg.get("alpha_pattern") and not acfg.get("modules_to_save")
             and acfg.get("bias", "none") == "none" and not acfg.get("layer_replication")
             and not acfg.get("lora_bias") and (adapter / "adapter_model.safetensors").is_file())
    if not plain:
        return None
    folder = Path(base)
    if not folder.is_dir():  # a Hub id: the files from_pretrained reads, from the Hub cache (training put them
        # there) or downloaded. Named, not "*.safetensors": some repos also hold a second copy of the weights in
        # another layout (Mistral's consolidated.safetensors), and offline, a file in the Hub's listing that
        # training never fetched would make the cached snapshot count as incomplete.
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(base, revision=model_cfg.revision, allow_patterns=[
                "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*-of-*.safetensors"]))
        except Exception as exc:  # noqa: BLE001  (network, auth, a missing revision: PEFT's load says which)
            log.warning("merging in memory: the base's files could not be listed (%s: %s)", type(exc).__name__,
                        str(exc)[:200])
            return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    if not all((folder / name).is_file() for name in files) or not (folder / "config.json").is_file():
        return None  # an incomplete copy: from_pretrained fetches or names what is missing
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        return None  # a pre-quantized base: transformers dequantizes it on load
    shapes = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    pairs = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        names = set(f.keys())
        for a in names:
            if not a.endswith(".lora_A.weight"):
                continue
            b = a.replace(".lora_A.", ".lora_B.")
            target = a.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            fan_in = f.get_slice(a).get_shape()[1]
            fan_out = f.get_slice(b).get_shape()[0] if b in names else None
            if shapes.get(target) != [fan_out, fan_in]:
                return None  # not a plain Linear of this base (an embedding, a renamed module): PEFT knows better
            pairs[target] = (a, b)
        if not pairs or len(names) != 2 * len(pairs):
            return None
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    return folder, files, pairs, scaling


def _merge_streaming(adapter: Path, folder: Path, files: list[str], pairs: dict, scaling: float,
                     save_dtype: torch.dtype, out: Path) -> int:
    """Write each shard of the base with W + scaling * B @ A (in float32) for every LoRA pair, cast to save_dtype,
    one tensor in memory at a time (runs.write_safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from lorapipe import console

    lora = load_file(adapter / "adapter_model.safetensors")  # megabytes: r x (fan_in + fan_out) per module
    n, total, weight_map = 0, 0, {}
    # one bar over the base's bytes: an 8B base may be a single 16 GB file, merged in about 40 s
    bar = tqdm(total=sum(_data_bytes(folder / name) for name in files), desc="merging", unit="B", unit_scale=True,
               file=console.terminal())
    for name in files:
        with safe_open(folder / name, "pt") as f:
            specs = {}
            for key in f.keys():
                t = f.get_slice(key)
                shape = tuple(t.get_shape())
                floating = t.get_dtype() in ("F64", "F32", "BF16", "F16")
                specs[key] = (save_dtype if floating else getattr(torch, SAFETENSORS_DTYPES[t.get_dtype()]), shape)
                n += math.prod(shape)
                weight_map[key] = name

            def merged(key: str) -> torch.Tensor:
                w = f.get_tensor(key)
                bar.update(w.numel() * w.element_size())
                if key in pairs:
                    a, b = (lora[k].float() for k in pairs[key])
                    w = w.float() + scaling * (b @ a)
                return w.to(save_dtype) if w.is_floating_point() else w

            total += write_safetensors(out / name, specs, merged)
    bar.close()
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = AutoConfig.from_pretrained(folder)
    config.dtype = save_dtype
    config.save_pretrained(out)
    if (folder / "generation_config.json").is_file():
        shutil.copy(folder / "generation_config.json", out / "generation_config.json")
    return n


def _data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    import struct

    with open(path, "rb") as f:
        return path.stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]
