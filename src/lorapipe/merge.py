"""Fuse the LoRA adapter into a full-precision copy of the base: runs/<name>/merged/ (safetensors + tokenizer).

Never merges into 4-bit weights: the base is reloaded unquantized in float32 and the adapter is added there. The
result is saved in float32 by default: a LoRA delta is small next to W, and rounding W + BA back to bf16 erases much
of it (measured on the demo: the bf16 merge agreed with the adapter on 48% of greedy tokens, the float32 merge on
~100%). `dtype="auto"` saves in the base checkpoint's own dtype instead (half the size, less faithful).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe import cards
from lorapipe.errors import UserError
from lorapipe.models import load_model, resolve_model
from lorapipe.runs import atomic_dir, load_run

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    merged_dir: Path
    dtype: str
    params: int


def _checkpoint_dtype(base: str) -> torch.dtype:
    """The dtype the base was published in (config.json), defaulting to bfloat16."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.bfloat16


def run(run_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> MergeResult:
    """Merge runs/<name>/adapter into the full-precision base and save runs/<name>/merged/."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    target = run_dir / "merged"
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to merge again")
    base = resolve_model(cfg.model)
    save_dtype = _checkpoint_dtype(base) if dtype == "auto" else getattr(torch, dtype)
    model = load_model(base, cfg.model, quant=None, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run_dir / "adapter")
    model = model.merge_and_unload()
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"merge left LoRA modules behind: {leftover[:3]}")
    model = model.to(save_dtype)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorapipe_merge.json").write_text(json.dumps(
            {"base": base, "adapter": str((run_dir / "adapter").resolve()), "dtype": str(save_dtype)}, indent=2))
    cards.write(run_dir)  # merged/README.md, and the adapter's card names the merge
    n = sum(p.numel() for p in model.parameters())
    log.info("merged %s into %s (%s, %.1fM params)", run_dir / "adapter", target, save_dtype, n / 1e6)
    return MergeResult(target, str(save_dtype).replace("torch.", ""), n)
