"""The vLLM flags are derived from the adapters; what vLLM cannot serve is refused before a server starts."""

import json
import shutil

import pytest

from lorapipe import serve
from lorapipe.errors import UserError


def copy_run(src, dst, **adapter_changes):
    shutil.copytree(src, dst)
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


def test_refuses_modules_to_save_dora_and_huge_rank(tiny_run, tmp_path):
    with pytest.raises(UserError, match="modules_to_save"):
        serve.plan([copy_run(tiny_run, tmp_path / "a", modules_to_save=["lm_head"])])
    with pytest.raises(UserError, match="DoRA"):
        serve.plan([copy_run(tiny_run, tmp_path / "b", use_dora=True)])
    with pytest.raises(UserError, match="above vLLM's maximum"):
        serve.plan([copy_run(tiny_run, tmp_path / "c", r=1024)])


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
