"""`lorapipe bench`: measured numbers, printed as a table (never timed assertions in tests).

bench eval RUN   HumanEval (164 tasks) greedy, fine-tuned model only, through vLLM + the sandbox: wall time of
                 generation and of execution, tokens/s, pass@1.
"""

from __future__ import annotations

import dataclasses
import json
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
from lorapipe.runs import load_run, write_json, write_safetensors


def eval_speed(run_dir: str | Path, overrides: dict[str, Any] | None = None, limit: int | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = load_run(run_dir, overrides)
    ts = tasks.humaneval(limit)
    prompts = data_mod.prompts_for([{"instruction": t.instruction, "input": ""} for t in ts], cfg.data,
                                   run_dir / "adapter")
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


# ---------------------------------------------------------------------------------------------------------------
# bench train: the tutorial recipe vs lorapipe's speed settings, same data, seed and effective batch.

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (64, 128, 2, 4, 2, 640),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256),  # written sparse: _sparse_model_dir
}
SPARSE = {"llama3-70b"}  # its bf16 weights (141 GB) would not fit most disks, nor the H200 machine's 64 GiB


def _random_model_dir(shape: str, out: Path) -> Path:
    """A randomly initialised Llama of the named shape, saved in bf16 so that bitsandbytes can quantize on load."""
    import torch
    from transformers import LlamaForCausalLM

    if shape in SPARSE:
        return _sparse_model_dir(SHAPES[shape], out)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(_llama_config(SHAPES[shape])).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    _word_tokenizer(SHAPES[shape][5]).save_pretrained(out)  # TRL wants a tokenizer (pad/eos) even for token-id data
    return out


def _llama_config(dims: tuple[int, ...], **extra):
    """The Llama config of a bench shape (hidden, intermediate, layers, heads, kv_heads, vocab)."""
    from transformers import LlamaConfig

    h, inter, layers, heads, kv, vocab = dims
    return LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def _sparse_model_dir(dims: tuple[int, ...], out: Path) -> Path:
    """A Llama of shape `dims` whose MLP weights cost no disk: they are holes in sparse safetensors files, which read
    back as zeros. Attention weights, embeddings and output layer are random bf16, norms ones. For the Llama-3-70B
    shape that is 27 GB written instead of 141 GB. Loading, quantizing, memory and step time are those of real
    weights of the shape (bitsandbytes and the matrix kernels do the same work whatever the values), so these runs
    measure memory and speed. The loss is not a real model's: each MLP adds nothing to the residual, and LoRA on
    MLP layers gets no gradient (on q/k/v/o, the default targets, it trains)."""
    import torch

    h, inter, layers, heads, kv, vocab = dims
    out.mkdir(parents=True, exist_ok=True)
    hd = h // heads
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def write(name: str, tensors: dict[str, tuple[tuple[int, ...], torch.Tensor | None]]) -> dict[str, str]:
        """None: a hole, read back as zeros."""
        write_safetensors(out / name, {k: (torch.bfloat16, shape) for k, (shape, _) in tensors.items()},
                          lambda k: tensors[k][1])
        return dict.fromkeys(tensors, name)

    ones = torch.ones(h, dtype=torch.bfloat16)
    index = write("model-embeddings.safetensors", {"model.embed_tokens.weight": ((vocab, h), rand(vocab, h)),
                                                   "lm_head.weight": ((vocab, h), rand(vocab, h)),
                                                   "model.norm.weight": ((h,), ones)})
    for i in range(layers):
        p = f"model.layers.{i}."
        index |= write(f"model-layer-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": ((heads * hd, h), rand(heads * hd, h)),
            p + "self_attn.k_proj.weight": ((kv * hd, h), rand(kv * hd, h)),
            p + "self_attn.v_proj.weight": ((kv * hd, h), rand(kv * hd, h)),
            p + "self_attn.o_proj.weight": ((h, heads * hd), rand(h, heads * hd)),
            p + "mlp.gate_proj.weight": ((inter, h), None), p + "mlp.up_proj.weight": ((inter, h), None),
            p + "mlp.down_proj.weight": ((h, inter), None),
            p + "input_layernorm.weight": ((h,), ones), p + "post_attention_layernorm.weight": ((h,), ones)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    _llama_config(dims, dtype="bfloat16").save_pretrained(out)
    _word_tokenizer(vocab).save_pretrained(out)
    return out


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # so that text prompts ("t5 t9 ...") round-trip to ids
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _synthetic_data(n: int, vocab: int, seed: int, lo: int = 64, hi: int = 512) -> list[dict[str, list[int]]]:
    """Token sequences of 64-512 tokens; the first ~30 % is prompt (no loss), the rest completion."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, vocab) for _ in range(length - 1)] + [2]
        cut = max(1, int(length * 0.3))
        rows.append({"input_ids": ids, "completion_mask": [0] * cut + [1] * (length - cut)})
    return rows


def settings() -> dict:
    from lorapipe.speed import Setting, liger_available

    liger = liger_available()
    return {
        # the tutorial recipe, exactly: batch 4 x accumulation 4, k-bit prep, checkpointing, paged AdamW, bf16
        "tutorial": Setting("tutorial", 4, 4, True, True, False, False, False, "paged_adamw_32bit"),
        # flags only: the same effective batch in one pass, no k-bit prep, no checkpointing, (+ Liger)
        "flags": Setting("flags", 16, 1, False, False, False, False, False, "adamw_torch_fused"),
        "flags+liger": Setting("flags+liger", 16, 1, False, False, False, False, liger, "adamw_torch_fused"),
        # lorapipe's speed mode (+ padding-free varlen attention + cached dequantized weights), and ablations
        "speed": Setting("speed", 16, 1, False, False, True, True, liger, "adamw_torch_fused"),
        "speed-nocache": Setting("speed-nocache", 16, 1, False, False, True, False, liger, "adamw_torch_fused"),
        "speed-noliger": Setting("speed-noliger", 16, 1, False, False, True, True, False, "adamw_torch_fused"),
        # torch.compile of each layer instead of Liger (dynamo cannot trace Liger's autograd functions)
        "speed+compile": Setting("speed+compile", 16, 1, False, False, True, True, False, "adamw_torch_fused",
                                 "layers"),
        # + CUDA graphs: static bucketed padding-free shapes, layers compiled with mode="reduce-overhead"
        "speed+graphs": Setting("speed+graphs", 16, 1, False, False, True, True, False, "adamw_torch_fused",
                                "graphs"),
        # + the whole decoder stack as one CUDA graph per bucket, no host-device sync inside a step: lorapipe's
        # `train.cuda_graphs`; and the same with TRL's and the Trainer's per-step syncs left in
        "speed+mgraphs": Setting("speed+mgraphs", 16, 1, False, False, True, True, False, "adamw_torch_fused",
                                 "model-graphs", True),
        "speed+mgraphs-sync": Setting("speed+mgraphs-sync", 16, 1, False, False, True, True, False,
                                      "adamw_torch_fused", "model-graphs"),
        # lorapipe's memory mode at the tutorial's micro-batch
        "memory": Setting("memory", 4, 4, True, False, True, False, liger, "paged_adamw_8bit"),
    }


def train_speed(model_dir: Path, setting_name: str, rows: list[dict], steps: int, workdir: Path, seed: int = 0,
                label: str = "", sync: bool = True, warm: bool = False) -> dict:
    """Run `steps` optimizer steps of QLoRA SFT (NF4 + double quant, LoRA r=16 q/k/v/o, effective batch 16) on
    pre-tokenized `rows` and measure them. `sync`: synchronise the GPU around every step and log every step (exact
    per-step times and losses); without it, steps are timed as a real run sees them (the host may run ahead into the
    next step while the GPU finishes this one, so only whole-run figures mean anything) and the loss is logged every
    10 steps. `warm`: run the steps twice from the same initial adapter, with a fresh trainer and optimizer, and
    measure the second run: every compiled shape exists by then, as in the long run of a real job (an eager
    setting warms up for 3 steps only)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorapipe import speed
    from lorapipe.config import QuantCfg
    from lorapipe.models import ensure_pad_token, quantization_config

    s = settings()[setting_name]
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = speed.register_varlen() if s.padding_free else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization_config(QuantCfg(), dtype),
        device_map={"": 0} if cuda else {"": "cpu"}, attn_implementation=attn)
    if s.kbit_prep:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=targets))
    if s.cache_dequant:
        speed.cache_dequantized(model, dtype)
    graphs = s.compile in ("graphs", "model-graphs") and cuda
    if s.compile and (cuda or s.compile == "layers"):
        speed.compile_model(model, s.compile)
    times: list[float] = []

    span: dict[str, float] = {}  # the whole run, first step's start to last step's end: what a long job sees

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda and (sync or state.global_step == 0):
                torch.cuda.synchronize()
            self.t = time.perf_counter()
            if state.global_step == 0:
                span["start"] = self.t

        def on_step_end(self, args, state, control, **kw):
            if cuda and (sync or state.global_step == state.max_steps):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if state.global_step == state.max_steps:
                span["end"] = time.perf_counter()

    callbacks = [Clock()]
    # LORAPIPE_PROFILE=N: kernel and CPU tables of steps N+1 and N+2, to find where the time goes;
    # LORAPIPE_TRACE=path.json also writes their Chrome trace
    prof_at = int(os.environ.get("LORAPIPE_PROFILE") or 0)
    if prof_at and cuda:
        from torch.profiler import ProfilerActivity, profile

        class Prof(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == prof_at:
                    self.p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.p.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == prof_at + 2:
                    self.p.__exit__(None, None, None)
                    avg = self.p.key_averages()
                    print(avg.table(sort_by="cuda_time_total", row_limit=25), flush=True)
                    print(avg.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
                    if os.environ.get("LORAPIPE_TRACE"):
                        self.p.export_chrome_trace(os.environ["LORAPIPE_TRACE"])

        callbacks.append(Prof())
    args = SFTConfig(output_dir=str(workdir), per_device_train_batch_size=s.micro_batch,
                     gradient_accumulation_steps=s.accum, max_steps=steps, learning_rate=2e-4,
                     optim=s.optim if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
                     gradient_checkpointing=s.checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1 if sync else 10,
                     report_to="none",
                     save_strategy="no", seed=seed, data_seed=seed,
                     max_length=None if s.padding_free else max(len(r["input_ids"]) for r in rows),
                     remove_unused_columns=not graphs,
                     padding_free=s.padding_free and not graphs, completion_only_loss=True, use_liger_kernel=s.liger,
                     dataloader_pin_memory=cuda, disable_tqdm=True, warmup_steps=0, lr_scheduler_type="constant",
                     max_grad_norm=0.3, **speed.async_args(graphs and s.async_host))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)  # as `train` does: the bucket padding needs a pad id (SmolLM2's GGUF tokenizer has none)
    collator = speed.BucketCollator(tok.pad_token_id, s.micro_batch) if graphs else None
    trainer_cls = speed.sft_trainer(s.async_host) if graphs else SFTTrainer

    def new_trainer(model=model, args=args):
        t = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=callbacks,
                        processing_class=tok, data_collator=collator)
        if graphs:
            speed.use_cuda_graphs(t)
        return t

    if warm:
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # nothing to compile in an eager setting: a few steps warm the allocator and the kernels
        new_trainer(args=args if s.compile else dataclasses.replace(args, max_steps=min(steps, 3))).train()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        times.clear()
    trainer = new_trainer()
    if os.environ.get("LORAPIPE_CPROFILE"):  # Python-side time of the whole run, by function
        import cProfile
        import pstats

        with cProfile.Profile() as cp:
            trainer.train()
        st = pstats.Stats(cp)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(45)
    else:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    raw = {}
    if prof_at and cuda and not graphs:  # forward+backward alone, outside the Trainer (eager layouts only)
        batch = {k: v.to(0) if hasattr(v, "to") else v for k, v in trainer.data_collator(
            [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in
                                                      zip(r["input_ids"], r["completion_mask"])]}
             for r in rows[:16]]).items()}
        fwd_bwd = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.cuda.synchronize()
            fwd_bwd.append(time.perf_counter() - t0)
        raw = {"raw_fwd_bwd_s": round(sum(fwd_bwd[2:]) / 4, 4)}
    used = rows[: 16 * steps] if len(rows) >= 16 * steps else (rows * (16 * steps // len(rows) + 1))[: 16 * steps]
    tokens = sum(len(r["input_ids"]) for r in used)
    loss_tokens = sum(sum(r["completion_mask"][1:]) for r in used)
    steady = times[2:] or times  # the first steps pay for kernel selection and allocator warm-up
    per_step = sum(steady) / len(steady)
    config = AutoConfig.from_pretrained(model_dir)
    mean_len = tokens / len(used)
    result = {"shape": label, "setting": setting_name, "steps": steps, "micro_batch": f"{s.micro_batch}x{s.accum}",
              "s_per_step": round(per_step, 3), "tokens_per_s": round(tokens / steps / per_step, 1),
              "loss_tokens_per_s": round(loss_tokens / steps / per_step, 1), **raw,
              "median_tokens_per_s": round(tokens / steps / sorted(steady)[len(steady) // 2], 1),
              "step_s": [round(t, 3) for t in times],
              # steps back to back, with the data loading and logging between them (compilation too unless warm)
              "run_s": round(span["end"] - span["start"], 3),
              "run_tokens_per_s": round(tokens / (span["end"] - span["start"]), 1),
              "warm": warm,
              "losses": [round(x, 4) for x in losses]}
    if cuda:
        result.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                      mfu=round(speed.flops_per_token(config, mean_len) * tokens / steps / per_step / 790e12, 4))
        est_tokens = speed.micro_tokens([len(r["input_ids"]) for r in used], s.micro_batch, s.padding_free,
                                        speed.BUCKET if graphs else 0)
        result["estimate_gib"] = speed.estimate_memory(config, s, est_tokens, quantized=True, dtype_bytes=2, r=16,
                                                       targets=targets, loss_share=loss_tokens / tokens)["total"]
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def train_bench(shapes: list[str], settings: list[str], steps: int, workdir: Path, fixed_len: int | None = None,
                keep: bool = False, sync: bool = True, warm: bool = False) -> list[dict]:
    """Random-weight models of the named shapes; synthetic examples of 64-512 tokens (or exactly `fixed_len`).
    With `keep`, models are saved in `workdir` once and reused by later calls."""
    import shutil

    results = []
    for shape in shapes:
        model_dir = workdir / f"model-{shape}"
        if not (keep and (model_dir / "config.json").exists()):
            _random_model_dir(shape, model_dir)
        lo, hi = (fixed_len, fixed_len) if fixed_len else (64, 512)
        rows = _synthetic_data(16 * steps, SHAPES[shape][5], 0, lo, hi)
        for setting in settings:
            results.append(train_speed(model_dir, setting, rows, steps, workdir / f"out-{shape}-{setting}",
                                       label=shape, sync=sync, warm=warm))
            print(json.dumps(results[-1]), flush=True)
        if not keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    _ratios(results)
    return results


def parity_bench(settings: list[str], steps: int, workdir: Path) -> list[dict]:
    """Loss parity on real weights and real data: the embedded SmolLM2-135M on lorapipe's shipped training set."""
    from transformers import AutoTokenizer

    from lorapipe.config import DataCfg, ModelCfg
    from lorapipe.models import resolve_model

    model_dir = resolve_model(ModelCfg())
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = data_mod.to_prompt_completion(data_mod.load_records(DataCfg()), "tutorial")
    rows, _ = data_mod.tokenize(tok, pairs, 512)
    rows = [r for r in rows if any(r["completion_mask"])]
    results = []
    for setting in settings:
        results.append(train_speed(Path(model_dir), setting, rows, steps, workdir / f"out-parity-{setting}",
                                   label="smollm2-135m"))
        print(json.dumps(results[-1]), flush=True)
    _ratios(results)
    ref = next((r for r in results if r["setting"] == "tutorial"), None)
    if ref:
        for r in results:
            diffs = [abs(a - b) / b for a, b in zip(r["losses"], ref["losses"])]
            r["max_loss_rel_diff"] = round(max(diffs), 4)
            r["mean_loss_rel_diff"] = round(sum(diffs) / len(diffs), 4)
    return results


def _ratios(results: list[dict]) -> None:
    base = {r["shape"]: r for r in results if r["setting"] == "tutorial"}
    for r in results:
        if r["shape"] in base:
            r["speedup"] = round(r["tokens_per_s"] / base[r["shape"]]["tokens_per_s"], 2)
            # steady state: the median step (CUDA graphs record once per new shape bucket, then replay)
            r["median_speedup"] = round(r["median_tokens_per_s"] / base[r["shape"]]["median_tokens_per_s"], 2)
            r["run_speedup"] = round(r["run_tokens_per_s"] / base[r["shape"]]["run_tokens_per_s"], 2)


def print_rows(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = list(dict.fromkeys(c for r in rows for c in r if c != "losses")) + ["first losses"]
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols[:-1]], str(r["losses"][:5]))
    Console(width=220).print(table)
