"""`lorapipe VERB ...`: one thin table of verbs over the stage entry functions. Argument parsing only.

Every config field is also a flag (`--lora.r 32`, `--quant.double_quant false`), generated from the pydantic models,
with the field's description as its help. Bad input exits with code 2 and one message; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorapipe import console
from lorapipe.config import SECTIONS, RunCfg, dump_config, load_config, parse_override
from lorapipe.errors import OutOfMemory, Stopped, UserError


def _add_section_flags(parser: argparse.ArgumentParser, sections: list[str], top_level: bool = False) -> None:
    def add(prefix: str, model: type[BaseModel]) -> None:
        group = parser.add_argument_group(f"{prefix or 'run'} settings")
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                continue
            dotted = f"{prefix}.{name}" if prefix else name
            default = f.default_factory() if f.default_factory else f.default
            group.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", metavar="V", default=argparse.SUPPRESS,
                               help=f"{f.description} [default: {default}]".replace("%", "%%"))

    if top_level:
        add("", RunCfg)
    for s in sections:
        add(s, SECTIONS[s])


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: parse_override(v) for k, v in vars(ns).items() if k.startswith("cfg:")}


# ---------------------------------------------------------------------------------------------------------------
# Verbs: each parses its arguments into one stage call and prints where the result is.


def cmd_train(ns: argparse.Namespace) -> int | None:
    from lorapipe import launch

    cfg = load_config(ns.config, _overrides(ns))
    n = launch.wanted(cfg)
    if n:
        return launch.train(cfg, n, overwrite=ns.overwrite, force=ns.force, restart=ns.restart)
    from lorapipe import train  # after the launch decision: a launching parent needs none of the training stack

    r = train.run(cfg, overwrite=ns.overwrite, force=ns.force, restart=ns.restart)
    if int(os.environ.get("RANK", "0")) > 0 or r.relaunched:  # rank 0 of the processes it started said so
        return None
    resumed = f" (resumed at step {r.metrics['resumed_from_step']})" if r.metrics.get("resumed_from_step") else ""
    print(f"\ntrained {r.steps} steps{resumed} in {r.runtime_s:.0f}s, train loss {r.train_loss:.4f}")
    print(f"run directory: {r.run_dir}  (adapter/, config.yaml, metrics.json, logs/)")


def cmd_run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lorapipe import pipeline

    cfg = load_config(ns.config, _overrides(ns))

    def show(r) -> None:
        table = Table(title=f"lorapipe run: {r.run_dir}  (stage states: {r.run_dir / pipeline.MANIFEST})")
        for col in ("stage", "state", "seconds", "result"):
            table.add_column(col)
        for st in r.stages:
            table.add_row(st["stage"], st["state"], f"{st['seconds']:.1f}", st["note"])
        Console().print(table)

    def ready(server, p) -> None:
        print(f"\nOpenAI-compatible server: {server.url}/v1   (Ctrl-C, SIGTERM or SIGHUP stops it)")
        for name, what in p.routes():
            print(f"  {name:<24} {what}", flush=True)

    r = pipeline.run(cfg, serve=ns.serve, force=ns.force, restart=ns.restart, on_ready=ready if ns.serve else None)
    show(r)
    if not r.passed:
        print(f"verify FAILED: see {r.run_dir / 'verify.md'}; eval and serve were skipped", file=sys.stderr)
    return 0 if r.passed else 1


def cmd_preflight(ns: argparse.Namespace) -> int:
    from lorapipe import preflight
    from lorapipe.runs import write_json, write_text

    cfg = load_config(ns.config, _overrides(ns))
    report, text = preflight.run(cfg)
    print(text, end="")
    out = Path(cfg.output_dir) / f"{cfg.name}.preflight"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "preflight.json", report)
    write_text(out / "preflight.md", text)
    print(f"written: {out}/preflight.json and preflight.md")
    return 1 if report["problems"] else 0


def cmd_config(ns: argparse.Namespace) -> None:
    print(dump_config(load_config(ns.config, _overrides(ns))), end="")


def cmd_merge(ns: argparse.Namespace) -> None:
    from lorapipe import merge

    r = merge.run(ns.run, dtype=ns.dtype, overwrite=ns.overwrite)
    print(f"merged model ({r.dtype}, {r.params / 1e6:.1f}M params): {r.merged_dir}")


def cmd_push(ns: argparse.Namespace) -> None:
    from lorapipe import cards

    url, files = cards.push(ns.run, ns.repo_id, merged=ns.merged, private=ns.private, dry_run=ns.dry_run)
    folder = Path(ns.run) / ("merged" if ns.merged else "adapter")
    print(f"{'would upload' if ns.dry_run else 'uploaded'} {len(files)} files of {folder} to {url}:")
    for f in files:
        print(f"  {f}")
    if ns.dry_run:
        print(f"model card: {folder / 'README.md'}")


def cmd_export(ns: argparse.Namespace) -> int:
    from lorapipe import export

    if not ns.no_check and (short := export.check_short(ns.run)):
        raise UserError(f"export: {short}. Pass --no-check to write the GGUF unchecked (llama.cpp then loads it on "
                        "its own), or run export on a machine with that much memory")
    r = export.run(ns.run, ns.format, ns.outtype, ns.gguf_pre)
    print(f"exported {r.path} ({r.outtype}, {r.tensors} tensors, {r.size_bytes / 2**20:.1f} MiB)")
    if ns.no_check:
        return 0
    c = export.check(ns.run, r.path, ns.prompts, ns.max_tokens, 0.99 if ns.outtype == "f16" else 0.0)
    g = c["greedy"]
    print(f"loaded back with transformers' GGUF loader, {c['prompts']} held-out prompts x {c['max_tokens']} greedy "
          f"tokens against merged/ (float32, on {c['device']}):\n  agreement {c['agreement']:.1%} (gate "
          f"{'>=' + format(c['gate'], '.0%') if c['gate'] else 'reported'}), greedy {g['agreement']:.1%}, exact "
          f"{g['exact']:.0%}; tokenizer ids equal on {c['tokenizer_equal']:.0%} of prompts; chat template "
          f"{'equal' if c['chat_template_equal'] else 'DIFFERENT'}\n{'PASS' if c['passed'] else 'FAIL'}")
    print(f"llama.cpp: llama-server -m {r.path}   |   Ollama: echo 'FROM {r.path.resolve()}' > Modelfile && "
          f"ollama create {Path(ns.run).name} -f Modelfile")
    return 0 if c["passed"] else 1


def cmd_compare(ns: argparse.Namespace) -> None:
    from lorapipe import evaluate

    r = evaluate.compare(ns.run, ns.prompts, _overrides(ns))
    _print_compare(r)


def _print_compare(r) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="base vs fine-tuned (same prompts, template, decoding)", show_lines=True)
    table.add_column("prompt", max_width=40)
    table.add_column("base", max_width=60)
    table.add_column("fine-tuned", max_width=60)
    for row in r.rows:
        table.add_row(row["instruction"], row["base"]["text"][:600], row["finetuned"]["text"][:600])
    console = Console()
    console.print(table)
    s = r.summary
    for key in ("stopped_on_eos", "defines_function", "mean_tokens"):
        console.print(f"{key:>18}: base {s['base'][key]:.2f}   fine-tuned {s['finetuned'][key]:.2f}")
    console.print(f"written: {r.out_dir}/compare.md, compare.jsonl, summary.json")


def cmd_eval(ns: argparse.Namespace) -> None:
    from lorapipe import evaluate

    r = evaluate.run(ns.run, _overrides(ns))
    m = r.metrics
    for name, s in m["sets"].items():
        keys = [k for k in s["base"] if k != "mean_tokens"]
        print(f"{name} ({s['tasks']} tasks): " + ", ".join(
            f"{k} {s['base'][k]:.3f} -> {s['finetuned'][k]:.3f}" for k in keys))
    if "heldout_loss" in m:
        hl = m["heldout_loss"]
        print(f"held-out loss: {hl['base']['loss']:.3f} -> {hl['finetuned']['loss']:.3f} ({m.get('heldout_loss_by')})")
    print(f"report: {r.out_dir}/report.html (metrics.json, metrics.png, loss_curve.png)")


def cmd_bench(ns: argparse.Namespace) -> None:
    import tempfile

    from lorapipe import bench

    if ns.what == "serve":
        return _bench_serve(ns)
    if ns.what == "abuse":
        return _bench_abuse(ns)
    if ns.what == "eval":
        if not ns.run:
            raise UserError("bench eval needs a run directory: lorapipe bench eval runs/<name>")
        row = bench.eval_speed(ns.run, _overrides(ns), ns.limit)
        bench.print_table("HumanEval greedy, fine-tuned model (vLLM + sandbox)", row)
        return
    if ns.e2e:
        if ns.what != "train":
            raise UserError("--e2e goes with `bench train`")
        from lorapipe import bench_e2e

        work = Path(ns.workdir or tempfile.mkdtemp(prefix="lorapipe-bench-e2e-"))
        shape = ns.shapes or ("tiny" if ns.tiny else "tinyllama-1.1b")
        rows = bench_e2e.run(shape, (ns.settings or "tutorial,auto").split(","),
                             ns.examples or (64 if ns.tiny else 2000), work, batch=ns.batch,
                             lengths=bench_e2e.parse_lengths(ns.lengths) if ns.lengths else bench_e2e.LENGTHS)
        bench_e2e.print_table(rows)
        if ns.json:
            from lorapipe.runs import write_json

            write_json(Path(ns.json), {"rows": rows})
        return None
    settings = (ns.settings or "tutorial,speed,memory").split(",")
    known = list(bench.settings())
    unknown = [s for s in settings if s not in known]
    if unknown:
        raise UserError(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    with tempfile.TemporaryDirectory(prefix="lorapipe-bench-") as tmp:
        if ns.workdir:
            tmp = ns.workdir
        if ns.what == "parity":
            rows = bench.parity_bench(settings, ns.steps, Path(tmp))
            title = "Loss parity: SmolLM2-135M on lorapipe's training set (real weights, real data)"
        else:
            shapes = ["tiny"] if ns.tiny else (ns.shapes or "tinyllama-1.1b").split(",")
            rows = bench.train_bench(shapes, settings, 2 if ns.tiny else ns.steps, Path(tmp), ns.fixed_len,
                                     keep=bool(ns.workdir), sync=not ns.no_sync, warm=ns.warm)
            title = "QLoRA SFT: tutorial recipe vs lorapipe settings (same data, seed, effective batch 16)"
    bench.print_rows(title, rows)
    if ns.json:
        from lorapipe.runs import write_json

        write_json(Path(ns.json), {"rows": rows})


def _bench_abuse(ns: argparse.Namespace) -> int:
    import tempfile

    from lorapipe import bench_abuse
    from lorapipe.runs import write_json

    if not ns.run:
        raise UserError("bench abuse needs a run directory: lorapipe bench abuse runs/<name>")
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="lorapipe-bench-abuse-"))
    r = bench_abuse.run(Path(ns.run), work, hostile=ns.hostile, clients=int(ns.concurrency or 64),
                        requests=ns.requests, port=ns.port, overrides=_overrides(ns))
    bench_abuse.print_table(r)
    if ns.json:
        write_json(Path(ns.json), {"rows": r.rows, "server_5xx": r.server_5xx, "errors": r.errors,
                                   "alive_after": r.alive_after})
    ok = r.server_5xx == 0 and r.errors == 0 and r.alive_after
    print("PASS: no 5xx, no failed request, the server still answers" if ok else "FAIL: see the table")
    return 0 if ok else 1


def _bench_serve(ns: argparse.Namespace) -> None:
    import dataclasses
    import tempfile

    import torch

    from lorapipe import bench_serve as bs
    from lorapipe.runs import write_json

    cuda = torch.cuda.is_available()
    w = bs.default_work(cuda, ns.tiny)
    if ns.prompts:
        w.prompts = ns.prompts
    if ns.input_len:
        lo, _, hi = ns.input_len.partition(":")
        w.lo, w.hi = int(lo), int(hi or lo)
    if ns.output_len:
        w.output = ns.output_len
    if ns.concurrency:
        w.concurrency = tuple(int(c) for c in ns.concurrency.split(","))
    if ns.hf_batch:
        w.hf_batch = ns.hf_batch
    if ns.repeats:
        w.repeats = ns.repeats
    rows = (ns.rows or ("hf-static,vllm-base,vllm-lora1,online" if ns.tiny else ",".join(bs.OFFLINE + ["online"]))
            ).split(",")
    shapes = (ns.shapes or ("tinyllama-1.1b" if cuda else "smollm2-135m")).split(",")
    work = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="lorapipe-bench-serve-"))
    out = []
    for shape in shapes:
        res = bs.run(shape, rows, dataclasses.replace(w), work, ns.port)
        bs.print_table(res)
        out += res
    if ns.json:
        write_json(Path(ns.json), {"rows": out})


def cmd_verify(ns: argparse.Namespace) -> int:
    from lorapipe import verify

    r = verify.run(ns.run, _overrides(ns))
    print(r.summary, end="")
    print(f"written: {r.out} and verify.md")
    return 0 if r.passed else 1


def cmd_generate(ns: argparse.Namespace) -> None:
    from lorapipe import serve

    r = serve.generate(ns.run, ns.prompts, _overrides(ns))
    for rec in r.records[:3]:
        print(f"--- {rec['instruction'][:80]}\n{rec['text'][:400]}")
    print(f"\n{len(r.records)} answers written to {r.output}")


def cmd_serve(ns: argparse.Namespace) -> None:
    from lorapipe import serve

    def ready(server, p) -> None:
        print(f"\nOpenAI-compatible server: {server.url}/v1   (Ctrl-C, SIGTERM or SIGHUP stops it)")
        print("models:")
        for name, what in p.routes():
            print(f"  {name:<24} {what}")
        for note in p.notes:
            print(f"  note: {note}")
        tp, dp = p.serve.tensor_parallel_size or 1, p.serve.data_parallel_size
        if tp * dp > 1:
            import torch

            where = "GPUs" if torch.cuda.is_available() else "CPU workers"
            print(f"{where}: {tp * dp} ({dp} engine{'s' if dp > 1 else ''} behind the server, each split over {tp})")
        auth = " -H 'Authorization: Bearer $LORAPIPE_API_KEY'" if serve.api_key(p.serve) else ""
        if auth:
            print("requests must carry the key (serve.api_key); /health is open")
        if p.add_from:
            print(f"runs under {', '.join(map(str, p.add_from))} can be added: curl {server.url}/v1/load_lora_adapter"
                  f"{auth} -H 'Content-Type: application/json' -d '{{\"lora_name\": \"RUN\"}}'")
        print(f"log: {server.log_path}\nexample:\n  curl {server.url}/v1/chat/completions{auth} -H 'Content-Type: "
              f"application/json' -d '{{\"model\": \"{p.routes()[-1][0]}\", \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"Write a function that reverses a string.\"}}]}}'", flush=True)

    overrides = _overrides(ns)
    if ns.merged:
        overrides["serve.path"] = "merged"
    serve.serve(ns.runs, overrides, on_ready=ready)
    print("server stopped")


def cmd_demo(ns: argparse.Namespace) -> None:
    from lorapipe import demo

    demo.run(Path(ns.workdir), steps=ns.steps, examples=ns.examples, port=ns.port, quick=ns.quick)


VERBS = {
    # verb: (help, arguments, function)
    "train": ("QLoRA SFT from a config file -> runs/<name>/ (resumes an interrupted run of that name)", lambda p: (
        p.add_argument("config", nargs="?", help="YAML config (omit for all defaults)"),
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory"),
        p.add_argument("--force", action="store_true", help="train even when preflight finds a problem"),
        p.add_argument("--restart", action="store_true", help="an interrupted run of this name "
                       "(runs/<name>.incomplete/) is deleted and trained from step 0 instead of resumed"),
        _add_section_flags(p, list(SECTIONS), top_level=True)), cmd_train),
    "run": ("the whole pipeline, resumable: preflight -> train -> merge -> verify -> eval (-> serve); stages already "
            "done for this config are skipped, an interrupted one is resumed", lambda p: (
        p.add_argument("config", nargs="?", help="YAML config (omit for all defaults)"),
        p.add_argument("--serve", action="store_true", help="then serve the run (until Ctrl-C/SIGTERM)"),
        p.add_argument("--force", action="store_true", help="train even when preflight finds a problem"),
        p.add_argument("--restart", action="store_true", help="redo every stage: training from step 0 (deletes "
                       "runs/<name>.incomplete/ and replaces runs/<name>/)"),
        _add_section_flags(p, list(SECTIONS), top_level=True)), cmd_run),
    "preflight": ("check the data before training: lengths, truncation, loss share, EOS, rendered examples, "
                  "memory estimate, steps; exit 1 on a problem", lambda p: (
        p.add_argument("config", nargs="?", help="YAML config (omit for all defaults)"),
        _add_section_flags(p, list(SECTIONS), top_level=True)), cmd_preflight),
    "config": ("print the resolved config (YAML + overrides + defaults)", lambda p: (
        p.add_argument("config", nargs="?"), _add_section_flags(p, list(SECTIONS), top_level=True)), cmd_config),
    "merge": ("fuse the adapter into the full-precision base -> runs/<name>/merged/", lambda p: (
        p.add_argument("run"), p.add_argument("--dtype", default="float32",
                                              choices=["auto", "bfloat16", "float16", "float32"],
                                              help="saved dtype; float32 keeps the LoRA delta exact (auto: the base "
                                              "checkpoint's dtype, smaller but rounds the delta away)"),
        p.add_argument("--overwrite", action="store_true")), cmd_merge),
    "export": ("the merged model as GGUF (llama.cpp, Ollama), loaded back and checked -> runs/<name>/export/", lambda p: (
        p.add_argument("run"), p.add_argument("--format", default="gguf", choices=["gguf"]),
        p.add_argument("--outtype", default="f16", choices=["f16", "q8_0"], help="f16: checked at >= 99%% token "
                       "agreement with merged/; q8_0: half the size, agreement reported"),
        p.add_argument("--gguf-pre", default=None, help="llama.cpp's pre-tokenizer name (known for the embedded "
                       "SmolLM2; e.g. llama-bpe for Llama 3)"),
        p.add_argument("--prompts", type=int, default=64, help="held-out prompts for the check"),
        p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt for the check"),
        p.add_argument("--no-check", action="store_true", help="write the file only")), cmd_export),
    "push": ("upload runs/<name>/adapter (or merged/) with its model card to the Hugging Face Hub", lambda p: (
        p.add_argument("run"), p.add_argument("repo_id", help="NAMESPACE/NAME on the Hub (created if missing)"),
        p.add_argument("--merged", action="store_true", help="push merged/ instead of adapter/"),
        p.add_argument("--private", action="store_true", help="create the repository private"),
        p.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")),
        cmd_push),
    "compare": ("base vs fine-tuned side by side through vLLM -> runs/<name>/compare/", lambda p: (
        p.add_argument("run"), p.add_argument("--prompts", help="a .jsonl of Alpaca records or {'prompt': ...}"),
        _add_section_flags(p, ["eval", "serve"])), cmd_compare),
    "eval": ("executed pass@1/pass@k, format, stop rate, held-out loss: base vs fine-tuned -> runs/<name>/eval/",
             lambda p: (p.add_argument("run"), _add_section_flags(p, ["eval", "serve"])), cmd_eval),
    "bench": ("benchmarks that print a table: `bench eval RUN` (HumanEval greedy timing), `bench train` "
              "(tutorial recipe vs lorapipe settings), `bench parity` (losses on SmolLM2 + real data), `bench serve` "
              "(transformers vs vLLM: base, merged, adapters; offline and over HTTP), `bench abuse RUN` (the server under hostile "
              "requests and concurrent clients: 0 5xx, 0 failures)", lambda p: (
        p.add_argument("what", choices=["eval", "train", "parity", "serve", "abuse"]), p.add_argument("run", nargs="?"),
        p.add_argument("--hostile", type=int, default=1000, help="abuse: malformed or hostile requests to send"),
        p.add_argument("--requests", type=int, default=192, help="abuse: chat requests of the load phase"),
        p.add_argument("--limit", type=int, default=None, help="eval: only the first N tasks"),
        p.add_argument("--shapes", default=None, help="train: model shapes (tinyllama-1.1b,llama3-8b,llama3-70b; "
                       "default tinyllama-1.1b; llama3-70b's MLP weights are zeros, written sparse: for memory and "
                       "time only); serve: also smollm2-135m (default on CPU)"),
        p.add_argument("--rows", default=None, help="serve: rows to run (default all; see lorapipe.bench_serve)"),
        p.add_argument("--prompts", type=int, default=None, help="serve: prompts (GPU default 256, CPU 16)"),
        p.add_argument("--input-len", default=None, help="serve: prompt tokens LO:HI (GPU 100:1024, CPU 32:256)"),
        p.add_argument("--output-len", type=int, default=None, help="serve: generated tokens (GPU 256, CPU 32)"),
        p.add_argument("--concurrency", default=None, help="serve: online client concurrencies (GPU 1,16,64,256); abuse: clients (64)"),
        p.add_argument("--hf-batch", type=int, default=None, help="serve: transformers static batch (GPU 32)"),
        p.add_argument("--repeats", type=int, default=None, help="serve: timed passes per offline vLLM row, in one "
                       "engine; the median counts (3)"),
        p.add_argument("--port", type=int, default=8000, help="serve: port of the online rows' server"),
        p.add_argument("--settings", default=None, help="train/parity: settings to compare (see "
                       "`lorapipe.bench.settings`: tutorial, speed, memory, flags, ablations; default tutorial,speed,"
                       "memory); train --e2e: MODE[+graphs|+fsdp|+fsdp-cpu][:PROCESSES], default tutorial,auto"),
        p.add_argument("--e2e", action="store_true", help="train: run `lorapipe train` itself per setting (whole "
                       "command: wall, time before the loop, first step, loop, real tokens/s; see "
                       "lorapipe.bench_e2e)"),
        p.add_argument("--examples", type=int, default=None, help="train --e2e: training examples (2000; --tiny 64)"),
        p.add_argument("--batch", type=int, default=None, help="train --e2e: effective batch of every setting "
                       "(default 16: 4 x 4)"),
        p.add_argument("--lengths", default=None, help="train --e2e: tokens per example of the random shapes' "
                       "data, MIN-MAX (default 64-511; e.g. 3000-4095, data.max_length raised to hold them)"),
        p.add_argument("--steps", type=int, default=12, help="train/parity: optimizer steps per setting"),
        p.add_argument("--fixed-len", type=int, default=None, help="train: every example this many tokens "
                       "(default: 64-512)"),
        p.add_argument("--json", default=None, help="also write the rows to this JSON file"),
        p.add_argument("--workdir", default=None, help="train: keep the random models here and reuse them"),
        p.add_argument("--no-sync", action="store_true", help="train: time steps as a real run sees them (no GPU "
                       "synchronisation around each step; loss logged every 10 steps)"),
        p.add_argument("--warm", action="store_true", help="train: run every setting twice from the same "
                       "start and time the second run whole (compiled shapes all exist by then)"),
        p.add_argument("--tiny", action="store_true", help="train: a tiny model on CPU (CI: both paths run); serve: "
                       "a few tokens per row (CI: the table is produced)"),
        _add_section_flags(p, ["eval", "serve"])), cmd_bench),
    "verify": ("prove what is served is what was trained (PEFT/merged/vLLM agreement, template, stop); exit 1 "
               "on FAIL", lambda p: (p.add_argument("run"), _add_section_flags(p, ["verify", "serve"])), cmd_verify),
    "generate": ("batched offline generation with the adapter through vLLM", lambda p: (
        p.add_argument("run"), p.add_argument("prompts"), _add_section_flags(p, ["eval", "serve"])), cmd_generate),
    "serve": ("OpenAI-compatible vLLM server: the base + each run's adapter as its own model", lambda p: (
        p.add_argument("runs", nargs="+"),
        p.add_argument("--merged", action="store_true", help="serve the run's merged model instead of its adapter "
                       "(= --serve.path merged)"),
        _add_section_flags(p, ["serve"])), cmd_serve),
    "demo": ("the whole pipeline on the embedded SmolLM2, offline, on CPU", lambda p: (
        p.add_argument("--workdir", default="lorapipe-demo", help="where the demo's runs go"),
        p.add_argument("--steps", type=int, default=40, help="optimizer steps to train"),
        p.add_argument("--examples", type=int, default=160, help="training examples used"),
        p.add_argument("--port", type=int, default=8000),
        p.add_argument("--quick", action="store_true", help="CI: verify/compare/eval on a few prompts only")), cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapipe", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the libraries' own output on the console too (vLLM's engine log, datasets' bars); "
                             "otherwise vLLM's goes to the stage's log in the run's logs/")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (help_text, add_args, fn) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        flags = [o for a in parser._subparsers._group_actions[0].choices[ns.verb]._actions for o in a.option_strings]
        hint = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        print(f"error: unknown option {unknown[0]}" + (f" (did you mean {hint[0]}?)" if hint else
              f"; see `lorapipe {ns.verb} --help`"), file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 speaks for all
    logging.basicConfig(level=logging.WARNING if ns.quiet or rank > 0 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console.setup(ns.verbose)
    try:
        rc = ns.fn(ns)
    except Stopped as exc:
        if rank == 0:
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.code
    except UserError as exc:
        if ns.debug:
            raise
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 or isinstance(exc, OutOfMemory):  # under torchrun every
            print(f"error: {exc}", file=sys.stderr)  # process meets the same bad input: one message per machine
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print("interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
