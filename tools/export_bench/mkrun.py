"""python tools/export_bench/mkrun.py W SHAPE DTYPE: a tiny run (2 steps) whose merged/ is bench's random SHAPE
(tinyllama-1.1b, llama3-8b, ...) in DTYPE (float32, bfloat16), in shards of up to 5 GB, with the tests' tiny BPE
tokenizer: what `lorapipe export` reads, at a real size. Run from the project root."""
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorapipe import bench, train
from lorapipe.config import load_config

sys.path.insert(0, "tests")
from conftest import build_tiny_model  # noqa: E402 (the tests' folder, put on the path just above)

W, shape, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
tiny = build_tiny_model(W / "tiny")
cfg = load_config(None, {"name": shape, "output_dir": str(W / "runs"), "model.name_or_path": str(tiny),
                         "data.max_examples": 8, "data.max_length": 256, "train.max_steps": 2,
                         "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1,
                         "train.gradient_checkpointing": False})
run = train.run(cfg).run_dir
h, inter, layers, heads, kv, vocab = bench.SHAPES[shape]
c = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("meta"):
    model = LlamaForCausalLM(c)
model = model.to_empty(device="cpu").to(dtype)
for p in model.parameters():
    if p.ndim > 1:
        torch.nn.init.normal_(p, std=0.02)
    else:
        torch.nn.init.ones_(p)
out = run / "merged"
shutil.rmtree(out, ignore_errors=True)
model.save_pretrained(out, max_shard_size="5GB")
for f in tiny.iterdir():
    if f.name.startswith(("tokenizer", "special", "chat")):
        shutil.copy(f, out / f.name)
print(run, sorted(p.name for p in out.iterdir()))
