"""`lorapipe bench train --e2e`'s job through Unsloth, for the comparison in BENCHMARKS.md (issue #15).

    python3 tools/unsloth_e2e.py MODEL_DIR DATA.jsonl OUT.json DROPOUT [CHECKPOINTING]

MODEL_DIR and DATA are what `bench train --e2e --workdir W` made (W/model-<shape>, W/data-<shape>-<n>.jsonl). The
recipe's hyper-parameters, with Unsloth's own choices where it has them (as its notebooks set them): NF4 4-bit, LoRA
r=16 alpha=32 on q/k/v/o with DROPOUT (the recipe's 0.05, or Unsloth's fast path 0), gradient checkpointing
CHECKPOINTING ("unsloth" by default, or "off"), adamw_8bit, lr 2e-4 cosine, warmup 3 %, 1 epoch, effective batch 16 laid out 16 x 1 (as lorapipe's auto
lays it out), max_length 512, completion-only loss; Unsloth turns padding-free batching on by itself. It needs its
own environment (trl<=1.15, datasets<5: tools/unsloth_wheels.sh), not lorapipe's. Writes the same figures as
bench_e2e (before the loop, first step, loop, real tokens, per-step losses) to OUT.json.
"""

import json
import os
import sys
import time
from pathlib import Path


def age() -> float:
    """Seconds since this process started (as lorapipe.train measures its own time before the loop)."""
    st = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return float(Path("/proc/uptime").read_text().split()[0]) - int(st[19]) / os.sysconf("SC_CLK_TCK")


def main(model_dir: str, data: str, out: str, dropout: float, checkpointing: str = "unsloth") -> None:
    from unsloth import FastLanguageModel  # noqa: I001 (first, before transformers and trl, as Unsloth asks)
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t_import = age()
    model, tok = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=512, load_in_4bit=True,
                                                   dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=dropout,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none",
                                             use_gradient_checkpointing=False if checkpointing == "off" else checkpointing,
                                             random_state=42)
    ds = load_dataset("json", data_files=data, split="train")
    marks: dict[str, float] = {}
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["before_loop_s"], marks["t0"] = age(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if "first_step_s" not in marks:
                torch.cuda.synchronize()
                marks["first_step_s"] = time.perf_counter() - marks["t0"]

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    args = SFTConfig(output_dir="/tmp/unsl-out", per_device_train_batch_size=16, gradient_accumulation_steps=1,
                     learning_rate=2e-4, num_train_epochs=1, warmup_steps=0.03, lr_scheduler_type="cosine",
                     optim="adamw_8bit", weight_decay=0.001, max_grad_norm=0.3, logging_steps=1, bf16=True,
                     max_length=512, completion_only_loss=True, report_to="none", seed=42, save_strategy="no",
                     include_num_input_tokens_seen="non_padding", dataset_num_proc=1)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args, callbacks=[Clock()])
    result = trainer.train()
    loop = time.perf_counter() - marks["t0"]
    model.save_pretrained("/tmp/unsl-out/adapter")
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    res = {"import_s": round(t_import, 2), "before_loop_s": round(marks["before_loop_s"], 2),
           "first_step_s": round(marks.get("first_step_s", 0.0), 2), "loop_s": round(loop, 2),
           "train_runtime": result.metrics.get("train_runtime"), "steps": trainer.state.global_step,
           "tokens": tokens, "tokens_per_s": round(tokens / loop, 1), "whole_in_process_s": round(age(), 2),
           "final_loss": losses[max(losses)] if losses else None, "losses": losses,
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "dropout": dropout,
           "checkpointing": checkpointing,
           "padding_free": getattr(trainer.args, "padding_free", None)}
    Path(out).write_text(json.dumps(res))
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), *sys.argv[5:6])
