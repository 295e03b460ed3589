"""The evaluation report: metrics.json, two PNG plots (matplotlib) and report.html that embeds them."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def loss_curve(run_dir: Path, out: Path) -> bool:
    """Training loss per step from logs/metrics.jsonl; False if the run logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = run_dir / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def metric_bars(metrics: dict[str, Any], out: Path) -> None:
    """Base vs fine-tuned for every rate metric of every task set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, base, tuned = [], [], []
    for set_name, m in metrics["sets"].items():
        for key, v in m["base"].items():
            if isinstance(v, float) and key != "mean_tokens":
                labels.append(f"{set_name}\n{key.replace('_', chr(10))}")
                base.append(v)
                tuned.append(m["finetuned"][key])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6), dpi=110)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="fine-tuned")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend()
    ax.set_title("Base vs fine-tuned")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], limit: int) -> str:
    out = ["<table><tr><th>task</th><th>base</th><th>fine-tuned</th></tr>"]
    for r in rows[:limit]:
        cells = []
        for side in ("base", "finetuned"):
            mark = "pass" if r[side]["passed"] else "fail"
            cells.append(f"<td class='{mark}'><b>{mark}</b><pre>{html.escape(r[side]['text'][:1500])}</pre></td>")
        out.append(f"<tr><td><b>{html.escape(r['task_id'])}</b><pre>{html.escape(r['instruction'][:600])}</pre>"
                   f"</td>{''.join(cells)}</tr>")
    return "\n".join(out) + "</table>"


def write_html(out_dir: Path, metrics: dict[str, Any], rows: dict[str, list], has_loss: bool) -> Path:
    parts = [f"<h1>lorapipe eval: {html.escape(metrics['run'])}</h1>",
             f"<p>base <code>{html.escape(metrics['base_model'])}</code> vs the same base + adapter; same prompts, "
             f"template and decoding (greedy for pass@1; "
             + (f"{metrics['samples']} samples at temperature {metrics['sample_temperature']} for "
                f"pass@{metrics['k']}" if metrics["samples"] else "pass@k not run: eval.samples is 0")
             + f"). Generation: {metrics['generator']}.</p>"]
    loss = metrics.get("heldout_loss")
    if loss:
        parts.append(f"<p>held-out loss (reference solutions): base {loss['base']['loss']:.3f} "
                     f"(ppl {loss['base']['perplexity']:.2f}), fine-tuned {loss['finetuned']['loss']:.3f} "
                     f"(ppl {loss['finetuned']['perplexity']:.2f}); computed by "
                     f"{html.escape(metrics.get('heldout_loss_by') or 'transformers in float32')}</p>")
    head = "<table><tr><th>set</th><th>metric</th><th>base</th><th>fine-tuned</th></tr>"
    body = []
    for set_name, m in metrics["sets"].items():
        for key, v in m["base"].items():
            fmt = (lambda x: f"{x:.3f}") if isinstance(v, float) else str
            body.append(f"<tr><td>{set_name} ({m['tasks']})</td><td>{key}</td><td>{fmt(v)}</td>"
                        f"<td>{fmt(m['finetuned'][key])}</td></tr>")
    parts.append(head + "".join(body) + "</table>")
    parts.append('<img src="metrics.png" alt="base vs fine-tuned metrics">')
    if has_loss:
        parts.append('<img src="loss_curve.png" alt="training loss curve">')
    for set_name, r in rows.items():
        parts.append(f"<h2>{html.escape(set_name)}: side by side (greedy)</h2>" + _table(r, 20))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top} pre{white-space:pre-wrap;font-size:11px;"
             "margin:0} td.pass b{color:#080} td.fail b{color:#a00} img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lorapipe eval</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
