"""QLoRA supervised fine-tuning: TRL's SFTTrainer over a PEFT LoRA on the (4-bit) base. Writes a run directory.

The run is built in a temp folder beside runs/<name> and renamed into place only when training and saving succeed,
so a failed or interrupted run never leaves a half-written run directory behind.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorapipe import preflight, speed
from lorapipe.config import RunCfg, dump_config
from lorapipe.errors import UserError
from lorapipe.models import device_summary, load_model
from lorapipe.runs import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    train_loss: float
    steps: int
    runtime_s: float
    metrics: dict[str, Any]


class _JsonlLogger(TrainerCallback):
    """Appends every logged step to logs/metrics.jsonl (read by reports and plots), with the memory in use."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            mem = ({"gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)} if torch.cuda.is_available()
                   else {"rss_gib": round(_current_rss_gib(), 3), "rss_peak_gib": round(_peak_rss_gib(), 3)})
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs, **mem}) + "\n")


def _target_modules(model, targets: list[str] | str) -> list[str]:
    """'all-linear' as short module names (q_proj, ..., down_proj), the output layer excluded.

    PEFT would expand it to one full name per layer on small models; short names keep the adapter config readable
    and are what vLLM matches LoRA modules by.
    """
    if targets != "all-linear":
        return list(targets)
    out_layer = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and mod is not out_layer}
    return sorted(names)


def _lora_config(cfg: RunCfg, model):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=_target_modules(model, cfg.lora.target_modules), bias=cfg.lora.bias,
                      task_type="CAUSAL_LM")


class _ReleaseCpuMemory(TrainerCallback):
    """On CPU, hand freed memory back to the OS after every step.

    glibc raises its mmap threshold after large frees, so activation buffers of one step end up on the heap and stay
    resident; over a run the resident set creeps up by the size of the largest batches (measured: +1.1 GiB over 30
    steps of batch 2 on SmolLM2). A fixed threshold keeps large buffers mmapped (freed for real), and malloc_trim
    returns the heap's free top.
    """

    def __init__(self):
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        self.libc = ctypes.CDLL(name) if name else None
        if self.libc is not None and hasattr(self.libc, "mallopt"):
            self.libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed

    def on_step_end(self, args, state, control, **kw):
        if self.libc is not None and hasattr(self.libc, "malloc_trim"):
            self.libc.malloc_trim(0)


def _peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def run(cfg: RunCfg, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Train a LoRA adapter as `cfg` says and write runs/<name>/ (config, adapter, tokenizer, logs, metrics)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    run_dir = cfg.run_dir()
    if run_dir.exists() and not overwrite:
        raise UserError(f"{run_dir}: already exists; pick another --name or pass --overwrite")
    prep = preflight.prepare(cfg)
    log.info("preflight:\n%s", preflight.summary(prep.report))
    preflight.check(prep, force)
    cfg.data.format = prep.format  # the resolved format: later stages render prompts the same way
    if prep.report["truncated"]:
        log.warning("%d of %d examples are longer than data.max_length=%d and are truncated (%d lose their whole "
                    "response and are dropped)", prep.report["truncated"], prep.report["examples"],
                    cfg.data.max_length, prep.report["response_lost"])
    base, dtype, tokenizer, rows, setting, estimate = (prep.base, prep.dtype, prep.tokenizer, prep.rows,
                                                         prep.setting, prep.estimate)

    from datasets import Dataset

    log.info("train.mode=%s -> %s; estimated peak %.2f GiB", cfg.train.mode, setting.as_dict(), estimate["total"])
    rss_before = _current_rss_gib()
    attn = speed.register_varlen() if setting.padding_free else None
    model = load_model(base, cfg.model, cfg.quant, dtype, attn=attn)
    if cfg.quant.load_in_4bit and setting.kbit_prep:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=setting.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model = get_peft_model(model, _lora_config(cfg, model))
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    if setting.cache_dequant:
        speed.cache_dequantized(model, dtype)
    graphs = bool(setting.compile)
    if graphs:
        speed.compile_model(model, setting.compile)
    trainable, total = model.get_nb_trainable_parameters()

    with atomic_dir(run_dir, overwrite=overwrite) as tmp:
        (tmp / "logs").mkdir()
        write_text(tmp / "config.yaml", dump_config(cfg))
        write_json(tmp / "preflight.json", prep.report)
        write_text(tmp / "preflight.md", preflight.summary(prep.report))
        t = cfg.train
        args = SFTConfig(
            output_dir=str(tmp / "logs"),
            per_device_train_batch_size=setting.micro_batch,
            gradient_accumulation_steps=setting.accum,
            learning_rate=t.learning_rate,
            num_train_epochs=t.num_train_epochs,
            max_steps=t.max_steps,
            warmup_steps=t.warmup_ratio,
            lr_scheduler_type=t.lr_scheduler_type,
            optim=setting.optim,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            gradient_checkpointing=setting.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=t.logging_steps,
            eval_strategy="steps" if prep.val_rows else "no",
            eval_steps=t.eval_steps,
            per_device_eval_batch_size=setting.micro_batch,
            save_strategy="steps" if t.save_steps else "no",
            save_steps=t.save_steps or 500,
            seed=t.seed,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            max_length=None if setting.padding_free else cfg.data.max_length,  # rows are already cut
            padding_free=setting.padding_free and not graphs,  # graphs: lorapipe's bucketed padding-free batches
            remove_unused_columns=not graphs,
            use_liger_kernel=setting.liger,
            completion_only_loss=cfg.data.completion_only_loss,
            dataset_num_proc=None,
            include_num_input_tokens_seen=True,
            disable_tqdm=False,
            **speed.async_args(setting.async_host),  # set only with CUDA graphs (preflight)
        )
        trainer_cls = speed.sft_trainer(setting.async_host) if graphs else SFTTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             eval_dataset=Dataset.from_list(prep.val_rows) if prep.val_rows else None,
                             processing_class=tokenizer, callbacks=[_JsonlLogger(tmp / "logs" / "metrics.jsonl")]
                             + ([_ReleaseCpuMemory()] if not torch.cuda.is_available() else []),
                             data_collator=speed.BucketCollator(tokenizer.pad_token_id, setting.micro_batch)
                             if graphs else None)
        if graphs:
            speed.use_cuda_graphs(trainer)
        start = time.perf_counter()
        out = trainer.train()
        runtime = time.perf_counter() - start
        val = trainer.evaluate() if prep.val_rows else {}
        trainer.model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")
        trainer.state.save_to_json(str(tmp / "logs" / "trainer_state.json"))
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        metrics = {
            "train_loss": out.training_loss,
            "steps": trainer.state.global_step,
            "runtime_s": round(runtime, 2),
            "tokens_seen": tokens,
            "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
            "trainable_params": trainable,
            "total_params": total,
            "base_model": base,
            "compute_dtype": str(dtype).replace("torch.", ""),
            "device": device_summary(),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available()
            else None,
            "data": {k: prep.report[k] for k in ("format", "examples", "validation_examples", "truncated",
                                                 "response_lost", "loss_token_share", "skipped_bad_rows")},
            "eval_loss": val.get("eval_loss"),
            "peak_rss_gib": round(_peak_rss_gib(), 3),
            "rss_before_model_gib": round(rss_before, 3),
            "layout": setting.as_dict(),
            "memory_estimate_gib": estimate,
            "versions": _versions(),
        }
        write_json(tmp / "metrics.json", metrics)
    return TrainResult(run_dir, out.training_loss, metrics["steps"], runtime, metrics)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
