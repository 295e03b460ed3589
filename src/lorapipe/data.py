"""Training data: sources (shipped set, local .jsonl/.json, Hub), Alpaca records, prompt templates, chat template.

Every record becomes a prompt/completion pair: TRL then trains on the completion only and appends EOS. The same
template is saved with the adapter as a Jinja chat template, so a server renders a chat request exactly the way the
trainer rendered the examples.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lorapipe.config import DataCfg
from lorapipe.errors import UserError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TRAIN = ASSETS / "default_train.jsonl"
HELDOUT = ASSETS / "heldout.jsonl"

# The tutorial's prompt (the `prompt` column of iamtarun/python_code_instructions_18k_alpaca): one preamble, the
# Input section always present (empty when there is no input), and '### Output:'.
TUTORIAL_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TUTORIAL = TUTORIAL_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
# Stanford Alpaca's two prompts: the Input section is omitted when empty.
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
ALPACA_INPUT = ALPACA_PREAMBLE_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = TUTORIAL_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"

ALPACA_FIELDS = ("instruction", "input", "output")


def render_prompt(record: dict[str, Any], template: str) -> str:
    """The prompt text for one Alpaca record (everything before the response)."""
    instruction, inp = record["instruction"], record.get("input") or ""
    if template == "tutorial":
        return TUTORIAL.format(instruction=instruction, input=inp)
    if inp:
        return ALPACA_INPUT.format(instruction=instruction, input=inp)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _jinja_text(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def adds_bos(tokenizer) -> bool:
    """Whether plain tokenization (as the trainer does it) starts with BOS, e.g. Llama/TinyLlama but not SmolLM2."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def chat_template(template: str, bos: bool = False) -> str:
    """A Jinja chat template that renders a conversation the way `render_prompt` renders a record.

    The user message is the instruction (no input); a system message, if any, replaces the preamble; an assistant
    message is followed by EOS, as in training. `add_generation_prompt` adds nothing: the prompt already ends with
    the response header, exactly as the trainer saw it. Servers tokenize a rendered chat without adding special
    tokens, so when training saw a BOS (`bos`), the template writes it.
    """
    if template == "tutorial":
        body = "\n\n### Instruction:\n' + message['content'] + '\n\n### Input:\n\n\n### Output:\n"
    else:
        body = "\n\n### Instruction:\n' + message['content'] + '\n\n### Response:\n"
    pre = _jinja_text(TUTORIAL_PREAMBLE)
    return (
        ("{{- bos_token -}}" if bos else "")
        + "{%- set ns = namespace(pre='" + pre + "') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.pre = message['content'] -%}"
        "{%- elif message['role'] == 'user' -%}{{ ns.pre + '" + body.replace("\n", "\\n") + "' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Sources


_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<lo>-?\d+%?)?:(?P<hi>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """'train[:2000]' -> ('train', slice(None, 2000)); percentages are resolved later against the length."""
    m = _SPLIT.match(split.strip())
    if not m:
        raise UserError(f"data.split: '{split}' is not a split like 'train' or 'train[:2000]' or 'train[10%:]'")
    return m["name"], slice(m["lo"], m["hi"])


def _apply_slice(items: list, sl: slice) -> list:
    def idx(v: str | None) -> int | None:
        if v is None:
            return None
        if v.endswith("%"):
            return round(len(items) * int(v[:-1]) / 100)
        return int(v)

    return items[idx(sl.start):idx(sl.stop)]


def _check_record(rec: Any, where: str) -> dict[str, str]:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with instruction/input/output, got {type(rec).__name__}")
    missing = [k for k in ("instruction", "output") if k not in rec]
    if missing:
        raise UserError(f"{where}: missing field '{missing[0]}' (present: {', '.join(rec) or 'none'}); "
                        "Alpaca records need instruction, output and optionally input")
    out = {}
    for k in ALPACA_FIELDS:
        v = rec.get(k)
        if v is None and k == "input":
            v = ""
        if not isinstance(v, str):
            raise UserError(f"{where}: field '{k}' must be a string, got {type(v).__name__}")
        out[k] = v
    if not out["output"].strip():
        raise UserError(f"{where}: field 'output' is empty; every example needs a response to train on")
    return out


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, object) for every non-blank line; malformed JSON names the file and line."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def _read_local_file(path: Path) -> list[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
        if not isinstance(obj, list):
            raise UserError(f"{path}: a .json data file must hold a list of records")
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(obj)]
    raise UserError(f"data.source: {path} has an unsupported extension; use .jsonl or .json")


def _read_datasets(cfg: DataCfg, split_name: str) -> tuple[list[tuple[str, Any]], bool]:
    """A Hub id, a local dataset folder, or a `save_to_disk` folder, through `datasets`.

    Returns the rows and whether the split's slice was already applied (`load_dataset` slices natively, so a Hub
    dataset is never downloaded whole for `train[:2000]`).
    """
    import datasets

    src = cfg.source
    p = Path(src)
    try:
        sliced = False
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split_name not in ds:
                    raise UserError(f"data.split: {src} has no split '{split_name}' (has: {', '.join(ds)})")
                ds = ds[split_name]
        else:
            ds = datasets.load_dataset(src, cfg.subset, split=cfg.split.strip())
            sliced = True
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
        raise UserError(f"data.source: could not load dataset '{src}' split '{split_name}' "
                        f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return [(f"{src}[{split_name}][{i}]", dict(row)) for i, row in enumerate(ds)], sliced


def load_records(cfg: DataCfg) -> list[dict[str, str]]:
    """Validated Alpaca records from the configured source, split slice and max_examples."""
    split_name, sl = parse_split(cfg.split)
    src = cfg.source
    sliced = False
    if src == "default":
        rows = _read_local_file(DEFAULT_TRAIN)
    else:
        p = Path(src).expanduser()
        if p.is_file():
            rows = _read_local_file(p)
        elif p.is_dir() or "/" in src and not src.startswith((".", "/", "~")):
            rows, sliced = _read_datasets(cfg, split_name)
        else:
            raise UserError(f"data.source: {src} not found (a .jsonl/.json file, a dataset folder, a Hub id, "
                            "or 'default')")
    if not sliced:
        rows = _apply_slice(rows, sl)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    records = [_check_record(rec, where) for where, rec in rows]
    if not records:
        raise UserError(f"data.source: {src} split '{cfg.split}' holds no examples")
    return records


def to_prompt_completion(records: list[dict[str, str]], template: str) -> list[dict[str, str]]:
    return [{"prompt": render_prompt(r, template), "completion": r["output"]} for r in records]


def load_prompts(path: str | None, n: int | None = None) -> list[dict[str, str]]:
    """Prompts for compare/generate: Alpaca records, or {'prompt': ...} lines (the text is the instruction)."""
    p = Path(path) if path else HELDOUT
    if not p.is_file():
        raise UserError(f"{p}: prompt file not found")
    out = []
    for n_line, obj in read_jsonl(p):
        if not isinstance(obj, dict) or not ("instruction" in obj or "prompt" in obj):
            raise UserError(f"{p}:{n_line}: each line needs 'instruction' (Alpaca) or 'prompt'")
        text = obj.get("instruction", obj.get("prompt"))
        if not isinstance(text, str):
            raise UserError(f"{p}:{n_line}: 'instruction'/'prompt' must be a string")
        out.append({"instruction": text, "input": obj.get("input") or ""})
    if not out:
        raise UserError(f"{p}: no prompts")
    return out[:n] if n else out


def tokenize(tokenizer, pairs: list[dict[str, str]], max_length: int | None) -> tuple[list[dict], dict[str, int]]:
    """Prompt/completion pairs to token ids and a completion mask, exactly as TRL's SFTTrainer would tokenize them
    (EOS appended to the completion, the completion starting where prompt and prompt+completion diverge), then cut to
    `max_length` (keeping the start). Tokenizing here lets preflight report what the trainer will see, and lets the
    padding-free path (which TRL does not truncate) receive examples already cut.
    """
    eos = tokenizer.eos_token
    rows, truncated, lost = [], 0, 0
    for p in pairs:
        completion = p["completion"] if p["completion"].endswith(eos) else p["completion"] + eos
        prompt_ids = tokenizer(p["prompt"])["input_ids"]
        ids = tokenizer(p["prompt"] + completion)["input_ids"]
        k = 0
        while k < min(len(prompt_ids), len(ids)) and prompt_ids[k] == ids[k]:
            k += 1
        mask = [0] * k + [1] * (len(ids) - k)
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
            lost += not any(mask)
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows, {"truncated": truncated, "response_lost": lost}
