"""Real PEFT adapters for each case vLLM cannot serve, built on tiny models (used by refusal and verify tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def run_with_adapter(src_run: Path, dst: Path, model, lora_kwargs: dict, tokenizer=None) -> Path:
    """A copy of `src_run` whose adapter/ is replaced by a fresh PEFT adapter with these LoraConfig arguments."""
    from peft import LoraConfig, get_peft_model

    shutil.copytree(src_run, dst)
    shutil.rmtree(dst / "adapter")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs))
    peft.save_pretrained(dst / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(dst / "adapter")
    for f in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        if (src_run / "adapter" / f).exists() and not (dst / "adapter" / f).exists():
            shutil.copy(src_run / "adapter" / f, dst / "adapter" / f)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    return dst


def tiny_llama(hidden: int = 64, vocab: int | None = None, tokenizer_dir: Path | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tokenizer_dir is not None and hidden == 64 and vocab is None:
        return AutoModelForCausalLM.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=vocab or 640, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=640, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=256))
