"""Runs added to a running server: vLLM's own runtime LoRA loading, behind the checks `serve` makes at start.

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


class Refused(Exception):
    """A run this server will not load; the message says why."""


def admit(plan: dict[str, Any], req: dict[str, Any], cwd: Path, base_info=None) -> dict[str, Any]:
    """The load request vLLM should get for `req`, or Refused. `plan` is the server's serve_plan.json."""
    from lorapipe import serve
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
    problems = serve.check_adapter(run / "adapter", base, base_info)
    if problems:
        raise Refused(f"{run}: vLLM cannot serve this adapter: " + "; ".join(problems))
    rank = int(adapter_config(run)["r"])
    if rank > plan["max_lora_rank"]:
        raise Refused(f"{run}: its rank {rank} is above this server's max_lora_rank {plan['max_lora_rank']}, set at "
                      "start from the runs it serves; restart the server with this run among them")
    extra = serve.adapter_targets(run / "adapter") - set(plan["target_modules"])
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

    def _admit(self, req: dict[str, Any]) -> dict[str, Any]:
        from lorapipe import serve

        if self.base_info is None:  # the base's module shapes, built once on the meta device
            self.base_info = serve.base_modules(self.plan["base"])
        return admit(self.plan, req, self.cwd, self.base_info)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/load_lora_adapter" or scope["method"] != "POST":
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
