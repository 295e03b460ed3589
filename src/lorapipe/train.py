"""QLoRA supervised fine-tuning: TRL's SFTTrainer over a PEFT LoRA on the (4-bit) base. Writes a run directory.

The run is built in runs/<name>.incomplete/ and renamed to runs/<name>/ only when training and saving succeed, so
a half-written run directory never exists. The in-progress folder holds resumable checkpoints and survives a crash:
the next `lorapipe train` of the same config resumes from its last whole checkpoint (lorapipe.checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from lorapipe import cards, checkpoint, console, preflight, speed, tracking
from lorapipe.config import RunCfg
from lorapipe.errors import OutOfMemory, Stopped, UserError
from lorapipe.models import device_summary, load_model, resolve_model
from lorapipe.runs import promote, write_json, write_text

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    train_loss: float
    steps: int
    runtime_s: float
    metrics: dict[str, Any]
    relaunched: bool = False  # trained by processes this one started (_scale_out), which said what they did


class _FirstStep(TrainerCallback):
    """When the first optimizer step ended: the time to first step that a user waits through (compilation, graph
    capture, the first batch), apart from the steady loop. On CUDA it also splits the peak memory into loading
    (everything before the loop: with FSDP loading on the GPU, each GPU holds the whole 4-bit base once) and
    training."""

    at: float | None = None
    loading_peak: int = 0

    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            self.loading_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kw):
        if self.at is None:
            self.at = time.perf_counter()


def _peaks_gib(first: _FirstStep) -> dict[str, float | None]:
    """Peak GPU memory of the run, of loading and of training, the largest over the processes (each its own GPU)."""
    if not torch.cuda.is_available():
        return {"peak_gpu_mem_gib": None}
    peaks = torch.tensor([first.loading_peak, torch.cuda.max_memory_allocated()], dtype=torch.float64,
                         device="cuda")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    loading, training = (round(float(x) / 2**30, 3) for x in peaks)
    return {"peak_gpu_mem_gib": max(loading, training), "peak_gpu_mem_loading_gib": loading,
            "peak_gpu_mem_training_gib": training}


def _progress_bar():
    """The Trainer's progress bar with the figures a person watches (loss, learning rate, real tokens/s) beside
    the step count and ETA, instead of a printed dict per step; every figure is still in logs/metrics.jsonl."""
    from transformers.trainer_callback import ProgressCallback

    class Progress(ProgressCallback):
        last: tuple[float, int] | None = None

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            now, seen = time.perf_counter(), int(state.num_input_tokens_seen or 0)
            post = {}
            if "loss" in logs:
                post["loss"] = f"{logs['loss']:.4f}"
            if "learning_rate" in logs:
                post["lr"] = f"{logs['learning_rate']:.2e}"
            if self.last is not None and now > self.last[0] and seen > self.last[1]:
                post["tok/s"] = f"{(seen - self.last[1]) / (now - self.last[0]):,.0f}"
            self.last = (now, seen)
            if post:
                self.training_bar.set_postfix(post, refresh=False)
            if "eval_loss" in logs:  # rare and worth a line of its own
                self.training_bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")

    return Progress()


def _process_age_s() -> float | None:
    """Seconds since this process started (imports, preflight, loading: what precedes the loop), from the kernel's
    clock ticks (psutil's create_time rounds the boot time to whole seconds)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _JsonlLogger(TrainerCallback):
    """Appends every logged step to logs/metrics.jsonl (read by reports and plots), with the memory in use."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and state.is_world_process_zero:  # the logged loss is already the mean over processes
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


def run(cfg: RunCfg, overwrite: bool = False, force: bool = False, restart: bool = False) -> TrainResult:
    """Train a LoRA adapter as `cfg` says and write runs/<name>/ (config, adapter, tokenizer, logs, metrics).

    An interrupted run of the same config (runs/<name>.incomplete/) is resumed from its last whole checkpoint;
    `restart` starts it over. SIGTERM/SIGINT save a checkpoint at the next step boundary and raise Stopped.
    """
    marks = {"start": _process_age_s() or 0.0}  # seconds since the process started, at each stage before the loop
    clock0 = time.perf_counter() - marks["start"]

    def mark(name: str) -> None:
        marks[name] = time.perf_counter() - clock0

    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    mark("imports")
    run_dir = cfg.run_dir()
    if run_dir.exists() and not overwrite:
        raise UserError(f"{run_dir}: already exists; pick another --name or pass --overwrite")
    tracking.check(cfg.train.report_to)  # a tracker that is missing or unreachable: before any model loads
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun (lorapipe.launch): join its process group
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs (sets the rank's GPU)
    main = state is None or state.is_main_process
    if state is not None:
        with state.main_process_first():  # rank 0 first: it converts and caches the embedded model once
            resolve_model(cfg.model)
    prep = preflight.prepare(cfg)  # then every process at once (in turns, N processes took N times as long)
    mark("preflight")
    if "scale_out" in prep.report:  # one GPU cannot hold this run, FSDP over some visible ones can: no model loaded
        plan = prep.report["scale_out"]
        del prep  # the tokenized data, not held here while the processes train
        return _scale_out(cfg, plan, overwrite, force, restart)
    if main:
        log.info("preflight:\n%s%s", preflight.summary(prep.report, examples=console.verbose()),
                 "" if console.verbose() else "(two rendered examples: preflight.md in the run directory)")
    preflight.check(prep, force)
    cfg.data.format = prep.format  # the resolved format: later stages render prompts the same way
    if prep.report["truncated"] and main:
        log.warning("%d of %d examples are longer than data.max_length=%d and are truncated (%d lose their whole "
                    "response and are dropped)", prep.report["truncated"], prep.report["examples"],
                    cfg.data.max_length, prep.report["response_lost"])
    base, dtype, tokenizer, rows, setting, estimate = (prep.base, prep.dtype, prep.tokenizer, prep.rows,
                                                         prep.setting, prep.estimate)
    # rank 0 makes or checks the in-progress folder (hashing every checkpoint file once); the others get its answer
    resume = checkpoint.prepare(cfg, checkpoint.fingerprint(rows), restart) if main else None
    if state is not None:
        from accelerate.utils import broadcast_object_list

        resume = broadcast_object_list([resume])[0]
    tmp = resume.folder

    from datasets import Dataset

    log.debug("train.mode=%s -> %s; estimated peak %.2f GiB", cfg.train.mode, setting.as_dict(), estimate["total"])
    rss_before = _current_rss_gib()
    attn = speed.register_varlen() if setting.padding_free else None
    with _out_of_memory(prep, lambda: "while loading the base", tmp):
        model = load_model(base, cfg.model, cfg.quant, dtype, attn=attn, on_cpu=setting.cpu_loading)
    mark("load")
    if cfg.quant.load_in_4bit and setting.kbit_prep:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=setting.checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(cfg.train.seed)  # the adapter's random init (the Trainer seeds only later): same seed, same run
    try:
        model = get_peft_model(model, _lora_config(cfg, model))
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    mark("lora")
    if setting.cache_dequant:
        speed.cache_dequantized(model, dtype)
    graphs = bool(setting.compile)
    if graphs:
        speed.compile_model(model, setting.compile)
    trainable, total = model.get_nb_trainable_parameters()
    mark("prepare")

    if main:
        write_json(tmp / "preflight.json", prep.report)
        write_text(tmp / "preflight.md", preflight.summary(prep.report))
    t = cfg.train
    fsdp = setting.shards > 1
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
        gradient_checkpointing=setting.checkpointing and not fsdp,  # FSDP checkpoints inside its layer wrappers
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **(_fsdp_args(model, setting.checkpointing) if fsdp else {}),
        logging_steps=t.logging_steps,
        eval_strategy="steps" if prep.val_rows else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=setting.micro_batch,
        save_strategy="no",  # checkpoint.Checkpoints decides when, and seals each save
        save_total_limit=2,  # a crash during one save leaves the one before whole
        seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to=tracking.trainer_report_to(t.report_to),
        run_name=cfg.name,
        max_length=None if setting.padding_free else cfg.data.max_length,  # rows are already cut
        padding_free=setting.padding_free and not graphs,  # graphs: lorapipe's bucketed padding-free batches
        remove_unused_columns=not graphs,
        use_liger_kernel=setting.liger,
        completion_only_loss=cfg.data.completion_only_loss,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,  # LoRA's trainable parameters all take part in every step; True costs
        # DDP a traversal of the autograd graph per step (and the Trainer picks True whenever checkpointing is off)
        ddp_broadcast_buffers=False,  # DDP's default re-sends every buffer from rank 0 before each forward: in speed
        # mode the cached dequantized weights (speed.cache_dequantized), ~14 GB for an 8B model. Every process
        # computes the same buffers from the same weights
        include_num_input_tokens_seen="non_padding",  # real tokens in every mode (padded batches too)
        disable_tqdm=False,
        **speed.async_args(setting.async_host),  # set only with CUDA graphs (preflight)
    )
    if args.n_gpu > 1:  # not launched distributed: the Trainer would wrap the model in DataParallel, which TRL refuses
        log.warning("%d GPUs visible: training on GPU %d only (--train.processes %d trains data-parallel on all "
                    "of them)", args.n_gpu, torch.cuda.current_device(), args.n_gpu)
        args._n_gpu = 1
    # torch >= 2.13 renamed DDP's broadcast_buffers (the Trainer still passes that name) and warns once per process
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    trainer_cls = speed.sft_trainer(setting.async_host) if graphs else SFTTrainer
    saver = checkpoint.Checkpoints(t.save_steps, t.save_minutes)
    first = _FirstStep()
    trackers, tracked = tracking.callbacks(t.report_to, tracking.preflight_params(prep.report), tmp)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(prep.val_rows) if prep.val_rows else None,
                         processing_class=tokenizer, callbacks=[_JsonlLogger(tmp / "logs" / "metrics.jsonl"), saver, first, *trackers]
                         + ([_ReleaseCpuMemory()] if not torch.cuda.is_available() else []),
                         data_collator=speed.BucketCollator(tokenizer.pad_token_id, setting.micro_batch)
                         if graphs else None)
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_bar())
    saver.keep_dtypes(trainer.model)
    if fsdp:
        _fsdp_precision(trainer, dtype)
        shard_without_copy()
    if graphs:
        speed.use_cuda_graphs(trainer)
    mark("trainer")
    start, started_unix = time.perf_counter(), time.time()
    before_loop = _process_age_s()
    step = lambda: f"at step {trainer.state.global_step + 1} of {trainer.state.max_steps}"  # noqa: E731
    with saver.signals(), _out_of_memory(prep, step, tmp):
        out = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    runtime = time.perf_counter() - start
    if saver.signal is not None:
        name = signal.Signals(saver.signal).name
        raise Stopped(
            f"{name}: stopped at step {trainer.state.global_step} of {trainer.state.max_steps}, checkpoint saved in "
            f"{tmp / 'logs'}\nresume with: {checkpoint.resume_command(tmp)}  (or your original command)",
            128 + saver.signal)
    val = trainer.evaluate() if prep.val_rows else {}
    peaks = _peaks_gib(first)  # every process takes part
    adapter = _gather_adapter(trainer.model) if fsdp else None  # every process sends its shards; rank 0 keeps
    if not main:  # rank 0 writes the run directory, once
        return TrainResult(run_dir, out.training_loss, trainer.state.global_step, runtime, {})
    if fsdp:
        _save_adapter(trainer.accelerator.unwrap_model(trainer.model), adapter, tmp / "adapter")
    else:
        trainer.model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    trainer.state.save_to_json(str(tmp / "logs" / "trainer_state.json"))
    tokens = int(trainer.state.num_input_tokens_seen or 0) - resume.tokens
    losses = [r["loss"] for r in _read_jsonl(tmp / "logs" / "metrics.jsonl") if "loss" in r]
    train_loss = sum(losses) / len(losses) if resume.step and losses else out.training_loss  # the whole run's
    metrics = {
        "train_loss": train_loss,
        "steps": trainer.state.global_step,
        "runtime_s": round(runtime, 2),
        "tokens_seen": tokens,  # real tokens (prompt + completion, no padding), all processes
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
        "before_loop_s": round(before_loop, 2) if before_loop is not None else None,  # this process: start to loop
        "loop_started_unix": round(started_unix, 3),
        "first_step_s": round(first.at - start, 2) if first.at else None,
        # where the time before the loop went: interpreter start and `import lorapipe.train` (start), the training
        # libraries (imports), data + preflight, loading (+ quantizing) the base, LoRA, caches and compilation
        # (prepare), building the SFTTrainer (it re-maps the dataset)
        "before_loop_phases_s": _phases(marks),
        "resumed_from_step": resume.step or None,
        "trainable_params": trainable,
        "total_params": total,
        "base_model": base,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "device": device_summary(),
        **peaks,  # per GPU, the largest over the processes
        "data": {k: prep.report[k] for k in ("format", "examples", "validation_examples", "truncated",
                                             "response_lost", "loss_token_share", "skipped_bad_rows")},
        "eval_loss": val.get("eval_loss"),
        "peak_rss_gib": round(_peak_rss_gib(), 3),
        "rss_before_model_gib": round(rss_before, 3),
        "layout": setting.as_dict(),
        "processes": prep.report["processes"],
        "memory_estimate_gib": estimate,
        "versions": _versions(),
    }
    write_json(tmp / "metrics.json", metrics)
    tracking.after_training(tmp, tracked, metrics)
    cards.write(tmp, cfg.name)  # adapter/README.md: a Hugging Face model card of what this run knows so far
    checkpoint.finish(tmp)
    promote(tmp, run_dir, overwrite=overwrite)
    return TrainResult(run_dir, train_loss, metrics["steps"], runtime, metrics)


def _fsdp_args(model, checkpointing: bool) -> dict[str, Any]:
    """SFTConfig's FSDP settings for QLoRA (accelerate's FSDP2): one shard group per decoder layer (the model's
    `_no_split_modules`), resharded after its forward; activation checkpointing by FSDP's layer wrappers (the
    Trainer's own would gather every layer again in backward); checkpoints as sharded state dicts of the adapter
    (`_gather_adapter` writes the whole one at the end). The 4-bit weights shard because lorapipe stores them in
    the compute dtype (bnb_4bit_quant_storage)."""
    layers = list(getattr(model, "_no_split_modules", None) or [])
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": layers,
        "reshard_after_forward": True, "activation_checkpointing": checkpointing,
        "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False}}


def _fsdp_precision(trainer, dtype: torch.dtype) -> None:
    """accelerate's bf16 policy for FSDP2 also casts every sharded module's outputs to bf16, the loss included: the
    logged loss then moves in steps of 0.4 % (measured: 12.5469, 12.5625, ... on the 8B shape). Here outputs keep the
    dtype they are computed in (the loss function's fp32). Gradients are still averaged in `dtype`: an fp32
    reduction failed in torch 2.11's FSDP2 (post_backward: 'FSDPParam' object has no attribute
    '_unsharded_param')."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype,
                                                                                         reduce_dtype=dtype)


def shard_without_copy() -> None:
    """Let each GPU free a weight's whole copy as soon as FSDP has made its shards.

    accelerate 1.15's `fsdp2_prepare_model` keeps two kinds of reference to whole weights until it returns:
    - `model.state_dict()`, taken before it shards. It needs that copy only for `cpu_ram_efficient_loading`, which
      it refuses for 4-bit weights and lorapipe leaves off. The copy kept every whole weight alive while `fully_shard`
      built the shards, so each GPU held the whole 4-bit base and its share at once (measured, Llama-3-8B shape on 2
      GPUs: 7.96 GiB while loading against 5.41 GiB on one GPU). Here the model gives accelerate an empty state dict
      for that one call.
    - the embedding and output weights, to check whether they are tied. `fully_shard` replaces every weight it shards
      by a new parameter, and leaves the old one to be freed, but accelerate still holds these two: with the base
      quantized in CPU memory (train.fsdp_loading cpu), FSDP had moved them whole to the GPU, and they stayed there
      (measured, 8B shape, 2 processes: 4.74 GiB while loading against 2.79 GiB of shards). Here each old parameter
      that `fully_shard` replaced gives up its data as the call returns; the objects stay, so the tying check is
      unchanged.
    """
    import accelerate.accelerator as acc

    original = acc.fsdp2_prepare_model
    if getattr(original, "lorapipe", False):
        return

    def prepare(accelerator, model):
        if accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:  # the one case that reads the copy
            return original(accelerator, model)
        import torch.distributed.fsdp as fsdp

        real = fsdp.fully_shard

        def fully_shard(module, *args, **kwargs):
            modules = module if isinstance(module, (list, tuple)) else [module]
            before = [p for m in modules for p in m.parameters()]
            out = real(module, *args, **kwargs)
            kept = {id(p) for m in modules for p in m.parameters()}
            for p in before:
                if id(p) not in kept:  # replaced by its shards
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            return out

        model.state_dict = lambda *args, **kwargs: {}
        fsdp.fully_shard = fully_shard  # accelerate imports it from there when called
        try:
            return original(accelerator, model)
        finally:
            fsdp.fully_shard = real
            del model.state_dict

    prepare.lorapipe = True
    acc.fsdp2_prepare_model = prepare


def _gather_adapter(model) -> dict[str, torch.Tensor] | None:
    """The LoRA weights of an FSDP run, whole, on rank 0 (None elsewhere). Checkpoints hold each process's shards
    (sharded state dicts: a save gathers nothing, and never the 4-bit base); the adapter users take away is the
    whole one, named as a one-GPU run names it (without the activation-checkpointing wrappers' prefix)."""
    main = torch.distributed.get_rank() == 0
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective: every process, same order
            if main:
                out[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().to("cpu", copy=True)
    return out if main else None


def _save_adapter(model, weights: dict[str, torch.Tensor], out: Path) -> None:
    """Write gathered LoRA weights as PEFT writes an adapter (adapter_model.safetensors without the adapter's name
    in the keys, adapter_config.json in inference mode). PEFT's own save_pretrained, given these weights, keeps none
    of them: it matches them against the model's module names, which FSDP's checkpoint wrappers have changed."""
    import copy

    from safetensors.torch import save_file

    name = model.active_adapter
    out.mkdir(parents=True, exist_ok=True)
    save_file({k.replace(f".{name}.", "."): v.contiguous() for k, v in weights.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(out))


def _scale_out(cfg: RunCfg, plan: dict[str, Any], overwrite: bool, force: bool, restart: bool) -> TrainResult:
    """Train FSDP-sharded over `plan["processes"]` GPUs (lorapipe.launch), where train.processes was left unset and
    preflight found that the run fits them and not one GPU: what the user would otherwise be told to rerun with.

    This process has read the data and measured the GPU (preflight), and keeps its CUDA context on GPU 0 while the
    processes train (518 MiB on an H100 with the GPU set); the free memory preflight measured already excludes it.
    Resuming takes the same path: the same config meets the same preflight, and the in-progress folder holds the
    FSDP run's checkpoints."""
    n = plan["processes"]
    log.info("preflight: %s: training FSDP-sharded over %d GPUs instead (train.processes unset; "
             "--train.processes 1 keeps one GPU)", plan["why"], n)
    wide = cfg.model_copy(deep=True)
    wide.train.processes, wide.train.fsdp = n, True
    return dataclasses.replace(launched(wide, n, overwrite, force, restart), relaunched=True)


def launched(cfg: RunCfg, n: int, overwrite: bool = False, force: bool = False, restart: bool = False
             ) -> TrainResult:
    """`cfg` trained in `n` processes under torchrun (lorapipe.launch), its finished run read back; a launch that
    failed or stopped raises Stopped with its exit code (the processes have said why)."""
    from lorapipe import launch

    code = launch.train(cfg, n, overwrite=overwrite, force=force, restart=restart)
    if code:
        raise Stopped(f"training in {n} {'FSDP-sharded ' if cfg.train.fsdp else ''}processes exited with code {code} "
                      "(their output is above)", code)
    m = json.loads((cfg.run_dir() / "metrics.json").read_text())
    return TrainResult(cfg.run_dir(), m["train_loss"], m["steps"], m["runtime_s"], m)


@contextlib.contextmanager
def _out_of_memory(prep: preflight.Prepared, when, folder: Path):
    """CUDA's out-of-memory traceback, replaced by what happened and what fits: preflight's estimate is a model
    (within -8 % ... +11 % of the peaks measured, -17 % with CUDA graphs), and another process may take memory from
    the same GPU."""
    try:
        yield
    except torch.OutOfMemoryError:
        pass  # left before the message is built: the traceback holds the step's tensors
    else:
        return
    est, rank, dev = prep.estimate, int(os.environ.get("RANK", "0")), torch.cuda.current_device()
    gpu = f"GPU {dev}" + (f", process {rank}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    alt = prep.alternatives().text
    raise OutOfMemory(
        f"CUDA out of memory {when()} ({gpu}: {torch.cuda.get_device_properties(dev).total_memory / 2**30:.1f} "
        f"GiB, {est.get('gpu_free', 0):.1f} free before loading; preflight estimated {preflight.need(est):.1f} GiB "
        f"for the {prep.setting.mode} mode's layout). " + (f"What fits by preflight's estimate: {alt}. " if alt else
                                                          "") + "Other processes on this GPU take from the same "
        f"memory (nvidia-smi). Rerun with the change and --restart (the run's folder {folder} was started with "
        "this layout)") from None


def _phases(marks: dict[str, float]) -> dict[str, float]:
    names, out, prev = list(marks), {}, 0.0
    for n in names:
        out[n] = round(marks[n] - prev, 2)
        prev = marks[n]
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
