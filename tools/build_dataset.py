"""Build lorapipe's shipped data: src/lorapipe/assets/default_train.jsonl and heldout.jsonl.

Every training output and every held-out reference solution is executed against its test here, so the shipped data
is known to be correct. All tasks were written for lorapipe (see tasks_*.py); none is taken from a dataset or derived
from HumanEval. Run: python tools/build_dataset.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tasks_families import FAMILIES  # noqa: E402
from tasks_heldout import HELDOUT  # noqa: E402
from tasks_singles import SINGLES  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "lorapipe" / "assets"


def check(code: str, test: str, label: str) -> None:
    ns: dict = {"__name__": "__task__"}
    try:
        exec(compile(code + "\n" + test, label, "exec"), ns)
    except Exception as exc:
        raise SystemExit(f"{label}: reference fails its test: {type(exc).__name__}: {exc}\n{code}\n{test}") from exc


def main() -> None:
    train = [(i, "", o, t) for i, o, t in SINGLES]
    for fam in FAMILIES:
        train.extend(fam())
    rows, seen = [], set()
    for n, (instruction, inp, output, test) in enumerate(train):
        check(output, test, f"train[{n}]")
        key = (instruction, inp)
        if key in seen:
            raise SystemExit(f"duplicate training instruction: {instruction}")
        seen.add(key)
        rows.append({"instruction": instruction, "input": inp, "output": output, "test": test})
    train_names = {r["instruction"].split("`")[1] for r in rows if "`" in r["instruction"]}
    held = []
    for n, (entry, instruction, solution, test) in enumerate(HELDOUT):
        entry = instruction.split("`")[1].split("(")[0]
        check(solution, test, f"heldout[{n}]")
        if entry in train_names or any(entry + "(" in r["instruction"] for r in rows):
            raise SystemExit(f"held-out task {entry} overlaps the training set")
        held.append({"task_id": f"lorapipe/{n}", "instruction": instruction, "input": "", "entry_point": entry,
                     "canonical_solution": solution, "test": test})
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, data in (("default_train.jsonl", rows), ("heldout.jsonl", held)):
        with open(ASSETS / name, "w", encoding="utf-8") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"default_train.jsonl: {len(rows)} examples; heldout.jsonl: {len(held)} tasks (all tests pass)")


if __name__ == "__main__":
    main()
