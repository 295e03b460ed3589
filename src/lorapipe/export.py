"""`lorapipe export RUN --format gguf`: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

Everything format-specific is the `gguf` library's (the package llama.cpp's own converter is built on): the writer,
the tensor-name map of the architecture, the BPE vocabulary and the special tokens, merges and chat template
(gguf.SpecialVocab reads the chat_template.jinja lorapipe trained with, so llama.cpp prompts the model the way it was
trained). What lorapipe adds is what llama.cpp's converter does for Llama models on top of that library: the
model's hyper-parameters as GGUF keys and the rotary permutation of the q/k projections (llama.cpp's rope works on
interleaved pairs, transformers' on halves).

Supported: Llama-architecture models (SmolLM2, TinyLlama, Llama 3, ...) with a byte-level BPE tokenizer. llama.cpp
picks its pre-tokenizer by name (tokenizer.ggml.pre): lorapipe takes it from the base's own GGUF when the base came
from one (the embedded SmolLM2), else from --gguf-pre.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorapipe import console
from lorapipe.errors import UserError
from lorapipe.runs import load_run

log = logging.getLogger(__name__)

OUTTYPES = ("f16", "q8_0")
_CHECK_BYTES = 4.8  # peak CPU memory of `check` per parameter, + 10 % (see check_short)


@dataclass
class ExportResult:
    path: Path
    outtype: str
    tensors: int
    size_bytes: int


def _permute(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute: transformers' rotary halves -> llama.cpp's interleaved pairs (a torch tensor
    or a numpy array)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _plan(merged: Path, c: dict, outtype: str) -> list[tuple[Path, str, str, tuple[int, ...], object, int]]:
    """(shard, safetensors name, GGUF name, GGUF shape, GGML type, bytes) of every tensor, in file order, from the
    safetensors headers alone. The types are llama.cpp's converter's: norms (1-D) float32, q8_0 where rows are a
    multiple of 32, f16 otherwise."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"])
    tied = bool(c.get("tie_word_embeddings"))
    plan = []
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"export: no GGUF name for tensor {key} (not a plain Llama checkpoint?)")
                shape = tuple(f.get_slice(key).get_shape())
                n = math.prod(shape)
                if len(shape) == 1:
                    raw, nbytes = gguf.GGMLQuantizationType.F32, 4 * n
                elif outtype == "q8_0" and shape[-1] % 32 == 0:
                    raw = gguf.GGMLQuantizationType.Q8_0
                    shape = gguf.quant_shape_to_byte_shape(shape, raw)
                    nbytes = math.prod(shape)
                else:
                    raw, nbytes = gguf.GGMLQuantizationType.F16, 2 * n
                plan.append((shard, key, name, shape, raw, nbytes))
    return plan


def _convert(t, key: str, raw, heads: int, kv: int):
    """One merged tensor as the GGUF holds it: rotary-permuted where it is q/k, in the planned type. The cast is
    torch's (straight to float16 for f16): numpy's float32 -> float16 took 37 of the 80 s an 8B export took."""
    import gguf
    import torch

    t = t.to(torch.float16 if raw == gguf.GGMLQuantizationType.F16 else torch.float32)
    if key.endswith("q_proj.weight"):
        t = _permute(t, heads, heads)
    elif key.endswith("k_proj.weight"):
        t = _permute(t, heads, kv)
    data = t.numpy()
    return gguf.quantize(data, raw) if raw == gguf.GGMLQuantizationType.Q8_0 else data


def _pre_tokenizer(run_dir: Path, pre: str | None) -> str:
    if pre:
        return pre
    from lorapipe.config import EMBEDDED_MODEL
    from lorapipe.models import embedded_gguf_path

    if load_run(run_dir).model.name_or_path == EMBEDDED_MODEL:
        import gguf

        field = gguf.GGUFReader(str(embedded_gguf_path())).fields["tokenizer.ggml.pre"]
        return str(field.contents())
    raise UserError("export: name llama.cpp's pre-tokenizer for this base with --gguf-pre (llama.cpp's "
                    "convert_hf_to_gguf.py lists them: llama-bpe for Llama 3, smollm for SmolLM2, ...); lorapipe "
                    "knows it only for bases that came from a GGUF")


def run(run_dir: str | Path, fmt: str = "gguf", outtype: str = "f16", pre: str | None = None,
        out: str | Path | None = None) -> ExportResult:
    """Write runs/<name>/export/<name>-<outtype>.gguf from runs/<name>/merged/ (atomically)."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if fmt != "gguf":
        raise UserError(f"export --format {fmt}: only gguf is supported")
    if outtype not in OUTTYPES:
        raise UserError(f"export --outtype {outtype}: choose from {', '.join(OUTTYPES)}")
    merged = run_dir / "merged"
    load_run(run_dir)  # a run directory, or a clear message
    if not (merged / "config.json").is_file():
        raise UserError(f"{run_dir}: has no merged model; run `lorapipe merge {run_dir}` first (GGUF holds full "
                        "weights, not an adapter)")
    c = json.loads((merged / "config.json").read_text())
    arch = (c.get("architectures") or ["?"])[0]
    if arch != "LlamaForCausalLM":
        raise UserError(f"export: GGUF export supports Llama-architecture models (LlamaForCausalLM); this model is "
                        f"{arch}. llama.cpp's convert_hf_to_gguf.py converts {merged} for other architectures")
    try:
        vocab = gguf.BpeVocab(merged)
    except FileNotFoundError:
        raise UserError("export: the tokenizer is not a byte-level BPE (GPT-2 style) tokenizer.json, the kind "
                        "lorapipe's GGUF export supports; convert with llama.cpp's convert_hf_to_gguf.py") from None
    pre_name = _pre_tokenizer(run_dir, pre)
    target = Path(out) if out else run_dir / "export" / f"{run_dir.name}-{outtype}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")

    n_layer, heads = c["num_hidden_layers"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(run_dir.name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types = [], []
    for text, _score, toktype in vocab.all_tokens():
        tokens.append(text)
        types.append(toktype)
    for i in range(len(tokens), c["vocab_size"]):  # embedding rows beyond the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_name)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(merged, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    # Two passes over merged/, so that one tensor at a time is in memory (a 70B model in f16 is 140 GB): the GGUF
    # header lists every tensor's name, type and size before the data, so the plan comes from the safetensors
    # headers alone, then each tensor is read, converted and written in the same order.
    plan = _plan(merged, c, outtype)
    total = sum(nbytes for *_, nbytes in plan)
    need = total * 1.01 + 2**20  # + the header: vocabulary, merges, template
    free = shutil.disk_usage(target.parent).free
    if need > free:
        raise UserError(f"export: the {outtype} GGUF needs about {need / 2**30:.1f} GiB and {target.parent} has "
                        f"{free / 2**30:.1f} GiB free. Free space there"
                        + (", or pass --outtype q8_0 (about half the size)" if outtype == "f16" else ""))
    for _shard, _key, name, shape, raw, nbytes in plan:  # uint8: q8_0's shape is in bytes, as gguf.quantize gives it
        w.add_tensor_info(name, shape, np.uint8 if raw == gguf.GGMLQuantizationType.Q8_0 else np.float32, nbytes,
                          raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(total=total, desc="exporting", unit="B", unit_scale=True,
                   file=console.terminal())
        for shard, items in itertools.groupby(plan, key=lambda p: p[0]):
            with safe_open(str(shard), framework="pt") as f:
                for _shard, key, _name, _shape, raw, nbytes in items:
                    w.write_tensor_data(_convert(f.get_tensor(key), key, raw, heads, kv))
                    bar.update(nbytes)
        bar.close()
        w.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    count = len(plan)
    log.info("exported %s (%s, %d tensors)", target, outtype, count)
    return ExportResult(target, outtype, count, target.stat().st_size)


def check_short(run_dir: str | Path) -> str | None:
    """Why the check cannot run in this machine's CPU memory, or None. It loads merged/ and then the GGUF in
    float32 (transformers' GGUF loader dequantizes every tensor), one after the other: 4.4 bytes a parameter at its
    peak, not counting mapped file pages (measured at the TinyLlama shape: 4.8 GB). Asked before the export writes,
    so a 70B model (about 300 GB) is found out in a second, not as an out-of-memory kill after the file is
    written."""
    from lorapipe.models import param_count
    from lorapipe.preflight import available_ram_gib

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    if not (run_dir / "merged" / "config.json").is_file():
        return None  # run() says what to do
    params = param_count(str(run_dir / "merged"), cfg.model)
    need, free = params * _CHECK_BYTES / 2**30, available_ram_gib()
    if free is None or need <= free:
        return None
    return (f"the check loads merged/ and the GGUF in float32 ({params / 1e9:.1f}B parameters: about {need:.0f} "
            f"GiB) and CPU memory has {free:.0f} GiB free")


def _check_device(run_dir: Path, cfg) -> str:
    """Where the check's two float32 models run, one after the other: the GPU when one copy fits there, else the
    CPU, where each of the 4 x 64 greedy steps (64 prompts in batches of 16) reads the whole float32 model from
    memory, 32 GB for 8B. They load in CPU memory first either way (check_short). On an H100, TinyLlama shape:
    the whole export took 34 s instead of 117-119 s with the CPU check (BENCHMARKS.md)."""
    import torch

    from lorapipe.models import param_count

    if not torch.cuda.is_available():
        return "cpu"
    need = param_count(str(run_dir / "merged"), cfg.model) * 4 * 1.1  # + activations of 16 prompts
    return "cuda" if need <= torch.cuda.mem_get_info()[0] else "cpu"


def check(run_dir: str | Path, path: str | Path, n_prompts: int = 64, max_tokens: int = 64,
          min_agreement: float = 0.99) -> dict:
    """Load the GGUF back with transformers' GGUF loader and compare it with the merged model, as `verify` does:
    greedy tokens on held-out prompts (reference: merged/ in float32), the share of the reference's tokens the GGUF
    model ranks first given the same prefix (the gate), the tokenizer's ids on the prompts, and the chat template.
    Written beside the file as <file>.verify.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapipe import data as data_mod
    from lorapipe import verify
    from lorapipe.runs import write_json

    run_dir, path = Path(run_dir), Path(path)
    cfg = load_run(run_dir)
    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    gtok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = data_mod.prompts_for(verify.verify_prompts(n_prompts), cfg.data, run_dir / "adapter")
    ids = [tok(t)["input_ids"] for t in texts]
    tok_equal = sum(gtok(t)["input_ids"] == i for t, i in zip(texts, ids)) / len(texts)
    template_equal = (gtok.chat_template or "") == (tok.chat_template or "")
    eos = {tok.eos_token_id}
    device = _check_device(run_dir, cfg)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).to(device).eval()
    ref, stopped = verify.hf_greedy(merged, tok, texts, max_tokens, eos)
    del merged
    torch.cuda.empty_cache()  # the GGUF's copy takes its place
    g = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device).eval()
    greedy, _ = verify.hf_greedy(g, tok, texts, max_tokens, eos)
    forced = verify.forced_agreement(verify.hf_forced(g, ids, ref, stopped, tok.eos_token_id))
    del g
    torch.cuda.empty_cache()
    report = {"file": str(path), "prompts": len(texts), "max_tokens": max_tokens, "agreement": forced,
              "greedy": verify.agreement(ref, greedy), "gate": min_agreement, "tokenizer_equal": tok_equal,
              "chat_template_equal": template_equal, "device": device}
    report["passed"] = forced >= min_agreement and tok_equal == 1.0 and template_equal
    write_json(path.with_name(path.name + ".verify.json"), report)
    return report
