"""`lorapipe bench train --e2e`: `lorapipe train` itself, run as a user runs it, once per setting, on the same data.

The steady-state `bench train` times optimizer steps inside one process; a user waits for the whole command:
imports, preflight, loading and quantizing, compilation, the loop, checkpoints and saving. This benchmark runs the
CLI verb in a fresh process per setting and reads what that run wrote (metrics.json, logs/metrics.jsonl):

  wall_s         the whole command, as the user's clock sees it
  before_loop_s  process start to the first step (imports, preflight, model load, trainer set-up), split into its
                 parts below the table (metrics.json's before_loop_phases_s)
  first_step_s   the first optimizer step (compilation and graph capture land here)
  loop_s         the training loop (the Trainer's own runtime)
  tokens_per_s   real tokens (prompt + completion, no padding, all processes) per second of loop, counted by the
                 Trainer the same way in every mode
  loss_diff_pct  the largest per-step difference of the logged loss from the first row's, in percent

Settings: a train.mode (tutorial, speed, memory, auto), optionally `+graphs` (train.cuda_graphs), `+fsdp`
(train.fsdp) or `+fsdp-cpu` (train.fsdp, the base quantized in CPU memory: train.fsdp_loading cpu), and `:N` (N
processes, train.processes), e.g. `tutorial,auto,speed:2,memory+fsdp:2`. Without `:N`, train.processes stays unset,
as a user leaves it: one GPU, unless `auto` or `memory` would be refused there and FSDP over the visible GPUs fits.
The first row is the reference.

Examples are 64-511 tokens by default; `lengths` (`--lengths 3000-4095`) sets another range, with data.max_length
raised to hold the longest. Long examples are where a step is mostly token work (BENCHMARKS.md, "Long examples").
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorapipe.errors import UserError

MODES = ("tutorial", "speed", "memory", "auto")


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """'speed+graphs:2' -> ('speed+graphs:2', {train.mode: speed, train.cuda_graphs: true, train.processes: 2});
    'memory+fsdp:2' -> train.fsdp true; 'memory+fsdp-cpu:2' -> also train.fsdp_loading cpu; 'auto' -> train.processes
    left unset (the user's default)."""
    head, _, procs = text.partition(":")
    mode, _, extra = head.partition("+")
    if mode not in MODES or extra not in ("", "graphs", "fsdp", "fsdp-cpu") or (procs and not procs.isdigit()) \
            or procs == "0":
        raise UserError(f"--settings: cannot read '{text}'; write MODE[+graphs|+fsdp|+fsdp-cpu][:PROCESSES] with "
                        f"MODE one of {', '.join(MODES)} (e.g. tutorial,auto,speed:2,memory+fsdp:2)")
    out = {"train.mode": mode}
    if procs:
        out["train.processes"] = procs
    if extra:
        out["train.cuda_graphs" if extra == "graphs" else "train.fsdp"] = "true"
    if extra == "fsdp-cpu":
        out["train.fsdp_loading"] = "cpu"
    return text, out


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


LENGTHS = (64, 511)


def parse_lengths(text: str) -> tuple[int, int]:
    """'3000-4095' -> (3000, 4095): the words (tokens) per example of the random shapes' data."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 8 <= int(lo) <= int(hi)):
        raise UserError(f"--lengths: cannot read '{text}'; write MIN-MAX tokens per example, 8 <= MIN <= MAX "
                        f"(e.g. 3000-4095; default {LENGTHS[0]}-{LENGTHS[1]})")
    return int(lo), int(hi)


def setup(shape: str, workdir: Path, examples: int, seed: int = 0, batch: int | None = None,
          lengths: tuple[int, int] = LENGTHS) -> Path:
    """A config for `lorapipe train`: the base (random weights of a bench shape, or the embedded SmolLM2) and its
    data, reused when already in `workdir`. Random shapes get prompt/completion examples of `lengths` (64-511)
    words of their word-level tokenizer (one token each, ~30 % prompt; data.max_length raised to hold the longest);
    SmolLM2 gets lorapipe's shipped training set. `batch`: the
    effective batch (default the config's 4 x 4), as micro-batches of 4 where it divides: data parallelism pays
    only once each GPU's share of a step keeps it busy (BENCHMARKS.md, the 8B step by examples per GPU)."""
    from lorapipe import bench
    from lorapipe.config import dump_config, load_config

    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"e2e-{shape}.yaml"
    over: dict[str, Any] = {"output_dir": str(workdir / "runs"), "data.max_examples": examples}
    if batch:
        micro = 4 if batch % 4 == 0 else batch
        over.update({"train.per_device_train_batch_size": micro, "train.gradient_accumulation_steps": batch // micro})
    if shape != "smollm2-135m":
        if shape not in bench.SHAPES:
            raise UserError(f"--shapes: unknown {shape}; choose from smollm2-135m, {', '.join(bench.SHAPES)}")
        model_dir = workdir / f"model-{shape}"
        if not (model_dir / "config.json").is_file():
            bench._random_model_dir(shape, model_dir)
        lo, hi = lengths
        data = workdir / (f"data-{shape}-{examples}.jsonl" if lengths == LENGTHS
                          else f"data-{shape}-{examples}-{lo}-{hi}.jsonl")
        if not data.is_file():
            rng = random.Random(seed)
            vocab = bench.SHAPES[shape][5]
            with data.open("w") as f:
                for _ in range(examples):
                    n = rng.randint(lo, hi)
                    cut = max(1, int(n * 0.3))
                    # the prompt ends with a space: glued to the completion's first word it would be one unknown
                    f.write(json.dumps({"prompt": _words(rng, cut, vocab) + " ",
                                        "completion": _words(rng, n - cut - 1, vocab)}) + "\n")
        over.update({"model.name_or_path": str(model_dir.resolve()), "data.source": str(data.resolve())})
        if hi + 1 > load_config(None).data.max_length:  # n - 1 words and the EOS, and room for a BOS
            over["data.max_length"] = hi + 1
    elif lengths != LENGTHS:
        raise UserError("--lengths: the smollm2-135m shape trains on lorapipe's shipped data, whose lengths are its "
                        "own; choose a random shape (--shapes tinyllama-1.1b, llama3-8b, ...)")
    cfg_path.write_text(dump_config(load_config(None, over)))
    return cfg_path


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_setting(label: str, overrides: dict[str, str], cfg_path: Path, workdir: Path) -> dict[str, Any]:
    """`lorapipe train CONFIG --name ... --restart --overwrite` with the setting's flags, in a fresh process."""
    name = "e2e-" + "".join(c if c.isalnum() else "-" for c in label)
    cmd = [sys.executable, "-m", "lorapipe", "train", str(cfg_path), "--name", name, "--restart", "--overwrite"]
    for k, v in overrides.items():
        cmd += [f"--{k}", v]
    log = workdir / f"{name}.log"
    t0, t0_unix = time.perf_counter(), time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    run_dir = workdir / "runs" / name
    row: dict[str, Any] = {"setting": label, "processes": int(overrides.get("train.processes", 1)),
                           "wall_s": round(wall, 1)}
    if code or not (run_dir / "metrics.json").is_file():
        row["error"] = f"exit {code}: " + log.read_text()[-300:].replace("\n", " | ")
        return row
    m = json.loads((run_dir / "metrics.json").read_text())
    before = round(m["loop_started_unix"] - t0_unix, 1)  # the command's start, a launching parent included
    row.update(processes=m.get("processes", row["processes"]),  # an unset train.processes: what train chose
               before_loop_s=before, first_step_s=m.get("first_step_s"), loop_s=m["runtime_s"],
               after_loop_s=round(wall - before - m["runtime_s"], 1), steps=m["steps"],
               tokens=m["tokens_seen"], tokens_per_s=m["tokens_per_s"],
               layout=f"{m['layout'].get('micro_batch')}x{m['layout'].get('accum')}", final_loss=None,
               peak_gpu_gib=m.get("peak_gpu_mem_gib"), peak_loading_gib=m.get("peak_gpu_mem_loading_gib"),
               peak_training_gib=m.get("peak_gpu_mem_training_gib"), mode=m["layout"].get("mode"), run_dir=str(run_dir),
               before_loop_parts=m.get("before_loop_phases_s"))
    losses = _losses(run_dir)
    if losses:
        row["final_loss"] = round(losses[max(losses)], 4)
    row["_losses"] = losses
    return row


def run(shape: str, settings: list[str], examples: int, workdir: Path, batch: int | None = None,
        lengths: tuple[int, int] = LENGTHS) -> list[dict[str, Any]]:
    """Every setting on the same config and data; ratios and loss differences against the first row."""
    from lorapipe.config import load_config

    parsed = [parse_setting(s) for s in settings]  # every setting read before anything runs
    cfg_path = setup(shape, workdir, examples, batch=batch, lengths=lengths)
    t = load_config(cfg_path).train
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps
    rows = []
    for label, over in parsed:
        rows.append(run_setting(label, over, cfg_path, workdir))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}), flush=True)
    ref = rows[0]
    for r in rows:
        if "error" in r or "error" in ref:
            continue
        r["wall_vs_first"] = round(ref["wall_s"] / r["wall_s"], 2)
        r["loop_vs_first"] = round(ref["loop_s"] / r["loop_s"], 2) if r["loop_s"] else None
        common = sorted(set(ref["_losses"]) & set(r["_losses"]))
        if common:
            r["loss_diff_pct"] = round(100 * max(abs(r["_losses"][s] - ref["_losses"][s]) / abs(ref["_losses"][s])
                                                 for s in common), 2)
    from lorapipe.models import device_summary

    for r in rows:
        r.pop("_losses", None)
        r.update(shape=shape, examples=examples, lengths=f"{lengths[0]}-{lengths[1]}", batch=effective,
                 device=device_summary(), date=time.strftime("%Y-%m-%d"))
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    m = rows[0]
    table = Table(title=f"`lorapipe train` end to end: {m['shape']}, {m['examples']} examples "
                  f"({m['lengths']} tokens), effective batch "
                  f"{m['batch']}, on {m['device']}, "
                  f"{m['date']} (first row: the reference)")
    cols = ["setting", "mode", "processes", "layout", "steps", "wall_s", "wall_vs_first", "before_loop_s",
            "first_step_s", "loop_s", "loop_vs_first", "after_loop_s", "tokens", "tokens_per_s", "final_loss",
            "loss_diff_pct", "peak_gpu_gib", "peak_loading_gib", "peak_training_gib", "error"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if r.get(c) is None else str(r[c]) for c in cols])
    Console(width=240).print(table)
    for r in rows:  # where the time before the loop went (rank 0; a launching parent's own time is not in it)
        if r.get("before_loop_parts"):
            print(f"  {r['setting']}: before the loop " + ", ".join(f"{k} {v:.1f}s" for k, v in
                                                                    r["before_loop_parts"].items()))
