"""What vLLM can serve: the adapter checks `serve` makes at start, and the same checks on runs added to a running
server (vLLM's own runtime LoRA loading behind an ASGI middleware).

`lorapipe serve RUN --serve.add_from runs/` starts vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING and this ASGI
middleware (vLLM's `--middleware`). Every `POST /v1/load_lora_adapter` passes through `admit` before vLLM sees it:

    {"lora_name": "b"}                      the finished run runs/b (the first folder of serve.add_from that has it)
    {"lora_name": "b", "lora_path": "runs/b"}   a run directory (relative to the server's working directory)

The run must lie inside a folder named at start and pass what `serve` checks at start (same base, an adapter vLLM
can load, a rank within the server's bucket, LoRA only on modules the server applies it to, the server's chat
template). A refused run gets a 400 answer that says why, and the server keeps serving everyone else; an admitted one
is handed to vLLM as `<run>/adapter` under the run's name. Unloading (`/v1/unload_lora_adapter`) is vLLM's own.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the adapter's weights, read from the safetensors header only."""
    return file_shapes(Path(adapter_dir) / "adapter_model.safetensors")


def adapter_targets(adapter_dir: Path) -> set[str]:
    """The module names (q_proj, ...) that carry LoRA weights in this adapter."""
    return {k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in adapter_shapes(adapter_dir) if ".lora_A." in k}


def check_adapter(adapter_dir: Path, base: str, base_info=None) -> list[str]:
    """What in this adapter vLLM cannot serve over `base`, each as a sentence that says what is wrong."""
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
    shapes = adapter_shapes(adapter_dir)
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


class Refused(Exception):
    """A run this server will not load; the message says why."""


def admit(plan: dict[str, Any], req: dict[str, Any], cwd: Path, base_info=None) -> dict[str, Any]:
    """The load request vLLM should get for `req`, or Refused. `plan` is the server's serve_plan.json."""
    from lorapipe.errors import UserError
    from lorapipe.models import resolve_model
    from lorapipe.runs import adapter_config, load_run

    name, path = req.get("lora_name"), req.get("lora_path")
    roots = [Path(r) for r in plan["add_from"]]
    if not isinstance(name, str) or not name:
        raise Refused("give lora_name: the run's name (a folder under "
                      f"{', '.join(map(str, roots))}), and optionally lora_path: its run directory")
    if path:
        run = Path(path) if Path(path).is_absolute() else cwd / path
        run = run.parent if run.name == "adapter" else run
    else:
        found = [r / name for r in roots if (r / name).is_dir()]
        if not found:
            raise Refused(f"no run named '{name}' under {', '.join(map(str, roots))} (serve.add_from)")
        run = found[0]
    run = run.resolve()
    if not any(run != r and run.is_relative_to(r) for r in roots):
        raise Refused(f"{run} is not inside a folder this server takes runs from ({', '.join(map(str, roots))}; "
                      "serve.add_from at start)")
    try:
        cfg = load_run(run)
        base = resolve_model(cfg.model)
    except UserError as exc:
        raise Refused(str(exc)) from None
    if base != plan["base"]:
        raise Refused(f"{run}: trained on {base}, and this server's base is {plan['base']}")
    problems = check_adapter(run / "adapter", base, base_info)
    if problems:
        raise Refused(f"{run}: vLLM cannot serve this adapter: " + "; ".join(problems))
    rank = int(adapter_config(run)["r"])
    if rank > plan["max_lora_rank"]:
        raise Refused(f"{run}: its rank {rank} is above this server's max_lora_rank {plan['max_lora_rank']}, set at "
                      "start from the runs it serves; restart the server with this run among them")
    extra = adapter_targets(run / "adapter") - set(plan["target_modules"])
    if extra:
        raise Refused(f"{run}: it trains LoRA on {', '.join(sorted(extra))}, and this server applies LoRA to "
                      f"{', '.join(plan['target_modules'])} only (set at start from the runs it serves); restart "
                      "the server with this run among them")
    template_file = run / "adapter" / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else None
    if template != plan["template"]:
        raise Refused(f"{run}: trained with another prompt template than this server's, and vLLM applies one chat "
                      "template per server; serve it separately")
    return {**req, "lora_name": name, "lora_path": str(run / "adapter")}


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "lora_path",
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RunGate:
    """ASGI middleware: `admit` on every load request; everything else passes straight through."""

    def __init__(self, app) -> None:
        self.app = app
        self.plan = json.loads(Path(os.environ["LORAPIPE_SERVE_PLAN"]).read_text())
        self.cwd = Path.cwd()
        self.base_info = None

    @staticmethod
    def _authorized(scope) -> bool:
        import hmac

        key = os.environ.get("VLLM_API_KEY")
        given = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
        return not key or hmac.compare_digest(given, f"Bearer {key}")

    def _admit(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.base_info is None:  # the base's module shapes, built once on the meta device
            self.base_info = base_modules(self.plan["base"])
        return admit(self.plan, req, self.cwd, self.base_info)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/load_lora_adapter" or scope["method"] != "POST" \
                or not self._authorized(scope):  # vLLM's own key check answers the unauthorized (401)
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise Refused("the body must be a JSON object")
            req = await asyncio.to_thread(self._admit, req)  # file checks off the event loop
        except (Refused, ValueError) as exc:
            await _answer(send, 400, str(exc))
            return
        data = json.dumps(req).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(data)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(scope, replay, send)
