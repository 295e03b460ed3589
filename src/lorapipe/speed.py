"""Training speed and memory: the levers lorapipe adds on top of TRL/PEFT/bitsandbytes, and the mode that uses them.

Modes (`train.mode`), all at the configured hyper-parameters (effective batch, lr, LoRA, data, seed):
- tutorial: the configured flags exactly as written (the QLoRA tutorial recipe by default).
- speed:    the whole effective batch in one padding-free micro-batch (variable-length attention, no padding and no
            cross-example attention), no k-bit prep (norms and embeddings stay bf16), no checkpointing, the NF4
            weights dequantized once and kept (bitsandbytes would dequantize them again in every matmul, forward and
            backward, to the very same bf16 values), Liger kernels where installed, fused AdamW.
- memory:   the configured micro-batch, padding-free, checkpointing, no k-bit prep (it would upcast the embeddings
            and output layer to fp32), Liger kernels where installed, paged 8-bit AdamW; the loss is TRL's chunked
            fused LM head in every mode.
- auto:     speed when its estimated peak fits in the GPU's free memory, else memory; the configured flags on CPU.

`train.cuda_graphs` (speed mode, CUDA) also compiles the decoder stack into CUDA graphs, one per length bucket (one per
layer for large models: `graphs_kind`), and keeps the host from waiting on the GPU inside a step, for models whose step
the host CPU bounds by launching kernels (BENCHMARKS.md: TinyLlama 0.15 -> 0.057 s/step).

Every lever is exact: the same examples in the same order, the same masks, the same quantized weights.
"""

from __future__ import annotations

import importlib.util
import inspect
import types
from dataclasses import asdict, dataclass, replace

import torch

VARLEN = "lorapipe_varlen"
BUCKET = 1024  # CUDA graphs: padding-free batches are padded up to a multiple of this many tokens
LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------------
# Padding-free attention: TRL's padding-free collator flattens a batch into one row and passes the sequence
# boundaries (cu_seq_lens_q, max_length_q); this attention keeps every example to itself.


_VARLEN_API: dict[str, bool] = {}  # which keyword arguments this torch's varlen_attn takes (2.10: is_causal; later:
# window_size and enable_gqa), read once outside any compiled region


def _varlen_kwargs() -> dict:
    if not _VARLEN_API:
        from torch.nn.attention import varlen

        params = inspect.signature(varlen.varlen_attn).parameters
        _VARLEN_API.update(causal="is_causal" in params, gqa="enable_gqa" in params)
    return _VARLEN_API


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """transformers attention function: variable-length flash attention over a padding-free batch.

    Without sequence boundaries (evaluation, generation) it is plain SDPA. On CPU (tests, CI) each example gets its
    own causal SDPA call, which is the reference the CUDA kernel is checked against.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        kind = _varlen_kwargs()
        extra = {"is_causal": True} if kind["causal"] else {"window_size": (-1, 0)}
        if q.shape[1] != k.shape[1]:
            if kind["gqa"]:
                extra["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling, **extra)
    else:
        rep = q.shape[1] // k.shape[1]
        outs = []
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0), is_causal=True,
                scale=scaling).transpose(0, 1))
        out = torch.cat(outs, 0)
    return out.unsqueeze(0), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for a padding-free or unpadded batch (the kernel is causal by itself); SDPA's mask for a padded one."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    if torch.cuda.is_available():
        _varlen_kwargs()
    return VARLEN


# ---------------------------------------------------------------------------------------------------------------
# Cached dequantized weights.


def _cached_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    dtype = x.dtype
    w = self._lorapipe_w
    out = torch.nn.functional.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype))
    return out.to(dtype)


def cache_dequantized(model, dtype: torch.dtype) -> int:
    """Dequantize every frozen NF4/FP4 weight once and use it in place of bitsandbytes' per-call dequantization.

    bitsandbytes' training matmul dequantizes the 4-bit weight to the compute dtype and calls a dense matmul, twice
    per step (forward and backward). The base weights never change, so the result is the same bf16 matrix every
    time; keeping it trades memory (2 bytes/parameter) for the dequantize kernels. Returns the bytes added.
    """
    import bitsandbytes as bnb

    added = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not hasattr(m, "_lorapipe_w"):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(dtype)
            m.register_buffer("_lorapipe_w", w, persistent=False)
            m.forward = types.MethodType(_cached_forward, m)
            added += w.numel() * w.element_size()
    return added


def compile_model(model, kind: str) -> None:
    """torch.compile for training. `kind`:
    - "layers": each decoder layer, dynamic shapes (a padding-free batch changes length every step);
    - "graphs": each decoder layer, static bucketed shapes (see BucketCollator) replayed as CUDA graphs;
    - "model-graphs": the whole decoder stack as one CUDA graph per bucket (one launch instead of one per layer;
      compiling it takes about a minute per bucket, recording it half a second).

    Under DDP, dynamo would otherwise split each compiled graph where DDP's gradient buckets end (25 MB, the first
    1 MB), so that all-reduces overlap the backward: more graphs to compile and replay, for LoRA gradients that are
    small (the 8B shape's, all layers at r=16: 168 MB in fp32). Without the split, each graph's gradients are
    all-reduced when its backward ends: per layer for "graphs".
    """
    import torch._dynamo

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch._dynamo.config.recompile_limit = 64  # one graph per shape bucket
    torch._dynamo.config.optimize_ddp = False
    if kind == "layers":
        for layer in base.model.layers:
            layer.compile(dynamic=True)
    elif kind == "graphs":
        for layer in base.model.layers:
            layer.compile(dynamic=False, mode="reduce-overhead")
    elif kind == "model-graphs":
        base.model.compile(dynamic=False, mode="reduce-overhead")
    else:
        raise ValueError(f"unknown compile kind {kind!r}")


def graphs_kind(config) -> str:
    """The `compile_model` kind `train.cuda_graphs` uses for a model: the whole stack below a hidden size of 4,096,
    each layer from there.

    Compiling the whole stack takes about a minute per length bucket for TinyLlama-1.1B (54-67 s) and about two for
    a Llama-3-8B shape (~107 s), where each layer compiles in 14-17 s and 4-13 s per bucket (one layer's code serves
    them all). One graph instead of one per layer makes a step 0.080 s instead of 0.110 s for TinyLlama, but for the
    8B shape at 8 examples a step both take about 0.17 s: its large layers keep the GPU busy between launches
    (BENCHMARKS.md). So the 8B stack's extra minutes of compilation buy nothing measured; TinyLlama's pay after
    6,000-9,000 steps with 4-6 buckets (its whole-stack steps are the 25x figure).
    """
    return "graphs" if getattr(config, "hidden_size", 0) >= 4096 else "model-graphs"


def use_cuda_graphs(trainer) -> None:
    """Wire a Trainer whose model was compiled with a graphs kind: every (micro-)step starts a new CUDA-graph
    generation (the replays of the step before may be overwritten), and evaluation runs eagerly (its no-grad batches
    would otherwise compile and record a second set of graphs for a handful of batches)."""
    from transformers import TrainerCallback

    class _MarkStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.compiler.cudagraph_mark_step_begin()

        def on_substep_end(self, args, state, control, **kw):
            torch.compiler.cudagraph_mark_step_begin()

    trainer.add_callback(_MarkStep())
    evaluate = trainer.evaluate

    def eager_evaluate(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return evaluate(*args, **kwargs)

    trainer.evaluate = eager_evaluate


class BucketCollator:
    """Padding-free batches with static shapes, for CUDA graphs: the flat row is padded to a multiple of `bucket`
    tokens, the padding forms one extra segment that carries no loss, the boundary list always has `segments + 2`
    entries (empty segments at the end), and max_length is fixed. A handful of buckets cover every batch."""

    def __init__(self, pad_token_id: int, segments: int, bucket: int = BUCKET):
        self.pad, self.segments, self.bucket = pad_token_id, segments, bucket

    def __call__(self, examples: list[dict]) -> dict:
        ids, labels, pos, cu = [], [], [], [0]
        for ex in examples:
            x = list(ex["input_ids"])
            lab = list(ex.get("labels", x))
            lab[0] = -100  # never predicted from the previous example
            ids += x
            labels += lab
            pos += list(range(len(x)))
            cu.append(cu[-1] + len(x))
        total = -(-len(ids) // self.bucket) * self.bucket
        extra = total - len(ids)
        ids += [self.pad] * extra
        labels += [-100] * extra
        pos += list(range(extra))
        cu += [total] * (self.segments + 2 - len(cu))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
                "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32), "max_length_q": self.bucket,
                "max_length_k": self.bucket, REAL_TOKENS: total - extra}


REAL_TOKENS = "num_real_tokens"  # a BucketCollator batch's tokens without the bucket padding (a host int)


def sft_trainer(async_host: bool):
    """TRL's SFTTrainer class for a run compiled into CUDA graphs (with BucketCollator batches).

    `async_host`: no host-device synchronisation inside a training step, so that the host queues the next step while
    the GPU still runs this one. A replayed CUDA graph leaves the host nothing else to do, and every sync idles the
    GPU for the host's whole trip back (BENCHMARKS.md: ~30 ms of an 80 ms TinyLlama step). TRL syncs at three points
    per micro-step, which this class replaces for a causal-LM NLL run (anything else takes TRL's path):
    - the fused LM head gathers the loss positions with a boolean mask, whose size the host must read: here every
      position goes through it and the others are zeroed, as TRL itself does on devices without Triton;
    - entropy and token accuracy are read with `.item()` after every forward: here they stay on the GPU until the
      step that logs them;
    - the token counts (TRL's `num_tokens`, the Trainer's `num_input_tokens_seen`) are read back from the GPU: here
      they are host integers from the batch shapes and the collator.
    The Trainer's own per-step syncs (the NaN/inf check of the logged loss, blocking input copies) are turned off by
    `async_args`. Losses and gradients are unchanged: the same kernels over the same tokens.

    The metrics and token counts are added up at the steps that log, save or end. Data-parallel (DDP), where TRL
    gathers every figure from every process at every micro-step, they are summed over the processes there, in one
    collective each, as TRL sums them (entropy and accuracy over all processes' tokens), and the loss is scaled by
    the process count as TRL scales it (the token count it divides by is already every process's; DDP averages).
    """
    from unittest import mock

    import trl.trainer.utils as trl_utils
    from trl import SFTTrainer

    class GraphsSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._lazy: list[torch.Tensor] = []  # [entropy sum, correct, valid] per training micro-step, on the GPU
            self._pending = [0, 0]  # this process's real and TRL-counted tokens since the last gathering

        def _fast(self, model, return_outputs: bool) -> bool:
            return (async_host and model.training and not return_outputs and self.args.loss_type == "nll"
                    and not self.aux_loss_enabled and self.compute_loss_func is None and self.label_smoother is None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS}
            if not self._fast(model, return_outputs) or "position_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with mock.patch.object(trl_utils, "_use_triton", lambda device: False):  # no boolean-mask gather
                out = model(**inputs, use_cache=False, fused_lm_head=True)
            n = out.label_mask.sum()
            loss = -out.log_probs.sum() / torch.as_tensor(n if num_items_in_batch is None else num_items_in_batch,
                                                          device=n.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: every process's tokens, DDP averages
            self._lazy.append(torch.stack([out.entropy.detach().sum().float(), out.is_top1.sum().float(), n.float()]))
            self._pending[1] += inputs["position_ids"].size(1)
            return loss

        def _track_num_input_tokens(self, inputs):
            if async_host and REAL_TOKENS in inputs and self.args.include_num_input_tokens_seen != "no":
                self._pending[0] += inputs[REAL_TOKENS]
            else:
                super()._track_num_input_tokens({k: v for k, v in inputs.items() if k != REAL_TOKENS})

        def _gather_tokens(self) -> None:
            """Add the tokens counted since the last gathering to the counts (every process's: one all-reduce)."""
            if not async_host:
                return
            real, trl_tokens = self._pending
            if self.accelerator.num_processes > 1:
                counts = torch.tensor(self._pending, dtype=torch.int64, device=self.accelerator.device)
                real, trl_tokens = self.accelerator.reduce(counts, reduction="sum").tolist()
            self._pending = [0, 0]
            self.state.num_input_tokens_seen += real
            if trl_tokens:
                self._total_train_tokens += trl_tokens
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            c = self.control  # the same on every process: they log, save and stop at the same steps
            if (c.should_log or c.should_save or c.should_evaluate or c.should_training_stop
                    or self.state.global_step >= self.state.max_steps):
                self._gather_tokens()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def log(self, logs, start_time=None):
            if self._lazy and self.model.training:
                stats = torch.stack(self._lazy)
                self._lazy.clear()
                if self.accelerator.num_processes > 1:
                    stats = self.accelerator.reduce(stats, reduction="sum")
                for entropy, correct, valid in stats.tolist():  # one sync per logged step
                    self._metrics["train"]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                    self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
            super().log(logs, start_time)

    return GraphsSFTTrainer


def async_args(async_host: bool) -> dict:
    """TrainingArguments that go with `sft_trainer(async_host=True)`: batches (pinned, the Trainer's default) copied
    without blocking the host, and no NaN/inf check of every micro-step's loss (a sync; a non-finite loss still
    shows in the logged mean)."""
    return {"accelerator_config": {"non_blocking": True}, "logging_nan_inf_filter": False} if async_host else {}


def liger_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


# ---------------------------------------------------------------------------------------------------------------
# Memory estimate: what the trainer will hold at its peak, from the model config and the settings.


@dataclass
class Setting:
    """How one training run is laid out; the hyper-parameters themselves never change between modes."""

    mode: str
    micro_batch: int
    accum: int
    checkpointing: bool
    kbit_prep: bool
    padding_free: bool
    cache_dequant: bool
    liger: bool
    optim: str
    compile: str = ""  # "" (eager) or a `compile_model` kind
    async_host: bool = False  # with compile: no host-device sync inside a step (`sft_trainer`)
    shards: int = 1  # FSDP: the 4-bit base, LoRA weights, gradients and optimizer state split over this many GPUs
    cpu_loading: bool = False  # FSDP: the 4-bit base quantized in CPU memory, moved to the GPU layer by layer

    def as_dict(self) -> dict:
        return asdict(self)


def split(batch: int, accum: int, world: int) -> int:
    """Examples per process and step when `world` processes share the effective batch batch x accum; refused when
    it does not split evenly (before any model loads)."""
    from lorapipe.errors import UserError

    total = batch * accum
    if total % world:
        raise UserError(f"train.processes: the effective batch {batch} x {accum} = {total} does not split over "
                        f"{world} processes; use a batch divisible by {world}, or --train.processes "
                        f"{max(d for d in range(1, world) if total % d == 0)}")
    return total // world


def per_process(setting: Setting, world: int) -> Setting:
    """The layout of each of `world` data-parallel processes that together keep the effective batch.

    The effective batch E = micro-batch x accumulation must split evenly: each process then runs E / world examples
    a step, in the largest micro-batch (at most the single-process one) that divides them."""
    if world <= 1:
        return setting
    share = split(setting.micro_batch, setting.accum, world)
    micro = max(d for d in range(1, min(setting.micro_batch, share) + 1) if share % d == 0)
    return replace(setting, micro_batch=micro, accum=share // micro)


# bitsandbytes' optimizers index their states by raw tensor pointers and cannot step FSDP's sharded DTensor
# parameters; LoRA's optimizer state is small and already split over the GPUs, so plain AdamW costs little there
BNB_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw", "lion_8bit",
                  "paged_lion_8bit", "paged_lion_32bit")


def check_fsdp(processes: int, cuda: bool) -> None:
    """train.fsdp needs GPUs and more than one process; refused before any model loads (exit 2)."""
    from lorapipe.errors import UserError

    if not cuda:
        raise UserError("train.fsdp: FSDP shards the model over GPUs, and none is visible. accelerate runs FSDP only "
                        "on accelerators (on CPU it would silently train data-parallel instead); drop --train.fsdp")
    if processes < 2:
        raise UserError("train.fsdp: sharding needs several processes, one per GPU; add --train.processes N "
                        "(N GPUs), or drop --train.fsdp to train on one GPU")


def for_fsdp(setting: Setting, world: int) -> Setting:
    """The layout of an FSDP-QLoRA run over `world` GPUs: the mode's batch layout and checkpointing, without what
    assumes a whole model per GPU or plain tensors: no cached dequantized weights (a full-precision copy of every
    weight, unsharded), no k-bit preparation (it upcasts the norms and embeddings to fp32, and FSDP shards groups of
    one dtype), no compilation, and torch's AdamW in place of bitsandbytes' optimizers."""
    optim = "adamw_torch" if setting.optim in BNB_OPTIMIZERS else setting.optim
    return replace(setting, cache_dequant=False, kbit_prep=False, compile="", async_host=False, optim=optim,
                   shards=world)


def _shape(config) -> dict:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"h": c.hidden_size, "inter": c.intermediate_size, "layers": c.num_hidden_layers, "heads": heads,
            "kv": getattr(c, "num_key_value_heads", None) or heads, "head_dim": head_dim, "vocab": c.vocab_size,
            "tied": bool(getattr(c, "tie_word_embeddings", False))}


def linear_params(s: dict) -> int:
    """Parameters in the decoder's linear layers (what bitsandbytes quantizes)."""
    attn = s["h"] * s["heads"] * s["head_dim"] * 2 + s["h"] * s["kv"] * s["head_dim"] * 2
    return s["layers"] * (attn + 3 * s["h"] * s["inter"])


def lora_params(s: dict, r: int, targets: list[str]) -> int:
    q, kv = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    dims = {"q_proj": (s["h"], q), "k_proj": (s["h"], kv), "v_proj": (s["h"], kv), "o_proj": (q, s["h"]),
            "gate_proj": (s["h"], s["inter"]), "up_proj": (s["h"], s["inter"]), "down_proj": (s["inter"], s["h"])}
    return s["layers"] * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


# On CPU the allocators keep freed memory resident, so the process's peak resident set exceeds the live peak of
# activations and logits: 1.45x, measured with a forward/backward probe of SmolLM2-135M (BENCHMARKS.md).
CPU_RESIDENT_FACTOR = 1.45


def estimate_memory(config, setting: Setting, tokens_per_micro: int, *, quantized: bool, dtype_bytes: int,
                    r: int, targets: list[str], lora_dropout: bool = True, cpu: bool = False,
                    loss_share: float = 1.0) -> dict[str, float]:
    """Peak bytes of a LoRA/QLoRA step, by part. `tokens_per_micro`: tokens in the largest micro-batch (padded
    length x batch without padding-free; the sum of lengths with it).

    The activation model counts what autograd keeps per token and layer when only LoRA weights train: the norm
    inputs, the LoRA inputs (dropout copies and masks), attention q/out and k/v, and the MLP's gate/up/activation.
    """
    s = _shape(config)
    h, inter, layers, vocab = s["h"], s["inter"], s["layers"], s["vocab"]
    lin = linear_params(s)
    other = vocab * h * (1 if s["tied"] else 2) + layers * 2 * h + h
    wbytes = dtype_bytes
    other_bytes = other * (4 if setting.kbit_prep else wbytes)  # embeddings, output layer, norms: not quantized
    weights = (lin * (0.5 + 1 / 64 * (1 + 4 / 256)) if quantized else lin * wbytes) + other_bytes
    cached = lin * wbytes if setting.cache_dequant and quantized else 0
    lp = lora_params(s, r, targets)
    optim_bytes = {"paged_adamw_8bit": 2, "adamw_8bit": 2}.get(setting.optim, 8)
    lora = lp * (4 + 4 + optim_bytes)  # fp32 weights + grads + optimizer states (TRL keeps LoRA fp32 unless QLoRA)
    whole, layer = weights, (weights - other_bytes) / layers  # before FSDP shards them
    if setting.shards > 1:  # each GPU keeps its share, plus the layers gathered for compute (this one, the next)
        weights, lora = weights / setting.shards + 2 * layer, lora / setting.shards
    n_lora_in = len([t for t in targets if t in LORA_NAMES])
    q, kv = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    # k-bit prep upcasts the embeddings, so the residual stream (and what the frozen layers return) is fp32
    abytes = 4 if setting.kbit_prep else wbytes
    # transformers' RMSNorm keeps fp32 copies (input, squared, normalized: ~3 per norm, 2 norms); Liger's keeps the
    # input only, and so does a compiled layer (inductor recomputes the cheap elementwise ops in backward)
    fused = setting.liger or bool(setting.compile)
    norms = 2 * abytes * h if fused else 24 * h
    per_token_layer = norms + wbytes * (2 * q + 2 * kv) + (2 if fused else 3) * inter * abytes
    if lora_dropout:
        per_token_layer += n_lora_in * (abytes * h + h)  # dropout output + mask
    act_per_token = (abytes * h * layers + per_token_layer) if setting.checkpointing else per_token_layer * layers
    activations = act_per_token * tokens_per_micro
    # TRL's fused LM head (trl.kernels.chunked_logprob) never holds the logits: it projects tiles of at most 4,096
    # positions x 32,768 vocabulary entries into one buffer (fp32 at most), and keeps the positions' hidden states and
    # an fp32 gradient for them. On CUDA it takes only the loss-bearing positions; on CPU, and in the sync-free
    # compiled step (which turns that boolean gather off), every position. Counting whole logits (positions x
    # vocabulary) instead put Llama-3-8B's estimate 28-38 % above the peaks measured at examples of 3,000-4,095 tokens.
    scored = tokens_per_micro if cpu or setting.async_host else int(tokens_per_micro * loss_share)
    logits = min(scored, 4096) * min(vocab, 32768) * 4 + scored * h * (4 + abytes)
    if cpu:
        activations, logits = activations * CPU_RESIDENT_FACTOR, logits * CPU_RESIDENT_FACTOR
    parts = {"weights": weights, "dequant_cache": cached, "lora_and_optimizer": lora, "activations": activations,
             "logits": logits}
    # one dequantized weight matrix in flight, plus allocator slack
    parts["workspace"] = (h * inter * wbytes if quantized and not setting.cache_dequant else 0) + 0.05 * sum(
        parts.values())
    parts["total"] = sum(parts.values())
    if setting.shards > 1:
        parts["loading"] = fsdp_loading(whole, other_bytes, setting.shards, setting.cpu_loading, lora=lp * 4,
                                        largest=max(vocab * h * wbytes, layer))
        if setting.cpu_loading:
            parts["cpu_loading_ram"] = whole * 1.05  # each process's whole 4-bit base, in CPU memory
    return {k: round(v / 2**30, 3) for k, v in parts.items()}


def fsdp_loading(whole: float, other: float, shards: int, on_cpu: bool = False, lora: float = 0,
                 largest: float = 0) -> float:
    """Peak bytes per GPU while an FSDP run loads and shards, for a 4-bit base of `whole` bytes, `other` of them in
    the embeddings, output layer and norms, `lora` in the LoRA weights.

    Quantized on the GPU (train.fsdp_loading gpu), every GPU holds the whole base and LoRA, then shards it; as each
    weight's shards exist its whole copy is freed (train.shard_without_copy), so over 2 or more GPUs the whole base
    just loaded is the peak. Measured on one H200 with the Llama-3-8B shape, LoRA r=16 on every linear layer: 5.52
    GiB in each of two processes (this gives 5.74); TinyLlama-1.1B: 0.80 GiB (0.79); Llama-3-70B: 37.85 GiB (39.45).
    In one process, before the embeddings were freed as well, 7.29 GiB (7.79: the second term, whole layers freed,
    embeddings kept).

    Quantized in CPU memory (`on_cpu`), FSDP moves each group of weights to the GPU as it shards it, and
    train.shard_without_copy frees the whole copy once the shards exist: a GPU holds its share of the base and of
    LoRA, and `largest` (the largest group: an embedding, or one decoder layer) whole. Measured, two processes:
    3.77 GiB for the Llama-3-8B shape (this gives 3.90), 0.52 GiB for TinyLlama-1.1B (0.53)."""
    if on_cpu:
        return ((whole + lora) / shards + largest) * 1.05
    return (max(whole, (whole - other) / shards + other * (1 + 1 / shards)) + lora) * 1.05


def micro_tokens(lengths: list[int], micro: int, padding_free: bool, bucket: int = 0) -> int:
    """Tokens in the largest micro-batch of a run (over an epoch, the one holding the longest example): padded to the
    longest example, or, padding-free, the longest example plus `micro - 1` of mean length, rounded up to a multiple
    of `bucket` (CUDA graphs)."""
    longest = max(lengths)
    if padding_free:
        tokens = int(longest + (micro - 1) * sum(lengths) / len(lengths))
        return -(-tokens // bucket) * bucket if bucket else tokens
    return longest * micro


def choose(mode: str, *, batch: int, accum: int, checkpointing: bool, optim: str, quantized: bool,
           cuda: bool, fits=None, refused=None) -> Setting:
    """The run's layout for `mode`. `fits(setting) -> bool` says whether a setting's estimate fits free memory;
    `refused(setting) -> bool` whether preflight would refuse it (even somewhat less than its estimate would not fit).

    Memory mode keeps the configured micro-batch unless that would be refused. Between the two (the estimate does
    not fit, a little less would) preflight warns and the run goes on as configured: the estimate is a model, the
    Llama-3-8B runs measured there fitted, and a smaller micro-batch costs speed (2 x 8 trained at 0.77x the tokens/s
    of 4 x 4 with examples of 3,000-4,095 tokens; BENCHMARKS.md, "Long examples")."""
    kw = dict(batch=batch, accum=accum, checkpointing=checkpointing, optim=optim, quantized=quantized, cuda=cuda)
    if mode == "auto":
        if not cuda:
            return choose("tutorial", **kw)
        fast = choose("speed", fits=fits, **kw)  # with the largest micro-batch that fits
        return fast if fits is None or fits(fast) else choose("memory", fits=fits, refused=refused, **kw)
    liger = liger_available()
    if mode == "tutorial":
        return Setting("tutorial", batch, accum, checkpointing, quantized, False, False, False, optim)
    if mode == "memory":  # the configured micro-batch, or where it would be refused, the largest smaller one that
        total = batch * accum  # fits (else the largest not refused), with the same effective batch

        def memory(m: int) -> Setting:
            return Setting("memory", m, total // m, True, False, True, False, liger, "paged_adamw_8bit" if cuda else optim)

        if refused is not None and fits is not None and refused(memory(batch)):
            smaller = [memory(m) for m in range(batch - 1, 0, -1) if total % m == 0]
            return next((s for s in smaller if fits(s)), next((s for s in smaller if not refused(s)),
                                                              memory(batch)))  # none: preflight says what would fit
        return memory(batch)
    if mode == "speed":
        total = batch * accum
        micro = total
        if fits is not None:  # the largest micro-batch that divides the effective batch and fits
            for m in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
                micro = m
                if fits(Setting("speed", m, total // m, False, False, True, quantized, liger, optim)):
                    break
        return Setting("speed", micro, total // micro, False, False, True, quantized and cuda, liger,
                       "adamw_torch_fused" if cuda else optim)
    raise ValueError(f"unknown mode {mode}")


def reason(requested: str, s: Setting, cuda: bool, batch: int = 0) -> str:
    """Why the run has the layout it has, in a few words (preflight's layout line); `batch`: each process's
    micro-batch as configured, which memory mode lowers where preflight would refuse it."""
    if s.shards > 1:
        return (f"FSDP over {s.shards} GPUs (train.fsdp): the 4-bit base, LoRA and its optimizer state sharded, "
                f"{requested} mode's batch layout"
                + ("; the base quantized in CPU memory (train.fsdp_loading)" if s.cpu_loading else ""))
    graphs = ("CUDA graphs on (train.cuda_graphs)" if s.compile else
              "CUDA graphs off: about a minute of compilation per length bucket pays only on long runs")
    smaller = (f"; micro-batch {s.micro_batch}, not the {batch} configured: the largest that fits, with the same "
               "effective batch" if s.mode == "memory" and s.micro_batch < batch else "")
    if requested != "auto":
        return "as configured" + (f"; {graphs}" if s.mode == "speed" and cuda else smaller)
    if not cuda:
        return "auto on a CPU: the recipe's layout"
    if s.mode == "speed":
        return f"auto: its estimated peak fits the GPU's free memory; {graphs}"
    return "auto: speed's estimated peak does not fit the GPU's free memory" + smaller


def flops_per_token(config, seq_len: float) -> float:
    """Model FLOPs per trained token for LoRA: forward 2N plus backward through activations 2N (frozen weights get no
    weight gradient), plus causal attention; recomputation is not counted (it is overhead, not model work)."""
    s = _shape(config)
    n = linear_params(s) + s["vocab"] * s["h"]
    attn = 4 * s["layers"] * s["heads"] * s["head_dim"] * seq_len / 2  # QK^T and PV, causal half, fwd
    return 4 * n + 3 * attn

