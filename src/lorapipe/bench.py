"""`lorapipe bench`: measured numbers, printed as a table (never timed assertions in tests).

bench eval RUN   HumanEval (164 tasks) greedy, fine-tuned model only, through vLLM + the sandbox: wall time of
                 generation and of execution, tokens/s, pass@1.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lorapipe import data as data_mod
from lorapipe import serve
from lorapipe.evaluate import tasks
from lorapipe.evaluate.sandbox import Limits, run_code
from lorapipe.models import device_summary
from lorapipe.runs import load_run, write_json


def eval_speed(run_dir: str | Path, overrides: dict[str, Any] | None = None, limit: int | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = load_run(run_dir, overrides)
    ts = tasks.humaneval(limit)
    prompts = [data_mod.render_prompt({"instruction": t.instruction, "input": ""}, cfg.data.template) for t in ts]
    p = serve.plan([run_dir], overrides)
    t0 = time.perf_counter()
    with serve.engine(p) as llm:
        t1 = time.perf_counter()
        outs = serve.complete(llm, prompts, serve.sampling(cfg.eval.max_tokens, 0.0), serve.lora_request(p, p.adapters[0]))
        t2 = time.perf_counter()
    limits = Limits(timeout_s=cfg.eval.timeout_s, cpu_s=max(1, int(cfg.eval.timeout_s)))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda a: run_code(tasks.program(a[0], a[1]["text"]), limits), zip(ts, outs)))
    t3 = time.perf_counter()
    tokens = sum(o["tokens"] for o in outs)
    row = {"tasks": len(ts), "engine_start_s": round(t1 - t0, 1), "generate_s": round(t2 - t1, 1),
           "execute_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1), "output_tokens": tokens,
           "tokens_per_s": round(tokens / (t2 - t1), 1), "pass@1": sum(r.passed for r in results) / len(ts),
           "max_tokens": cfg.eval.max_tokens, "device": device_summary(), "machine": platform.node(),
           "date": time.strftime("%Y-%m-%d")}
    write_json(run_dir / "logs" / "bench_eval.json", row)
    return row


def print_table(title: str, row: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in row.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) and v < 1 else str(v))
    Console().print(table)
