"""The run directory is the contract between stages. Everything here writes atomically: temp + rename.

runs/<name>/config.yaml   resolved config      runs/<name>/adapter/   PEFT adapter + tokenizer (+ chat template)
runs/<name>/metrics.json  training summary     runs/<name>/logs/      per-step metrics (jsonl), trainer state
runs/<name>/merged/       merged model         runs/<name>/compare/   base vs fine-tuned answers
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import RunCfg, build_config
from lorapipe.errors import UserError


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; rename it to `final` only if the block succeeds.

    A failed or interrupted step leaves no half-written `final` (the temp folder is removed on error).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"{final}: already exists; pick another name or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        promote(tmp, final, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Rename a finished folder into place; an existing `final` (with overwrite) is swapped out, then removed."""
    if final.exists():
        if not overwrite:
            raise UserError(f"{final}: already exists; pick another name or pass --overwrite")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # code: torch name


def write_safetensors(path: Path, specs: dict[str, tuple[Any, tuple[int, ...]]], tensor: Any) -> int:
    """A safetensors file written one tensor at a time, so that no more than one tensor is in memory: `specs` maps
    each name to its (torch dtype, shape), `tensor(name)` gives its values, or None to leave a hole (zeros on
    read, no disk used: bench's sparse shapes). safetensors' own save_file needs every tensor at once, plus a bytes
    copy of each. Returns the data's size in bytes."""
    import struct

    import torch

    names = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}
    header, end = {}, 0
    for key, (dtype, shape) in specs.items():
        size = dtype.itemsize * math.prod(shape)
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    text = json.dumps({**header, "__metadata__": {"format": "pt"}}).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, (dtype, shape) in specs.items():
            t = tensor(key)
            if t is None:
                f.seek(8 + len(text) + header[key]["data_offsets"][1])
                continue
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: {t.dtype} {tuple(t.shape)} given for {dtype} {tuple(shape)}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.truncate(8 + len(text) + end)
    return end


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: where its disk space can be asked before it is made."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunCfg:
    """Read a finished run's resolved config (plus overrides for eval/serve settings)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: not a lorapipe run directory (no config.yaml); train one with `lorapipe train`")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: has no adapter/ (training did not finish?)")
    text = cfg_path.read_text(encoding="utf-8")
    return build_config(yaml.safe_load(text) or {}, overrides, str(cfg_path), text)


def adapter_config(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "adapter" / "adapter_config.json").read_text())
