"""The vLLM flags are derived from the adapters; what vLLM cannot serve is refused before a server starts."""

import json
import shutil

import pytest
import torch
from adapters import run_with_adapter, tiny_gpt2, tiny_llama

from lorapipe import serve
from lorapipe.errors import UserError
from lorapipe.models import cpu_has_bf16


def copy_run(src, dst, **adapter_changes):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    p = dst / "adapter" / "adapter_config.json"
    acfg = json.loads(p.read_text())
    acfg.update(adapter_changes)
    p.write_text(json.dumps(acfg))
    return dst


def test_flags_come_from_the_adapters(tiny_run, tmp_path):
    other = copy_run(tiny_run, tmp_path / "second", r=12)
    p = serve.plan([tiny_run, other], {"serve.port": 8123})
    assert p.max_lora_rank == 16  # r=8 and r=12 -> vLLM's bucket 16
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in cmd
    mods = cmd[cmd.index("--lora-modules") + 1:][:2]
    assert mods == [f"tiny={(tiny_run / 'adapter').resolve()}", f"second={(other / 'adapter').resolve()}"]
    assert cmd[cmd.index("--chat-template") + 1].endswith("chat_template.jinja")
    assert cmd[cmd.index("--port") + 1] == "8123"
    kw = serve.engine_kwargs(p)
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and kw["model"] == p.base
    # the same dtype and compile choice on both paths: on CPU eager, float32 unless the CPU computes bf16 natively
    assert cmd[cmd.index("--dtype") + 1] == kw["dtype"] and ("--enforce-eager" in cmd) == kw["enforce_eager"]
    if not torch.cuda.is_available():
        assert kw["enforce_eager"] and kw["dtype"] == ("auto" if cpu_has_bf16() else "float32")
    forced = serve.plan([tiny_run], {"serve.dtype": "bfloat16", "serve.enforce_eager": False})
    assert serve.engine_kwargs(forced)["dtype"] == "bfloat16" and "--enforce-eager" not in serve.server_command(forced)


@pytest.mark.parametrize("case, lora, match", [
    ("modules_to_save", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("dora", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}, "DoRA"),
    ("huge_rank", {"target_modules": ["q_proj"], "r": 1024}, "above vLLM's maximum 512"),
])
def test_refuses_what_vllm_lora_cannot_load(case, lora, match, tiny_run, tiny_model, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / case, tiny_llama(tokenizer_dir=tiny_model), lora)
    with pytest.raises(UserError, match=match) as e:
        serve.plan([run])
    assert f"lorapipe serve {run} --merged" in str(e.value)  # says what to do instead


def test_refuses_adapter_for_another_base(tiny_run, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / "other", tiny_llama(hidden=32), {"target_modules": ["q_proj"]})
    with pytest.raises(UserError, match=r"trained for another base model \(model.layers.0.self_attn.q_proj takes 64"):
        serve.plan([run])


def test_refuses_targets_the_base_does_not_have(tiny_run, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / "gpt2", tiny_gpt2(), {"target_modules": ["c_attn"]})
    with pytest.raises(UserError, match="targets modules the base does not have: c_attn"):
        serve.plan([run])


def test_refuses_added_tokens(tiny_run, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = tiny_llama(tokenizer_dir=tiny_model)
    model.resize_token_embeddings(len(tok))
    run = run_with_adapter(tiny_run, tmp_path / "added", model, {"target_modules": ["q_proj"]}, tokenizer=tok)
    with pytest.raises(UserError, match="added tokens"):
        serve.plan([run])


def test_merged_mode_serves_the_merged_model(tiny_run, tmp_path):
    from lorapipe import merge

    with pytest.raises(UserError, match="has no merged model"):
        serve.plan([copy_run(tiny_run, tmp_path / "unmerged")], merged=True)
    merge.run(tiny_run, overwrite=True)
    p = serve.plan([tiny_run], merged=True)
    cmd = serve.server_command(p)
    assert "--enable-lora" not in cmd and cmd[cmd.index("--model") + 1] == str((tiny_run / "merged").resolve())
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny"


def test_refuses_runs_on_different_bases(tiny_run, tiny_model, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    other = copy_run(tiny_run, tmp_path / "other")
    cfg = (other / "config.yaml").read_text().replace(str(tiny_model), str(other_base))
    (other / "config.yaml").write_text(cfg)
    with pytest.raises(UserError, match="different base models"):
        serve.plan([tiny_run, other])


def test_refuses_mixed_templates_and_duplicate_names(tiny_run, tmp_path):
    other = copy_run(tiny_run, tmp_path / "x" / "tiny")
    with pytest.raises(UserError, match="share a name"):
        serve.plan([tiny_run, other])
    alp = copy_run(tiny_run, tmp_path / "alp")
    (alp / "adapter" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(UserError, match="different prompt templates"):
        serve.plan([tiny_run, alp])
