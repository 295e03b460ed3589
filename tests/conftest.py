"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) with a BPE tokenizer trained on the fly.

Nothing here touches the network. The tiny model makes every stage (4-bit load, LoRA, TRL, merge) run in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def build_tiny_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorapipe.data import DEFAULT_TRAIN

    texts = []
    for line in DEFAULT_TRAIN.read_text().splitlines():
        r = json.loads(line)
        texts += [r["instruction"], r["output"]]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.pad_token = fast.eos_token  # like SmolLM2: pad == EOS, which lorapipe must fix
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def tiny_cfg(tiny_model, tmp_path):
    """A RunCfg that trains the tiny model for 2 steps on 8 examples into tmp_path/runs."""
    from lorapipe.config import load_config

    def make(**overrides):
        base = {"name": "tiny", "output_dir": str(tmp_path / "runs"), "model.name_or_path": str(tiny_model),
                "data.max_examples": 8, "data.max_length": 256, "train.max_steps": 2,
                "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
                "train.gradient_checkpointing": False}
        base.update(overrides)
        return load_config(None, base)

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """One finished QLoRA run on the tiny model, shared by tests that only read it."""
    from lorapipe import train
    from lorapipe.config import load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, {"name": "tiny", "output_dir": str(out), "model.name_or_path": str(tiny_model),
                             "data.max_examples": 8, "data.max_length": 256, "train.max_steps": 2,
                             "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
                             "lora.r": 8, "train.gradient_checkpointing": False})
    return train.run(cfg).run_dir


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of tiny_run without merged/, for tests that add to a run."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_run, dst)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    return dst
