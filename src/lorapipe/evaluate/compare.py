"""Base vs fine-tuned, side by side: same prompts, same template, same decoding, one vLLM engine.

The base answers with no LoRA request and the fine-tune with the run's adapter, so the only difference between the
two columns is the adapter. Writes runs/<name>/compare/{compare.jsonl, compare.md}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe import data as data_mod
from lorapipe import serve
from lorapipe.evaluate.tasks import defines_function
from lorapipe.runs import atomic_dir


@dataclass
class CompareResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _summary(rows: list[dict[str, Any]], side: str) -> dict[str, Any]:
    n = len(rows)
    return {
        "stopped_on_eos": sum(r[side]["finish_reason"] == "stop" for r in rows) / n,
        "defines_function": sum(defines_function(r[side]["text"]) for r in rows) / n,
        "mean_tokens": sum(r[side]["tokens"] for r in rows) / n,
    }


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["# Base vs fine-tuned", "", "| | base | fine-tuned |", "|---|---|---|"]
    for key in ("stopped_on_eos", "defines_function", "mean_tokens"):
        lines.append(f"| {key} | {summary['base'][key]:.2f} | {summary['finetuned'][key]:.2f} |")
    for i, r in enumerate(rows, 1):
        lines += ["", f"## {i}. {r['instruction']}", "", "**base**", "", "```", r["base"]["text"].rstrip(), "```",
                  "", "**fine-tuned**", "", "```", r["finetuned"]["text"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def compare(run_dir: str | Path, prompts_path: str | None = None,
            overrides: dict[str, Any] | None = None) -> CompareResult:
    """Answer the prompts with the base and with base + adapter; write and return both, with a small summary."""
    run_dir = Path(run_dir)
    p = serve.plan([run_dir], overrides)
    cfg = p.adapters[0].cfg
    prompts = data_mod.load_prompts(prompts_path or cfg.eval.prompts, cfg.eval.num_prompts)
    texts = data_mod.prompts_for(prompts, cfg.data, run_dir / "adapter")
    with serve.engine(p, run_dir / "logs" / "compare.log") as llm:
        params = serve.sampling(cfg.eval.max_tokens, cfg.eval.temperature)
        base = serve.complete(llm, texts, params)
        tuned = serve.complete(llm, texts, params, serve.lora_request(p, p.adapters[0]))
    rows = [{"instruction": r["instruction"], "input": r["input"], "prompt": t, "base": b, "finetuned": f}
            for r, t, b, f in zip(prompts, texts, base, tuned)]
    summary = {"base": _summary(rows, "base"), "finetuned": _summary(rows, "finetuned"),
               "prompts": len(rows), "max_tokens": cfg.eval.max_tokens, "temperature": cfg.eval.temperature}
    out = run_dir / "compare"
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "compare.md").write_text(_markdown(rows, summary))
    return CompareResult(out, rows, summary)
