"""`lorapipe bench abuse RUN`: the server under hostile input and under load, over loopback, bounded.

Starts `lorapipe serve` (vLLM's OpenAI server through lorapipe's plan) for the run plus a copy of it under a second
name, so that traffic spans the base and two adapters, and then:
  1. hostile: N malformed or hostile requests, cycling through the kinds in `HOSTILE` (bad JSON, wrong types,
     prompts far past max_model_len, negative or absurd sampling values, unknown models, wrong methods and content
     types, cut-off connections, clients that vanish mid-stream), from 16 threads. Counted: answers by status class,
     any 5xx, and whether the server still answers a normal request afterwards;
  2. load: C concurrent clients send R chat requests over base + the two adapters; every answer must be a 200 with
     content and usage, ending on "stop" or "length".
What the server answers is what vLLM answers: lorapipe adds no validation of its own in front of it.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe import serve as serving


def _chat(model: str, content: str = "Write a function that returns 1.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def hostile_requests(models: list[str], huge: int) -> list[tuple[str, str, str, Any]]:
    """(kind, method, path, body): body is a dict (sent as JSON), bytes (sent as is), or a marker for the raw
    socket kinds ("cut", "vanish")."""
    m = models[-1]
    big = "word " * huge
    return [
        ("bad json", "POST", "/v1/chat/completions", b'{"model": "' + m.encode() + b'", "messages": [{"role": '),
        ("not json", "POST", "/v1/chat/completions", b"\x00\xff\xfe garbage \xc3\x28"),
        ("empty body", "POST", "/v1/chat/completions", b""),
        ("messages wrong type", "POST", "/v1/chat/completions", {"model": m, "messages": "hello"}),
        ("content wrong type", "POST", "/v1/chat/completions", {"model": m, "messages": [{"role": 5, "content": 7}]}),
        ("max_tokens string", "POST", "/v1/chat/completions", _chat(m, max_tokens="many")),
        ("max_tokens negative", "POST", "/v1/chat/completions", _chat(m, max_tokens=-1)),
        ("max_tokens absurd", "POST", "/v1/chat/completions", _chat(m, max_tokens=10**12)),
        ("temperature negative", "POST", "/v1/chat/completions", _chat(m, temperature=-5)),
        ("top_p out of range", "POST", "/v1/chat/completions", _chat(m, top_p=7.5)),
        ("n absurd", "POST", "/v1/chat/completions", _chat(m, n=10**9)),
        ("logprobs absurd", "POST", "/v1/chat/completions", _chat(m, logprobs=True, top_logprobs=10**6)),
        ("nan temperature", "POST", "/v1/chat/completions",
         b'{"model": "' + m.encode() + b'", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        ("huge prompt", "POST", "/v1/chat/completions", _chat(m, big)),
        ("huge completion prompt", "POST", "/v1/completions", {"model": m, "prompt": big, "max_tokens": 4}),
        ("unknown model", "POST", "/v1/chat/completions", _chat("no-such-model")),
        ("unknown route", "POST", "/v1/nothing-here", _chat(m)),
        ("wrong method", "GET", "/v1/chat/completions", None),
        ("deep nesting", "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("bad adapter load", "POST", "/v1/load_lora_adapter", {"lora_name": "../../etc", "lora_path": "/etc"}),
        ("cut-off request", "RAW", "/v1/chat/completions", ("cut", m)),
        ("vanish mid-stream", "RAW", "/v1/chat/completions", ("vanish", m)),
    ]


def _send(host: str, port: int, key: str | None, method: str, path: str, body: Any,
          timeout: float = 120) -> int | None:
    """One request; the status, or None for the raw-socket kinds (nothing to read back)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if method == "RAW":
        return _raw(host, port, key, path, *body)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _raw(host: str, port: int, key: str | None, path: str, how: str, model: str) -> None:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    body = json.dumps(_chat(model, max_tokens=64, stream=True)).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=30) as s:
        if how == "cut":
            s.sendall(head + body[: len(body) // 2])  # promised more than it sends, then goes away
        else:
            s.sendall(head + body)
            s.recv(64)  # the stream has started
        s.shutdown(socket.SHUT_RDWR)
    return None


@dataclass
class AbuseResult:
    rows: list[dict[str, Any]]
    server_5xx: int
    errors: int
    alive_after: bool


def run(run_dir: Path, work: Path, hostile: int = 1000, clients: int = 64, requests: int = 192, port: int = 8000,
        max_tokens: int = 16, huge: int = 40_000, overrides: dict[str, Any] | None = None) -> AbuseResult:
    """Serve the run (+ a copy under a second name), send `hostile` hostile requests, then `requests` chat
    requests from `clients` concurrent clients over the base and both adapters."""
    work.mkdir(parents=True, exist_ok=True)
    twin = work / f"{run_dir.name}-b"
    if not twin.exists():
        shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("merged", "eval", "compare", "generate"))
    p = serving.plan([run_dir, twin], {"serve.port": port, **(overrides or {})})
    key = serving.api_key(p.serve)
    host = p.serve.host
    rows: list[dict[str, Any]] = []
    with serving.running(p, work / "serve.log") as server:
        models = server.models
        kinds = hostile_requests(models, huge)
        jobs = [kinds[i % len(kinds)] for i in range(hostile)]
        t = time.perf_counter()

        def one(job) -> tuple[str, str]:
            kind, method, path, body = job
            try:
                status = _send(host, port, key, method, path, body)
            except (OSError, http.client.HTTPException) as exc:
                return kind, f"client error {type(exc).__name__}"
            return kind, "no answer (by design)" if status is None else f"{status // 100}xx"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, jobs))
        seconds = time.perf_counter() - t
        by_kind: dict[str, Counter] = {}
        for kind, outcome in outcomes:
            by_kind.setdefault(kind, Counter())[outcome] += 1
        for kind, c in by_kind.items():
            rows.append({"phase": "hostile", "what": kind, "requests": sum(c.values()),
                         "answers": ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))})
        five = sum(1 for _, o in outcomes if o == "5xx")
        client_errors = sum(1 for _, o in outcomes if o.startswith("client error"))
        alive = server.process.poll() is None and _healthy(server.url, models[-1], key)
        rows.append({"phase": "hostile", "what": "TOTAL", "requests": hostile,
                     "answers": f"5xx x{five}, client errors x{client_errors}, {seconds:.1f} s; server answers "
                                f"afterwards: {alive}"})

        # load: every client sends its share of the requests, spread over base + both adapters
        t = time.perf_counter()

        def ask(i: int) -> str | None:
            model = models[i % len(models)]
            body = _chat(model, f"Write a Python function number {i} that returns {i}.", max_tokens=max_tokens)
            conn = http.client.HTTPConnection(host, port, timeout=600)
            try:
                headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
                conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    return f"{model}: HTTP {r.status} {data[:200]!r}"
                out = json.loads(data)
                choice = out["choices"][0]
                if choice["finish_reason"] not in ("stop", "length") or not choice["message"]["content"] \
                        or out["usage"]["completion_tokens"] < 1 or out["model"] != model:
                    return f"{model}: incomplete answer {out!r:.200}"
                return None
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                return f"{model}: {type(exc).__name__} {exc}"
            finally:
                conn.close()

        with ThreadPoolExecutor(clients) as pool:
            failures = [f for f in pool.map(ask, range(requests)) if f]
        seconds = time.perf_counter() - t
        rows.append({"phase": "load", "what": f"{clients} clients, {requests} chat requests over {len(models)} "
                     f"models ({', '.join(models)})", "requests": requests,
                     "answers": f"complete x{requests - len(failures)}, failed x{len(failures)}, {seconds:.1f} s, "
                                f"{requests / seconds:.1f} req/s"})
        for f in failures[:5]:
            rows.append({"phase": "load", "what": "failure", "requests": 1, "answers": f})
        alive = alive and server.process.poll() is None and _healthy(server.url, models[-1], key)
    return AbuseResult(rows, five, client_errors + len(failures), alive)


def _healthy(url: str, model: str, key: str | None) -> bool:
    try:
        return bool(serving.chat(url, model, "Say hi.", max_tokens=4, key=key))
    except Exception:  # noqa: BLE001 (any failure means: not healthy)
        return False


def print_table(r: AbuseResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lorapipe serve under hostile input and load (loopback)")
    for col in ("phase", "what", "requests", "answers"):
        table.add_column(col)
    for row in r.rows:
        table.add_row(row["phase"], row["what"], str(row["requests"]), row["answers"])
    Console().print(table)
