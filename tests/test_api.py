"""The Python API (lorapipe.api): the verbs as functions with typed results, overrides as keyword arguments."""

import json

import pytest

import lorapipe.api as lp
from lorapipe import serve
from lorapipe.errors import UserError
from lorapipe.merge import MergeResult
from lorapipe.train import TrainResult


def test_train_and_merge_from_python(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    resolved = lp.resolve(cfg, train__max_steps=3, overrides={"lora.r": 4})
    assert (resolved.train.max_steps, resolved.lora.r, resolved.name) == (3, 4, "tiny")
    r = lp.train(cfg, train__max_steps=3, overrides={"lora.r": 4, "name": "nb"})
    assert isinstance(r, TrainResult) and r.steps == 3 and r.run_dir.name == "nb"
    assert json.loads((r.run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert r.metrics["tokens_seen"] > 0 and (r.run_dir / "adapter" / "README.md").is_file()
    m = lp.merge(r.run_dir)
    assert isinstance(m, MergeResult) and (m.merged_dir / "config.json").is_file()
    with pytest.raises(UserError, match="train.max_stepz"):
        lp.resolve(cfg, train__max_stepz=3)


def test_generate_takes_a_list_of_prompts(tiny_run, monkeypatch):
    seen = {}

    def fake_generate(run, path, overrides):
        seen["rows"] = [json.loads(x) for x in open(path).read().splitlines()]
        seen["overrides"] = overrides
        return "result"

    monkeypatch.setattr(serve, "generate", fake_generate)
    assert lp.generate(tiny_run, ["Reverse a string.", {"instruction": "Add", "input": "1, 2"}],
                       eval__max_tokens=8) == "result"
    assert seen == {"rows": [{"prompt": "Reverse a string."}, {"instruction": "Add", "input": "1, 2"}],
                    "overrides": {"eval.max_tokens": 8}}
