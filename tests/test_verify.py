"""verify on the tiny model (transformers paths; the vLLM paths run in test_integration): passes on a healthy run
and fails, with the right message, on deliberately broken ones."""

import json
import shutil

import pytest
from adapters import run_with_adapter, tiny_llama

from lorapipe import data, verify
from lorapipe.cli import main

FAST = {"verify.num_prompts": 6, "verify.max_tokens": 12, "verify.vllm": False, "verify.min_stop_share": 0.0}


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_run, dst)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    return dst


def test_healthy_run_passes(run_copy):
    r = verify.run(run_copy, FAST)
    assert r.passed, r.summary
    paths = r.report["paths"]
    assert paths["merged"]["agreement"] == 1.0 and paths["merged"]["exact"] == 1.0
    assert "peft_4bit" in paths  # reported alongside
    assert r.report["max_abs_logit_diff_peft_vs_merged"] < 1e-4
    t = r.report["template"]
    assert t["chat_equal"] == 1.0 and t["completion_equal"] == 1.0 and t["eos_is_a_server_stop"]
    saved = json.loads((run_copy / "verify.json").read_text())
    assert saved["passed"] and (run_copy / "verify.md").read_text().startswith(f"verify {run_copy}: PASS")


def test_wrong_template_saved_fails(run_copy):
    (run_copy / "adapter" / "chat_template.jinja").write_text(data.chat_template("alpaca"))
    r = verify.run(run_copy, FAST)
    assert not r.passed and r.report["template"]["chat_equal"] == 0.0
    assert any(f.startswith("template round-trip") for f in r.failures)


def test_eos_the_server_does_not_stop_on_fails(run_copy):
    cfg_path = run_copy / "adapter" / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["eos_token"] = "<|endoftext|>"
    cfg_path.write_text(json.dumps(tc))
    r = verify.run(run_copy, FAST)
    assert not r.passed
    assert any("EOS: training appended '<|endoftext|>'" in f for f in r.failures)


def test_answers_that_never_stop_fail_the_stop_check(run_copy):
    r = verify.run(run_copy, {**FAST, "verify.min_stop_share": 0.5})  # a random tiny model never emits EOS
    assert not r.passed and any(f.startswith("stop:") and "was EOS trained?" in f for f in r.failures)


def test_adapter_for_another_base_fails(tiny_run, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / "other", tiny_llama(hidden=32), {"target_modules": ["q_proj"]})
    r = verify.run(run, FAST)
    assert not r.passed and "adapter does not fit the base" in r.failures[0]


def test_cli_exit_code_is_the_verdict(run_copy, capsys):
    args = ["verify", str(run_copy)] + [f"--{k}={v}" for k, v in FAST.items()]
    assert main(args) == 0
    assert main(args[:-1] + ["--verify.min_stop_share=0.9"]) == 1
    assert "FAIL: stop:" in capsys.readouterr().out


def test_agreement_metric():
    a = verify.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 9], [5, 6]])
    assert a["agreement"] == (2 + 2) / (4 + 2) and a["exact"] == 0.5 and a["first_divergence"] == [2, None]
