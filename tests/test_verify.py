"""verify on the tiny model (transformers paths; the vLLM paths run in test_integration): passes on a healthy run
and fails, with the right message, on deliberately broken ones."""

import json
import sys

import pytest
from adapters import run_with_adapter, tiny_llama

from lorapipe import data, verify
from lorapipe.cli import main

FAST = {"verify.num_prompts": 6, "verify.max_tokens": 12, "verify.vllm": False, "verify.min_stop_share": 0.0}


def test_healthy_run_passes_holding_one_full_precision_model_at_a_time(run_copy, monkeypatch):
    """A healthy run passes. The float32 reference is gone before the merged model loads (an 8B model is 32 GB in
    float32: two at once would not fit a 48 GB card), freed as its last reference goes, and the merge in between
    streams."""
    import weakref

    import torch
    from transformers import AutoModelForCausalLM

    live, checked = [], []
    real_load, real_from_pretrained = verify.load_model, AutoModelForCausalLM.from_pretrained.__func__

    def load_model(base, cfg, quant, dtype):
        model = real_load(base, cfg, quant, dtype)
        if quant is None and dtype == torch.float32:
            live.append(weakref.ref(model))
        return model

    def from_pretrained(cls, path, *args, **kwargs):
        if str(path).endswith("merged"):
            checked.append([ref() is None for ref in live])
        return real_from_pretrained(cls, path, *args, **kwargs)

    monkeypatch.setattr(verify, "load_model", load_model)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr("lorapipe.merge.load_model", lambda *a, **k: pytest.fail("the merge loaded the whole base"))
    r = verify.run(run_copy, FAST)
    assert checked == [[True]], checked
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


def test_teacher_forced_agreement_counts_each_token_given_the_reference_prefix(tiny_model):
    """A model ranks its own greedy tokens (and the EOS after a stopped answer) first; a perturbed copy does not
    everywhere, and each position counts once (no cascade after the first flip)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = ["def add(a, b):", "Write a function", "return the"]
    ids = [tok(p)["input_ids"] for p in prompts]
    ref, stopped = verify.hf_greedy(model, tok, prompts, 10, {tok.eos_token_id})
    hits = verify.hf_forced(model, ids, ref, stopped, tok.eos_token_id)
    assert [len(h) for h in hits] == [len(r) + s for r, s in zip(ref, stopped)]
    assert verify.forced_agreement(hits) == 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = verify.forced_agreement(verify.hf_forced(model, ids, ref, stopped, tok.eos_token_id))
    assert 0.0 <= other < 1.0
    assert verify.forced_agreement([[True, False], [True]]) == 2 / 3 and verify.forced_agreement([]) == 1.0


def test_report_names_dtype_reference_and_gate(run_copy):
    r = verify.run(run_copy, FAST)
    merged = r.report["paths"]["merged"]
    assert merged["dtype"] == "float32" and merged["reference"] == "peft (float32)" and merged["gate"] == 0.99
    assert merged["passed"] and merged["greedy_agreement"] == 1.0
    assert "peft_half" not in r.report["paths"]  # only with the vLLM paths, at a half serving dtype
    assert "  merged       float32       100.0%  >=99.0%" in r.summary


def test_a_base_too_large_for_one_float32_copy_is_refused_before_loading(run_copy, monkeypatch, capsys):
    """verify's reference holds the base in float32 on one device (a 70B base: 280 GB). Where it cannot fit, verify
    says how much it needs and what to do, before any model loads; the CLI exits 2 (bad input, not a FAIL)."""
    monkeypatch.setattr("lorapipe.preflight.available_ram_gib", lambda: 1e-6)  # this test machine has no GPU
    monkeypatch.setattr(verify, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(verify.UserError, match=r"needs about .* GiB and CPU memory has 0.0 GiB free.*--verify.vllm "
                                               r"true\), which then check the served model against itself"):
        verify.run(run_copy, FAST)
    assert main(["verify", str(run_copy)] + [f"--{k}={v}" for k, v in FAST.items()]) == 2
    assert "float32" in capsys.readouterr().err
    # vLLM's paths asked for but vLLM missing: said up front too, not after the template checks
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(verify.UserError, match=r"GiB free.*with vLLM installed \(`pip install vllm`\)"):
        verify.run(run_copy, {**FAST, "verify.vllm": True})
