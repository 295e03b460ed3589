"""The Python API: what the CLI verbs do, as functions a notebook calls, each returning a typed result.

    import lorapipe.api as lp
    run = lp.train("config.yaml", train__max_steps=100)            # or lp.train(lp.resolve(...)), or no config
    lp.merge(run.run_dir)
    print(lp.verify(run.run_dir).summary)
    with lp.server(run.run_dir) as s:
        print(s.chat("Write a function that reverses a string."))

(A module of its own, not `lorapipe.train(...)`: lorapipe.train, .merge, .verify and .evaluate are the stage modules
these functions call.)

Overrides are the CLI's dotted flags, written `section__field=value` as keyword arguments (`train__max_steps=100`),
or as a dict (`overrides={"train.max_steps": 100}`). Errors are lorapipe.errors.UserError with the CLI's message.
Every function calls the same stage entry point as its verb; nothing here has behaviour of its own.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.config import RunCfg, build_config, load_config


def _overrides(overrides: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(overrides or {})
    out.update({k.replace("__", "."): v for k, v in kwargs.items()})
    return out


def resolve(config: str | Path | RunCfg | None = None, overrides: dict[str, Any] | None = None, **kw: Any) -> RunCfg:
    """The resolved config: a YAML path, a RunCfg, or the defaults, with overrides applied (validated)."""
    over = _overrides(overrides, kw)
    if isinstance(config, RunCfg):
        return build_config(config.model_dump(), over, "<RunCfg>")
    return load_config(str(config) if config is not None else None, over)


def train(config: str | Path | RunCfg | None = None, *, overwrite: bool = False, force: bool = False,
          restart: bool = False, overrides: dict[str, Any] | None = None, **kw: Any):
    """Preflight + QLoRA SFT -> runs/<name>/ (`lorapipe train`); resumes an interrupted run of the same config.
    With train.processes > 1, or where preflight finds that only FSDP over several visible GPUs holds the run, it
    launches torchrun like the CLI and reads the finished run back. -> TrainResult."""
    from lorapipe import launch
    from lorapipe import train as train_mod

    cfg = resolve(config, overrides, **kw)
    n = launch.wanted(cfg)
    if not n:
        return train_mod.run(cfg, overwrite=overwrite, force=force, restart=restart)
    return train_mod.launched(cfg, n, overwrite=overwrite, force=force, restart=restart)


def merge(run: str | Path, dtype: str = "float32", overwrite: bool = False):
    """The adapter fused into the full-precision base -> runs/<name>/merged/ (`lorapipe merge`). -> MergeResult."""
    from lorapipe import merge as merge_mod

    return merge_mod.run(run, dtype=dtype, overwrite=overwrite)


def verify(run: str | Path, overrides: dict[str, Any] | None = None, **kw: Any):
    """PEFT / merged / vLLM agreement, template round-trip, stop check (`lorapipe verify`). -> VerifyResult
    (.passed, .summary, .report)."""
    from lorapipe import verify as verify_mod

    return verify_mod.run(run, _overrides(overrides, kw))


def evaluate(run: str | Path, overrides: dict[str, Any] | None = None, **kw: Any):
    """Executed pass@k on held-out tasks and HumanEval, base vs fine-tuned (`lorapipe eval`). -> EvalResult."""
    from lorapipe.evaluate import stage

    return stage.run(run, _overrides(overrides, kw))


def generate(run: str | Path, prompts: str | Path | list[str | dict[str, str]],
             overrides: dict[str, Any] | None = None, **kw: Any):
    """Batched offline generation through vLLM on the path `serve` takes (`lorapipe generate`). `prompts`: a .jsonl
    path, or a list of strings / {"instruction", "input"} records. -> GenerateResult (.records, .output)."""
    from lorapipe import serve

    if isinstance(prompts, (str, Path)) and Path(prompts).is_file():
        return serve.generate(run, str(prompts), _overrides(overrides, kw))
    rows = [{"prompt": p} if isinstance(p, str) else p for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return serve.generate(run, str(path), _overrides(overrides, kw))


@dataclass
class Server:
    """A running `lorapipe serve`: its URL (OpenAI-compatible under /v1), the model names it serves, and a chat
    helper."""

    url: str
    models: list[str]
    routes: list[tuple[str, str]]
    key: str | None
    log_path: Path

    def chat(self, content: str, model: str | None = None, max_tokens: int = 128, temperature: float = 0.0) -> str:
        """One chat completion's text; `model` defaults to the last route (the run's own name)."""
        from lorapipe import serve

        r = serve.chat(self.url, model or self.routes[-1][0], content, max_tokens, temperature, key=self.key)
        return r["choices"][0]["message"]["content"]


@contextmanager
def server(*runs: str | Path, overrides: dict[str, Any] | None = None, **kw: Any) -> Iterator[Server]:
    """`lorapipe serve RUN...` for the length of a `with` block: the same plan, checks and paths; the server and
    its engine processes are stopped on exit (an exception included)."""
    from lorapipe import serve

    over = _overrides(overrides, kw)
    p = serve.route(list(runs), over)
    with serve.running(p, Path(runs[0]) / "logs" / "serve.log") as s:
        yield Server(s.url, s.models, p.routes(), serve.api_key(p.serve), s.log_path)
