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

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import UserError
from lorapipe.runs import load_run

log = logging.getLogger(__name__)

OUTTYPES = ("f16", "q8_0")


@dataclass
class ExportResult:
    path: Path
    outtype: str
    tensors: int
    size_bytes: int


def _permute(w, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute: transformers' rotary halves -> llama.cpp's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


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

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tied = bool(c.get("tie_word_embeddings"))
    count = 0
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, heads, kv)
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"export: no GGUF name for tensor {key} (not a plain Llama checkpoint?)")
                if data.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
                    w.add_tensor(name, data.astype(np.float32))
                elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
                    q = gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                else:
                    w.add_tensor(name, data.astype(np.float16))
                count += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (%s, %d tensors)", target, outtype, count)
    return ExportResult(target, outtype, count, target.stat().st_size)


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
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    ref, stopped = verify.hf_greedy(merged, tok, texts, max_tokens, eos)
    del merged
    g = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    greedy, _ = verify.hf_greedy(g, tok, texts, max_tokens, eos)
    forced = verify.forced_agreement(verify.hf_forced(g, ids, ref, stopped, tok.eos_token_id))
    del g
    report = {"file": str(path), "prompts": len(texts), "max_tokens": max_tokens, "agreement": forced,
              "greedy": verify.agreement(ref, greedy), "gate": min_agreement, "tokenizer_equal": tok_equal,
              "chat_template_equal": template_equal}
    report["passed"] = forced >= min_agreement and tok_equal == 1.0 and template_equal
    write_json(path.with_name(path.name + ".verify.json"), report)
    return report
