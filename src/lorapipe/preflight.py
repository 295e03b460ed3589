"""`lorapipe preflight`: what training will see, checked before a GPU-hour is spent (also run by `train`).

Loads and validates the data, renders it with the template that will be saved with the adapter, tokenizes it exactly
as the trainer will, and reports: example counts, prompt/response token lengths, truncation, the share of tokens that
carry loss, duplicates, EOS at the end of every example, two fully rendered examples with the loss-bearing part
marked, the layout of the step (train.mode) with its estimated peak memory, and the number of steps. It refuses
(unless --force) when no token carries loss or when too many examples lose their whole response.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lorapipe import data as data_mod
from lorapipe import speed
from lorapipe.config import RunCfg
from lorapipe.errors import UserError
from lorapipe.models import compute_dtype, load_tokenizer, resolve_model

log = logging.getLogger(__name__)
LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"  # marks the loss-bearing part of a rendered example


@dataclass
class Prepared:
    """Everything train needs from the data side, and the preflight report."""

    base: str
    dtype: torch.dtype
    tokenizer: Any
    format: str
    rows: list[dict]
    val_rows: list[dict]
    setting: speed.Setting
    estimate: dict[str, float]
    report: dict[str, Any]  # report["problems"]: what makes training pointless (train refuses unless forced)
    alternatives: Callable[[], Fit]  # what fits the GPU where this run does not (layout)


class Fit(NamedTuple):
    """What fits where a run's layout does not: the flags and their estimate, said to the user; `processes`: when
    the flags are FSDP over that many of the visible GPUs (what an unset train.processes turns into)."""

    text: str
    processes: int = 0


def processes(cfg: RunCfg) -> int:
    """Data-parallel processes: torchrun's WORLD_SIZE inside a launch, else train.processes (unset: 1)."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return cfg.train.processes or 1


def layout(cfg: RunCfg, base: str, rows: list[dict], dtype: torch.dtype
           ) -> tuple[speed.Setting, dict[str, float], Callable[[], Fit]]:
    """The mode's Setting for each process of this run, its estimated peak memory (GiB, by part, per GPU), and what
    would fit this GPU instead (a function: computed only when it is asked, when the run does not fit)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    lengths = [len(r["input_ids"]) for r in rows]
    share = (sum(sum(r["completion_mask"]) for r in rows) / max(1, sum(lengths))) if cfg.data.completion_only_loss \
        else 1.0
    targets = list(speed.LORA_NAMES) if cfg.lora.target_modules == "all-linear" else cfg.lora.target_modules

    def estimate(s: speed.Setting) -> dict[str, float]:
        tokens = speed.micro_tokens(lengths, s.micro_batch, s.padding_free, speed.BUCKET if s.compile else 0)
        return speed.estimate_memory(config, s, tokens,
                                     quantized=cfg.quant.load_in_4bit, dtype_bytes=torch.finfo(dtype).bits // 8,
                                     r=cfg.lora.r, targets=targets, lora_dropout=cfg.lora.dropout > 0,
                                     cpu=not torch.cuda.is_available(), loss_share=share)

    cuda = torch.cuda.is_available()
    free = torch.cuda.mem_get_info()[0] / 2**30 if cuda else None
    t = cfg.train
    world = processes(cfg)
    if t.fsdp:
        speed.check_fsdp(world, cuda)
    elif t.fsdp_loading != "auto":
        log.warning("train.fsdp_loading applies to FSDP runs (train.fsdp); ignored")

    def sharded(s: speed.Setting, n: int = world) -> speed.Setting:  # train.fsdp: what each of n GPUs holds
        s = speed.for_fsdp(speed.per_process(s, n), n)
        on_cpu = t.fsdp_loading == "cpu" or (t.fsdp_loading == "auto" and estimate(s)["loading"] > 0.9 * free)
        return dataclasses.replace(s, cpu_loading=on_cpu)

    def peak(s: speed.Setting) -> float:
        return need(estimate(sharded(s) if t.fsdp else s))

    def fits(s: speed.Setting) -> bool:
        return peak(s) <= 0.9 * free

    def refused(s: speed.Setting) -> bool:
        return refuses(peak(s), free)

    optim = t.optim if t.optim != "auto" else ("paged_adamw_32bit" if cuda else "adamw_torch")
    setting = speed.choose(t.mode, batch=t.per_device_train_batch_size, accum=t.gradient_accumulation_steps,
                           checkpointing=t.gradient_checkpointing, optim=optim, quantized=cfg.quant.load_in_4bit,
                           cuda=cuda, fits=fits if cuda else None, refused=refused if cuda else None)
    if t.fsdp:
        if t.cuda_graphs:
            log.warning("train.cuda_graphs: not with train.fsdp (FSDP gathers each layer's shards around it, "
                        "outside a graph); ignored")
        setting = sharded(setting)
    else:
        if t.cuda_graphs and cuda and setting.mode == "speed":
            setting = dataclasses.replace(setting, liger=False, compile=speed.graphs_kind(config), async_host=True)
        elif t.cuda_graphs:
            log.warning("train.cuda_graphs applies to speed mode on CUDA; this run is %s mode%s: ignored",
                        setting.mode, "" if cuda else " on CPU")
        setting = speed.per_process(setting, world)
    est = estimate(setting)
    if free is not None:
        est["gpu_free"] = round(free, 2)
    if setting.cpu_loading:
        here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # this machine's processes, each its own copy
        ram = available_ram_gib()
        if ram is not None and est["cpu_loading_ram"] * here > 0.9 * ram:
            log.warning("train.fsdp_loading: %d processes each quantize the whole 4-bit base in CPU memory "
                        "(%.1f GiB each), and %.1f GiB is available: loading may run out of memory", here,
                        est["cpu_loading_ram"], ram)
        _warn_if_not_kept(cfg, base, dtype, est["cpu_loading_ram"] / 1.05, here)

    @functools.cache  # asked for the message and for the scale-out, and again on CUDA's out-of-memory error
    def alternatives() -> Fit:
        """What fits this GPU's free memory (as preflight measured it) where this run's layout does not: memory
        mode, smaller micro-batches, FSDP over more GPUs; the fewest changes first, each with its estimate."""
        return _alternatives(cfg, setting, world, free, optim, lambda s: need(estimate(s)), sharded)

    return setting, est, alternatives


def need(est: dict[str, float]) -> float:
    """A run's estimated peak per GPU (GiB): training, or FSDP's loading where that is higher."""
    return max(est["total"], est.get("loading", 0.0))


def _alternatives(cfg: RunCfg, setting: speed.Setting, world: int, free: float | None, optim: str, gib, sharded
                  ) -> Fit:
    if free is None:
        return Fit("")
    t, room = cfg.train, 0.9 * free
    total = t.per_device_train_batch_size * t.gradient_accumulation_steps

    def memory(micro: int, n: int, fsdp: bool) -> speed.Setting:  # memory mode, `micro` examples a forward pass
        s = speed.choose("memory", batch=micro, accum=total // micro, checkpointing=True, optim=optim,
                         quantized=cfg.quant.load_in_4bit, cuda=True)
        return sharded(s, n) if fsdp else speed.per_process(s, n)

    micro = t.per_device_train_batch_size
    mem = memory(micro, world, t.fsdp)
    mode = "" if t.mode in ("memory", "auto") else "--train.mode memory "
    if setting.mode != "memory" and (g := gib(mem)) <= room:
        return Fit(f"--train.mode memory ({g:.1f} GiB)")

    def smaller(n: int, fsdp: bool, largest: int) -> tuple[int, float] | None:  # the largest micro-batch that fits
        for m in sorted((d for d in range(1, largest + 1) if (total // n) % d == 0), reverse=True):
            if (g := gib(memory(m, n, fsdp))) <= room:
                return m, g
        return None

    def batch(m: int) -> str:
        return f"--train.per_device_train_batch_size {m} --train.gradient_accumulation_steps {total // m}"

    if (fit := smaller(world, t.fsdp, mem.micro_batch - 1)) is not None:
        m, g = fit
        return Fit(f"{mode}{batch(m)} (the same effective batch, {m} example{'s' * (m > 1)} a forward pass; "
                   f"{g:.1f} GiB)")
    gpus = torch.cuda.device_count()
    for n in range(world + 1 if t.fsdp else 2, 9):  # sharded over more GPUs: the fewest that hold it
        if total % n == 0 and (fit := smaller(n, True, micro)) is not None:
            m, g = fit
            flags = f"{mode}--train.processes {n} --train.fsdp true" + (
                f" {batch(m)}" if m < memory(micro, n, True).micro_batch else "")
            return Fit(f"{flags} ({g:.1f} GiB per GPU" + (
                ")" if n <= gpus else f"; {n} GPUs with this much free memory, {gpus} visible)"), n if n <= gpus else 0)
    return Fit("a GPU with more free memory: not even FSDP over 8 such GPUs holds it")


def _warn_if_not_kept(cfg: RunCfg, base: str, dtype: torch.dtype, base_gib: float, here: int) -> None:
    """Loading in CPU memory quantizes on the CPU (35 s for the 8B shape with 16 cores, minutes for 70B) unless
    lorapipe's cache holds the result of an earlier run. When the disk cannot take a copy, every process of every run
    quantizes, with a share of the cores: said before loading, with what to do."""
    from lorapipe.models import quantized_cache, room_short

    kept = quantized_cache(base, cfg.model, cfg.quant, dtype)
    short = None if kept is None or (kept / "config.json").is_file() else room_short(kept, base_gib * 2**30)
    if short:
        log.warning("train.fsdp_loading: the 4-bit base cannot be kept for later runs (%s): %s, on every run. Free "
                    "space there, or point LORAPIPE_CACHE at a disk with room", short,
                    f"each of {here} processes quantizes it with 1/{here} of the cores" if here > 1
                    else "it is quantized on the CPU")


def _warn_if_merge_short(cfg: RunCfg, base: str) -> None:
    """After training, merge writes the merged model into the run directory, in float32 by default: 280 GB for a 70B
    base. Where that disk cannot take it, said now, not hours of training later (merge itself refuses then, too)."""
    from lorapipe import merge
    from lorapipe.models import param_count

    try:
        params, base_dtype = param_count(base, cfg.model), merge.checkpoint_dtype(base)
    except Exception as exc:  # noqa: BLE001  (a config transformers cannot build on the meta device: not ours to fail)
        log.debug("merge's disk need not estimated: %s", exc)
        return
    try:
        merge.check_disk(cfg.run_dir(), params, torch.float32, base_dtype)
    except UserError as exc:
        log.warning("after training, %s (`lorapipe merge`, and the stage after training in `lorapipe run`)",
                    str(exc).removeprefix("merge: "))


def _warn_if_unservable(cfg: RunCfg, base: str) -> None:
    """After training, verify, eval and serve run the model through vLLM on this machine's GPUs. Where no layout of
    the visible GPUs holds it (lorapipe.layout: a 70B model trained on one H200 in 4 bits is 140 GB in bf16), said
    now, not hours of training later. The adapter's LoRA slots are not known yet and not counted."""
    from lorapipe import layout, serve

    if not torch.cuda.is_available() or not serve.has_vllm():
        return
    try:
        p = serve.Plan(base, Path(base).name, [], None, 0, cfg.serve, dtype=serve.serving_dtype(cfg.serve, base))
        layout.check(p, offline=False, free=False)
    except UserError as exc:
        log.warning("after training, vLLM (verify, eval, serve) will not start on these GPUs: %s", exc)
    except Exception as exc:  # noqa: BLE001  (a base whose config or files are not ours to judge here)
        log.debug("the serving layout not checked before training: %s", exc)


def available_ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return None


_COMPILED = {"graphs": "one CUDA graph per layer and length bucket",
             "model-graphs": "the decoder stack as one CUDA graph per length bucket"}


def _quantiles(xs: list[int]) -> dict[str, int]:
    if not xs:
        return {"p50": 0, "p95": 0, "max": 0}
    s = sorted(xs)
    return {"p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1]}


def _rendered(tokenizer, row: dict, completion_only: bool) -> str:
    ids, mask = row["input_ids"], row["completion_mask"] if completion_only else [1] * len(row["input_ids"])
    out, cur, start = [], mask[0] if mask else 0, 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != cur:
            text = tokenizer.decode(ids[start:i])
            out.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if cur else text)
            if i < len(ids):
                cur, start = mask[i], i
    return "".join(out)


def prepare(cfg: RunCfg) -> Prepared:
    loaded = data_mod.load_data(cfg.data)
    train_recs, val_recs = data_mod.split_validation(loaded, cfg.data, cfg.train.seed)
    base = resolve_model(cfg.model)
    dtype = compute_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(base, cfg.model)
    bos = data_mod.adds_bos(tokenizer)
    if loaded.format == "alpaca":
        tokenizer.chat_template = data_mod.chat_template(cfg.data.template, bos=bos)
    elif loaded.format != "messages":  # messages keep (and are rendered by) the model's own chat template
        tokenizer.chat_template = data_mod.plain_chat_template(bos=bos)
    special = loaded.format != "messages"
    pairs = data_mod.to_pairs(train_recs, loaded.format, cfg.data.template, tokenizer)
    rows, cut = data_mod.tokenize(tokenizer, pairs, cfg.data.max_length, special)
    val_rows: list[dict] = []
    completion_only = cfg.data.completion_only_loss and loaded.format != "text"

    def carries_loss(r: dict) -> bool:  # TRL drops examples whose response was cut away; so do we, and say so
        return not completion_only or any(r["completion_mask"])

    if val_recs:
        val_pairs = data_mod.to_pairs(val_recs, loaded.format, cfg.data.template, tokenizer)
        val_rows = [r for r in data_mod.tokenize(tokenizer, val_pairs, cfg.data.max_length, special)[0]
                    if carries_loss(r)]
    keep = [i for i, r in enumerate(rows) if carries_loss(r)]
    n = len(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    loss_tokens = sum(sum(r["completion_mask"]) if completion_only else len(r["input_ids"]) for r in rows)
    eos = tokenizer.eos_token_id
    dup = n - len({(p["prompt"], p["completion"]) for p in pairs})
    t = cfg.train
    setting, estimate, alternatives = layout(cfg, base, [rows[i] for i in keep] or rows, dtype)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    steps = t.max_steps if t.max_steps > 0 else math.ceil(len(keep) / per_step * t.num_train_epochs)
    configured = speed.per_process(dataclasses.replace(setting, micro_batch=t.per_device_train_batch_size,
                                                       accum=t.gradient_accumulation_steps), processes(cfg))
    report = {
        "format": loaded.format, "sources": loaded.sources, "template": cfg.data.template if loaded.format ==
        "alpaca" else ("model chat template" if loaded.format == "messages" else "plain"),
        "examples": n, "validation_examples": len(val_rows), "skipped_bad_rows": len(loaded.skipped),
        "skipped_examples": loaded.skipped[:10],
        "prompt_tokens": _quantiles([k for k, _ in cut["lengths"]]),
        "response_tokens": _quantiles([m for _, m in cut["lengths"]]),
        "max_length": cfg.data.max_length, "truncated": cut["truncated"], "response_lost": cut["response_lost"],
        "tokens": tokens, "loss_tokens": loss_tokens, "loss_token_share": round(loss_tokens / tokens, 4) if tokens
        else 0.0, "loss_on": "response" if completion_only else "whole text",
        "duplicates": dup, "empty_prompts": sum(not p["prompt"].strip() for p in pairs) if loaded.format !=
        "text" else 0,
        "ending_with_eos": sum(bool(r["input_ids"]) and r["input_ids"][-1] == eos for r in rows),
        "examples_rendered": [_rendered(tokenizer, rows[i], completion_only) for i in keep[:2]],
        "layout": setting.as_dict(), "layout_reason": speed.reason(cfg.train.mode, setting, torch.cuda.is_available(),
                                                                  configured.micro_batch),
        "processes": processes(cfg), "memory_estimate_gib": estimate,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "effective_batch": per_step, "steps": steps,
    }
    problems = []
    if loss_tokens == 0:
        problems.append("no token carries loss: every response is empty or cut away (check data.max_length, "
                        "data.format and data.columns)")
    share = cut["response_lost"] / n if n else 0.0
    if share > cfg.data.max_response_lost_share:
        problems.append(f"{cut['response_lost']} of {n} examples ({share:.0%}) lose their whole response to "
                        f"data.max_length={cfg.data.max_length} (allowed: data.max_response_lost_share="
                        f"{cfg.data.max_response_lost_share}); raise data.max_length or shorten the prompts")
    short = _short_of_memory(estimate, setting, alternatives)
    refused = short and refuses(need(estimate), estimate["gpu_free"])
    if refused and cfg.train.processes is None and not os.environ.get("WORLD_SIZE") and t.mode in ("auto", "memory") \
            and (gpus := alternatives().processes):  # FSDP over visible GPUs holds what one GPU does not: train so
        report["scale_out"] = {"processes": gpus, "why": short}
    elif refused:
        problems.append(short)
    elif short and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log.warning("%s; it may still fit (the estimate has been within %d %% of the peaks measured)", short,
                    100 * ESTIMATE_ERROR)
    report["problems"] = problems
    if int(os.environ.get("RANK", "0")) == 0 and "scale_out" not in report:  # what comes after training: said
        # once, not by every process (nor by one that launches them: their rank 0 says it)
        _warn_if_merge_short(cfg, base)
        _warn_if_unservable(cfg, base)
    return Prepared(base, dtype, tokenizer, loaded.format, [rows[i] for i in keep], val_rows, setting, estimate,
                    report, alternatives)


# preflight's estimate against the peaks measured on H200s and an H100: -8 % ... +11 % (-17 % with CUDA graphs;
# BENCHMARKS.md, "Memory estimate vs measured"). A run is refused only when even this much less than its estimate
# would not fit the GPU.
ESTIMATE_ERROR = 0.15


def refuses(peak: float, free: float) -> bool:
    """Whether preflight refuses a run of this estimated peak (GiB) on this free memory: even ESTIMATE_ERROR less
    than the estimate would not fit. Memory mode lowers its micro-batch by the same rule (speed.choose)."""
    return peak * (1 - ESTIMATE_ERROR) > free


def _short_of_memory(est: dict[str, float], setting: speed.Setting, alternatives: Callable[[], Fit]) -> str:
    """Why this run's layout does not fit the GPU's free memory, and what would (empty when it fits, or on CPU).
    Without it such a run stops at CUDA's out-of-memory traceback: while loading (transformers 5 reserves the whole
    base first), or, when only its step is too large, at the first step, after loading, quantizing and compiling."""
    if "gpu_free" not in est or need(est) <= 0.9 * est["gpu_free"]:
        return ""
    parts = ", ".join(f"{k} {est[k]:.1f}" for k in ("weights", "dequant_cache", "lora_and_optimizer", "activations",
                                                    "logits", "loading") if est.get(k))
    what = "FSDP's loading peak" if est.get("loading", 0) > est["total"] else "the estimated peak"
    return (f"memory: {what} is {need(est):.1f} GiB per GPU ({parts}; {setting.mode} mode, micro-batch "
            f"{setting.micro_batch}) and the GPU has {est['gpu_free']:.1f} GiB free; what fits: {alternatives().text}")


def summary(report: dict[str, Any], examples: bool = True) -> str:
    """The report as Markdown people read before training; `examples=False`: without the rendered examples (the
    console of `lorapipe train`; they are in the run's preflight.md)."""
    r = report
    mem = r["memory_estimate_gib"]
    lay = r["layout"]
    lines = [
        "# Preflight",
        "",
        f"- data: {', '.join(r['sources'])} ({r['format']}, template: {r['template']})",
        f"- examples: {r['examples']} train, {r['validation_examples']} validation; {r['skipped_bad_rows']} bad rows "
        f"skipped; {r['duplicates']} duplicates; {r['empty_prompts']} empty prompts",
        f"- prompt tokens p50/p95/max: {r['prompt_tokens']['p50']}/{r['prompt_tokens']['p95']}/"
        f"{r['prompt_tokens']['max']}; response tokens (with EOS): {r['response_tokens']['p50']}/"
        f"{r['response_tokens']['p95']}/{r['response_tokens']['max']}",
        f"- max_length {r['max_length']}: {r['truncated']} examples truncated, {r['response_lost']} lose their whole "
        "response",
        f"- loss on the {r['loss_on']}: {r['loss_tokens']} of {r['tokens']} tokens ({r['loss_token_share']:.1%}); "
        f"{r['ending_with_eos']} of {r['examples']} examples end with EOS",
        f"- layout (train.mode): {lay['mode']} ({r.get('layout_reason', 'as configured')}), micro-batch "
        f"{lay['micro_batch']} x {lay['accum']}"
        + (f" per process x {r['processes']} processes" if r.get("processes", 1) > 1 else "") + ", checkpointing "
        f"{lay['checkpointing']}, padding-free {lay['padding_free']}, optimizer {lay['optim']}"
        + (f", compiled: {_COMPILED.get(lay['compile'], lay['compile'])}" if lay["compile"] else ""),
        f"- estimated peak memory on {r['device']}: {mem['total']:.2f} GiB (weights {mem['weights']:.2f}, "
        f"activations {mem['activations']:.2f}, logits {mem['logits']:.2f}"
        + (f"; GPU free {mem['gpu_free']:.1f}" if "gpu_free" in mem else "") + ")"
        + (f" per GPU; loading: {mem['loading']:.2f} GiB, " + (
            f"the 4-bit base quantized in CPU memory ({mem['cpu_loading_ram']:.2f} GiB per process), each GPU "
            "taking its share layer by layer" if lay.get("cpu_loading") else "the whole 4-bit base on each GPU once")
           if "loading" in mem else ""),
        f"- steps: {r['steps']} (effective batch {r['effective_batch']})",
    ]
    if r.get("scale_out"):
        lines.append(f"- **scale-out:** {r['scale_out']['why']}: training FSDP-sharded over "
                     f"{r['scale_out']['processes']} GPUs instead (train.processes unset; set it to choose)")
    for p in r["problems"]:
        lines.append(f"- **PROBLEM:** {p}")
    for i, text in enumerate(r["examples_rendered"] if examples else [], 1):
        lines += ["", f"## Example {i} (loss on {LOSS_OPEN}...{LOSS_CLOSE})", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def check(prep: Prepared, force: bool) -> None:
    """Refuse to train on data that cannot teach anything, unless forced."""
    problems = prep.report["problems"]
    if problems and not force:
        raise UserError("preflight: " + "; ".join(problems) + ". Pass --force to train anyway.")
    for p in problems:
        log.warning("preflight (forced): %s", p)


def run(cfg: RunCfg) -> tuple[dict[str, Any], str]:
    """`lorapipe preflight`: the report and its Markdown summary (nothing is trained)."""
    prep = prepare(cfg)
    return prep.report, summary(prep.report)
