"""Training data: sources (shipped set, local .jsonl/.json, Hub), Alpaca records, prompt templates, chat template.

Every record becomes a prompt/completion pair: TRL then trains on the completion only and appends EOS. The same
template is saved with the adapter as a Jinja chat template, so a server renders a chat request exactly the way the
trainer rendered the examples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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


FORMATS = ("alpaca", "messages", "prompt_completion", "text")
_REQUIRED = {"alpaca": ("instruction", "output"), "messages": ("messages",),
             "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_ROLES = ("system", "user", "assistant")


class _BadRow(Exception):
    """One row that cannot be used; raised as a UserError, or counted and skipped with data.skip_bad_rows."""


def detect_format(row: dict[str, Any], where: str) -> str:
    for fmt in ("messages", "alpaca", "prompt_completion", "text"):
        if all(k in row for k in _REQUIRED[fmt]):
            return fmt
    raise UserError(f"{where}: cannot tell the data format from the columns ({', '.join(map(str, row)) or 'none'}); "
                    "expected instruction/output (alpaca), messages, prompt/completion or text. Set data.format, "
                    "and map other names with data.columns (e.g. --data.columns '{question: instruction}')")


def _string(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = rec.get(key)
    if v is None and allow_empty:
        return ""
    if not isinstance(v, str):
        raise _BadRow(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _BadRow(f"{where}: field '{key}' is empty; every example needs it")
    return v


def check_record(rec: Any, fmt: str, where: str) -> dict[str, Any]:
    """One validated record of `fmt`, or _BadRow naming the place, the field and what is wrong."""
    if not isinstance(rec, dict):
        raise _BadRow(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED[fmt] if k not in rec]
    if missing:
        raise _BadRow(f"{where}: missing field '{missing[0]}' (present: {', '.join(map(str, rec)) or 'none'}); "
                      f"{fmt} records need {', '.join(_REQUIRED[fmt])}; map other names with data.columns")
    if fmt == "alpaca":
        out = {"instruction": _string(rec, "instruction", where), "input": _string(rec, "input", where, True),
               "output": _string(rec, "output", where, True)}
        if not out["output"].strip():
            raise _BadRow(f"{where}: field 'output' is empty; every example needs a response to train on")
        return out
    if fmt == "prompt_completion":
        return {"prompt": _string(rec, "prompt", where, True), "completion": _string(rec, "completion", where)}
    if fmt == "text":
        return {"text": _string(rec, "text", where)}
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _BadRow(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise _BadRow(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: str}}")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise _BadRow(f"{where}: the last message must be a non-empty assistant message (the response to train on)")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


def read_jsonl(path: Path, skipped: list[str] | None = None) -> list[tuple[int, Any]]:
    """(line number, object) for every non-blank line; malformed JSON names the file and line (or, with a
    `skipped` list, is recorded there and left out)."""
    rows = []
    text = _read_text(path)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            msg = f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})"
            if skipped is None:
                raise UserError(msg + "; fix it, or pass --data.skip_bad_rows true to skip such rows") from None
            skipped.append(msg)
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") from None


def _read_csv(path: Path, skipped: list[str] | None) -> list[tuple[str, Any]]:
    import csv
    import io

    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if not header:
        return []
    rows = []
    for row in reader:
        if not row:
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            msg = f"{where}: ragged CSV row ({len(row)} fields, the header has {len(header)})"
            if skipped is None:
                raise UserError(msg + "; fix it, or pass --data.skip_bad_rows true to skip such rows")
            skipped.append(msg)
            continue
        rows.append((where, dict(zip(header, row))))
    return rows


def _read_local_file(path: Path, skipped: list[str] | None = None) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    if suffix == ".jsonl":
        return [(f"{path}:{n}", obj) for n, obj in read_jsonl(path, skipped)]
    if suffix == ".json":
        try:
            obj = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, list):
            raise UserError(f"{path}: a .json data file must hold a list of records")
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(obj)]
    if suffix == ".csv":
        return _read_csv(path, skipped)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own error types for a corrupt file
            raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(table.to_pylist())]
    raise UserError(f"data.source: {path} has an unsupported extension; use .jsonl, .json, .csv or .parquet")


def _read_datasets(cfg: DataCfg, src: str, split_name: str) -> tuple[list[tuple[str, Any]], bool]:
    """A Hub id, a local dataset folder, or a `save_to_disk` folder, through `datasets`.

    Returns the rows and whether the split's slice was already applied (`load_dataset` slices natively, so a Hub
    dataset is never downloaded whole for `train[:2000]`).
    """
    import os

    import datasets

    # an unreachable Hub must fail fast with a clear message, not hang on retries
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
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
                        f"({type(exc).__name__}: {str(exc)[:300]}). Check the id, subset and split, your network "
                        "or HF_TOKEN; or download it and point data.source at the file or folder") from None
    return [(f"{src}[{split_name}][{i}]", dict(row)) for i, row in enumerate(ds)], sliced


def _rows_of(src: str, cfg: DataCfg, skipped: list[str] | None) -> list[tuple[str, Any]]:
    split_name, sl = parse_split(cfg.split)
    sliced = False
    if src == "default":
        rows = _read_local_file(DEFAULT_TRAIN)
    else:
        p = Path(src).expanduser()
        if p.is_file():
            rows = _read_local_file(p, skipped)
        elif p.is_dir() or "/" in src and not src.startswith((".", "/", "~")):
            rows, sliced = _read_datasets(cfg, src, split_name)
        else:
            raise UserError(f"data.source: {src} not found (a .jsonl/.json/.csv/.parquet file, a folder of them, a "
                            "saved dataset, a Hub id, or 'default')")
    return rows if sliced else _apply_slice(rows, sl)


@dataclass
class Loaded:
    """Validated records of one format, with what was skipped (data.skip_bad_rows) and where they came from."""

    format: str
    records: list[dict[str, Any]]
    skipped: list[str]
    sources: list[str]


def load_data(cfg: DataCfg, source: str | list[str] | None = None, max_examples: int | None = None) -> Loaded:
    """Records from every configured source (mixed in order), columns mapped, validated against one format."""
    sources = source if source is not None else cfg.source
    sources = [sources] if isinstance(sources, str) else list(sources)
    skipped: list[str] | None = [] if cfg.skip_bad_rows else None
    fmt = None if cfg.format == "auto" else cfg.format
    records: list[dict[str, Any]] = []
    for src in sources:
        rows = _rows_of(src, cfg, skipped)
        if cfg.columns:
            rows = [(w, {cfg.columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r)
                    for w, r in rows]
        src_fmt = None if cfg.format == "auto" else cfg.format
        for where, rec in rows:
            if src_fmt is None and isinstance(rec, dict):
                src_fmt = detect_format(rec, where)
            try:
                records.append(check_record(rec, src_fmt or "alpaca", where))
            except _BadRow as exc:
                if skipped is None:
                    raise UserError(f"{exc}; fix it, or pass --data.skip_bad_rows true to skip such rows") from None
                skipped.append(str(exc))
        if fmt is None and src_fmt is not None:
            fmt = src_fmt
        elif src_fmt is not None and src_fmt != fmt:
            raise UserError(f"data.source: {src} holds {src_fmt} records but an earlier source holds {fmt}; mixed "
                            "sources must share one format (convert one, or map columns with data.columns)")
    limit = max_examples if max_examples is not None else cfg.max_examples
    if limit:
        records = records[:limit]
    if not records:
        raise UserError(f"data.source: {', '.join(sources)} split '{cfg.split}' holds no usable examples"
                        + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    return Loaded(fmt or "alpaca", records, skipped or [], sources)


def load_records(cfg: DataCfg) -> list[dict[str, Any]]:
    """Validated records from the configured sources (see load_data)."""
    return load_data(cfg).records


def split_validation(loaded: Loaded, cfg: DataCfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): data.val_source if set, else data.val_size (fraction or count) held out at random."""
    import random

    if cfg.val_source:
        val = load_data(cfg.model_copy(update={"split": cfg.val_split}), cfg.val_source, max_examples=0)
        if val.format != loaded.format:
            raise UserError(f"data.val_source: holds {val.format} records, the training data {loaded.format}")
        return loaded.records, val.records
    if not cfg.val_size:
        return loaded.records, []
    n = len(loaded.records)
    k = round(n * cfg.val_size) if cfg.val_size < 1 else int(cfg.val_size)
    if not 0 < k < n:
        raise UserError(f"data.val_size: {cfg.val_size} leaves {n - k} of {n} examples for training; lower it")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return ([r for i, r in enumerate(loaded.records) if i not in held],
            [r for i, r in enumerate(loaded.records) if i in held])


def plain_chat_template(bos: bool = False) -> str:
    """For prompt/completion and text data: the user message is the prompt as-is, the assistant's reply then EOS."""
    return (("{{- bos_token -}}" if bos else "")
            + "{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
            "{%- else -%}{{ message['content'] }}{%- endif -%}"
            "{%- endfor -%}")


def to_pairs(records: list[dict[str, Any]], fmt: str, template: str, tokenizer=None) -> list[dict[str, str]]:
    """Every format as prompt/completion text: the loss falls on the completion (the last assistant turn for
    messages; everything for text)."""
    if fmt == "alpaca":
        return to_prompt_completion(records, template)
    if fmt == "prompt_completion":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    if fmt == "text":
        return [{"prompt": "", "completion": r["text"]} for r in records]
    if tokenizer is None or not tokenizer.chat_template:
        raise UserError("data.format: messages are rendered with the model's chat template, and this tokenizer has "
                        "none; use a chat model or convert the data to alpaca or prompt_completion")
    pairs = []
    eos = tokenizer.eos_token
    for r in records:
        msgs = r["messages"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise UserError("data.format messages: the chat template renders the conversation differently from its "
                            "prompt plus the reply, so the reply cannot be located; use prompt_completion data")
        completion = full[len(prompt):]
        if eos and completion.rstrip().endswith(eos):  # the end-of-turn token ends the training sequence
            completion = completion.rstrip()
        pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def prompts_for(records: list[dict[str, str]], cfg: DataCfg, adapter_dir: str | Path | None = None) -> list[str]:
    """The prompt text a run was trained to answer, for {instruction, input} questions (held-out tasks, HumanEval,
    compare/generate prompts): the Alpaca template; the chat template saved with the adapter for messages runs
    (a user turn, then the generation prompt); the question itself for prompt_completion and text runs."""
    def question(r: dict[str, str]) -> str:
        return r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")

    if cfg.format in ("alpaca", "auto"):
        return [render_prompt(r, cfg.template) for r in records]
    if cfg.format != "messages":
        return [question(r) for r in records]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    out = []
    for r in records:
        text = tok.apply_chat_template([{"role": "user", "content": question(r)}], tokenize=False,
                                       add_generation_prompt=True)
        if tok.bos_token and adds_bos(tok) and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]  # the tokenizer adds it again
        out.append(text)
    return out


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


def tokenize(tokenizer, pairs: list[dict[str, str]], max_length: int | None, special: bool = True,
             ) -> tuple[list[dict], dict[str, Any]]:
    """Prompt/completion pairs to token ids and a completion mask, exactly as TRL's SFTTrainer would tokenize them
    (EOS appended to the completion, the completion starting where prompt and prompt+completion diverge), then cut to
    `max_length` (keeping the start). Tokenizing here lets preflight report what the trainer will see, and lets the
    padding-free path (which TRL does not truncate) receive examples already cut. `special=False` for text rendered
    by a chat template, which writes its own special tokens. Also returns each example's full (uncut) prompt and
    response token counts.
    """
    eos = tokenizer.eos_token
    rows, full, truncated, lost = [], [], 0, 0
    for p in pairs:
        completion = p["completion"] if p["completion"].endswith(eos) else p["completion"] + eos
        prompt_ids = tokenizer(p["prompt"], add_special_tokens=special)["input_ids"]
        ids = tokenizer(p["prompt"] + completion, add_special_tokens=special)["input_ids"]
        k = 0
        while k < min(len(prompt_ids), len(ids)) and prompt_ids[k] == ids[k]:
            k += 1
        mask = [0] * k + [1] * (len(ids) - k)
        full.append((k, len(ids) - k))
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
            lost += not any(mask)
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows, {"truncated": truncated, "response_lost": lost, "lengths": full}
