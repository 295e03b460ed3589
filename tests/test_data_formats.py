"""Issue #3: every format and source, column mapping, mixing, validation splits, bad input, masking, preflight."""

import json

import pytest

from lorapipe import data, preflight
from lorapipe.config import DataCfg
from lorapipe.errors import UserError

ALP = {"instruction": "Add two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_model(tiny_model, tmp_path):
    """The tiny model with a ChatML chat template (like SmolLM2's)."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path / "chatmodel"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


def test_formats_are_detected_and_normalised(tmp_path):
    cases = {
        "alpaca": [ALP],
        "messages": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        "prompt_completion": [{"prompt": "2+2=", "completion": "4"}],
        "text": [{"text": "def f():\n    pass"}],
    }
    for fmt, rows in cases.items():
        loaded = data.load_data(DataCfg(source=str(jsonl(tmp_path / f"{fmt}.jsonl", rows))))
        assert loaded.format == fmt and len(loaded.records) == 1
    with pytest.raises(UserError, match="cannot tell the data format.*data.columns"):
        data.load_data(DataCfg(source=str(jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}]))))


def test_column_mapping_csv_parquet_and_mixing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "qa.csv"
    csv.write_text('question,answer\n"Say hi, please",hi\nSay bye,bye\n')
    pq.write_table(pa.Table.from_pylist([{"question": "p", "answer": "q"}]), tmp_path / "qa.parquet")
    cfg = DataCfg(source=[str(csv), str(tmp_path / "qa.parquet")],
                  columns={"question": "instruction", "answer": "output"})
    loaded = data.load_data(cfg)
    assert loaded.format == "alpaca"
    assert [r["instruction"] for r in loaded.records] == ["Say hi, please", "Say bye", "p"]
    # sources of different formats do not mix
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match="mixed sources must share one format"):
        data.load_data(DataCfg(source=[str(jsonl(tmp_path / "a.jsonl", [ALP])), str(pc)]))


def test_folder_of_files_goes_through_datasets(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [dict(ALP, instruction=f"t{i}") for i in range(4)])
    assert len(data.load_data(DataCfg(source=str(folder), split="train[:3]")).records) == 3


def test_bad_rows_stop_with_place_or_are_skipped_and_counted(tmp_path):
    rows = [ALP, '{"instruction": "x", "output": ', dict(ALP, output=7), {"instr": "x"}, ALP]
    p = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON.*skip_bad_rows"):
        data.load_data(DataCfg(source=str(p)))
    loaded = data.load_data(DataCfg(source=str(p), skip_bad_rows=True))
    assert len(loaded.records) == 2 and len(loaded.skipped) == 3
    assert any("bad.jsonl:3: field 'output' must be a string" in s for s in loaded.skipped)
    assert any("bad.jsonl:4: missing field 'instruction' (present: instr)" in s for s in loaded.skipped)
    ragged = tmp_path / "r.csv"
    ragged.write_text("instruction,output\na,b\nc,d,e\nf,g\n")
    with pytest.raises(UserError, match=r"r.csv:3: ragged CSV row \(3 fields, the header has 2\)"):
        data.load_data(DataCfg(source=str(ragged)))
    assert len(data.load_data(DataCfg(source=str(ragged), skip_bad_rows=True)).records) == 2
    latin = tmp_path / "l.csv"
    latin.write_bytes("instruction,output\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        data.load_data(DataCfg(source=str(latin)))
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="the file is empty"):
        data.load_data(DataCfg(source=str(empty)))
    msgs = jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match="last message must be a non-empty assistant"):
        data.load_data(DataCfg(source=str(msgs)))


def test_validation_split_by_share_count_or_file(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [dict(ALP, instruction=f"t{i}") for i in range(10)])
    loaded = data.load_data(DataCfg(source=str(p)))
    tr, va = data.split_validation(loaded, DataCfg(source=str(p), val_size=0.2), seed=1)
    assert (len(tr), len(va)) == (8, 2) and not {r["instruction"] for r in tr} & {r["instruction"] for r in va}
    tr, va = data.split_validation(loaded, DataCfg(source=str(p), val_size=3), seed=1)
    assert (len(tr), len(va)) == (7, 3)
    v = jsonl(tmp_path / "v.jsonl", [dict(ALP, instruction="val")])
    tr, va = data.split_validation(loaded, DataCfg(source=str(p), val_source=str(v)), seed=1)
    assert (len(tr), [r["instruction"] for r in va]) == (10, ["val"])
    with pytest.raises(UserError, match="data.val_size"):
        data.split_validation(loaded, DataCfg(source=str(p), val_size=10), seed=1)


def test_messages_masking_token_by_token(chat_model):
    """Loss on the last assistant turn and its end-of-turn token only; the prompt is exactly the generation prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    rec = {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "Red."}]}
    pairs = data.to_pairs([rec], "messages", "tutorial", tok)
    assert pairs[0]["prompt"].endswith("<|im_start|>assistant\n") and pairs[0]["completion"] == "Red.<|im_end|>"
    rows, _ = data.tokenize(tok, pairs, 256, special=False)
    ids, mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Red.<|im_end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == pairs[0]["prompt"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 3  # one end-of-turn per message


def test_text_and_prompt_completion_masks(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    pc = data.to_pairs([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], "prompt_completion", "tutorial")
    rows, _ = data.tokenize(tok, pc, 64)
    ids, mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " 4<|im_end|>"
    text = data.to_pairs([{"text": "def f():\n    pass"}], "text", "tutorial")
    rows, _ = data.tokenize(tok, text, 64)
    assert all(rows[0]["completion_mask"]) and tok.decode(rows[0]["input_ids"]) == "def f():\n    pass<|im_end|>"


def test_tokenize_matches_trl_token_by_token(tiny_cfg):
    """lorapipe tokenizes for preflight and padding-free; the ids and labels must be TRL's own."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorapipe.models import ensure_pad_token

    cfg = tiny_cfg()
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    ensure_pad_token(tok)
    pairs = data.to_prompt_completion(data.load_records(cfg.data)[:4], "tutorial")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path), processing_class=tok,
                         train_dataset=Dataset.from_list(pairs),
                         args=SFTConfig(output_dir="/tmp/lorapipe-tok", use_cpu=True, report_to="none",
                                        completion_only_loss=True, max_length=256))
    ours, cut = data.tokenize(tok, pairs, 256)
    assert len(trainer.train_dataset) == len(ours) == 4
    for i, row in enumerate(ours):
        theirs = trainer.train_dataset[i]
        assert row["input_ids"] == theirs["input_ids"]
        assert [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])] == theirs["labels"]
    assert cut["truncated"] == sum(n + m > 256 for n, m in cut["lengths"])


def test_preflight_report_and_refusals(tiny_cfg, chat_model, tmp_path):
    from lorapipe import train

    cfg = tiny_cfg(**{"data.val_size": 2})
    prep = preflight.prepare(cfg)
    r = prep.report
    assert (r["format"], r["examples"], r["validation_examples"], r["problems"]) == ("alpaca", 6, 2, [])
    assert 0 < r["loss_token_share"] < 1 and r["ending_with_eos"] == 6 and r["duplicates"] == 0
    assert r["prompt_tokens"]["p50"] <= r["prompt_tokens"]["p95"] <= r["prompt_tokens"]["max"]
    assert len(r["examples_rendered"]) == 2 and "⟦" in r["examples_rendered"][0]
    assert r["examples_rendered"][0].endswith("<|im_end|>⟧")
    assert r["memory_estimate_gib"]["total"] > 0 and r["steps"] == 2
    assert "# Preflight" in preflight.summary(r)
    for kind, says in (("graphs", "one CUDA graph per layer"), ("model-graphs", "the decoder stack as one CUDA graph")):
        assert f"compiled: {says}" in preflight.summary({**r, "layout": {**r["layout"], "compile": kind}})  # GPU only
    # whole-text loss: every token carries loss
    assert preflight.prepare(tiny_cfg(**{"data.completion_only_loss": False})).report["loss_token_share"] == 1.0
    # prompts longer than max_length: responses lost -> train refuses, --force trains on what is left
    long = jsonl(tmp_path / "long.jsonl", [dict(ALP, input="x " * 200)] * 3 + [ALP] * 3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    fits = len(tok(data.render_prompt(ALP, "tutorial") + ALP["output"])["input_ids"]) + 8
    bad = tiny_cfg(**{"data.source": str(long), "data.max_length": fits, "train.max_steps": 1, "name": "long"})
    with pytest.raises(UserError, match=r"3 of 6 examples \(50%\) lose their whole response.*--force"):
        train.run(bad)
    assert not bad.run_dir().exists()
    run = train.run(bad, force=True)
    pj = json.loads((run.run_dir / "preflight.json").read_text())
    assert pj["response_lost"] == 3 and (run.run_dir / "preflight.md").exists()
    # chat data: the model's own chat template is what the adapter keeps
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]}
                                           for i in range(4)])
    r2 = train.run(tiny_cfg(**{"data.source": str(chat), "model.name_or_path": str(chat_model), "name": "chat",
                               "train.max_steps": 1, "data.val_size": 1}))
    saved = json.loads((r2.run_dir / "adapter" / "tokenizer_config.json").read_text())
    chat_tpl = saved.get("chat_template") or (r2.run_dir / "adapter" / "chat_template.jinja").read_text()
    assert chat_tpl == CHATML
    m = json.loads((r2.run_dir / "metrics.json").read_text())
    assert m["data"]["format"] == "messages" and m["eval_loss"] is not None
    # the served template reproduces the trained ids for chat data too, and later stages prompt the chat way
    from lorapipe import verify
    from lorapipe.runs import load_run

    rcfg = load_run(r2.run_dir)
    assert rcfg.data.format == "messages"
    rt = verify.template_roundtrip(rcfg, r2.run_dir, str(chat_model), data.load_records(rcfg.data))
    assert (rt["chat_equal"], rt["completion_equal"], rt["eos_is_a_server_stop"]) == (1.0, 1.0, True)
    assert data.prompts_for([{"instruction": "hi", "input": ""}], rcfg.data, r2.run_dir / "adapter") == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


def test_preflight_warns_when_the_disk_cannot_take_the_merge(tiny_cfg, monkeypatch, caplog):
    """Merging after training writes the base in float32 (280 GB for 70B): where the output disk cannot take it,
    preflight says so before training, not hours later."""
    import logging
    from collections import namedtuple

    cfg = tiny_cfg()
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        preflight.prepare(cfg)
    assert "after training" not in caplog.text  # this disk has room for the tiny model
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lorapipe.merge.shutil.disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        preflight.prepare(cfg)
    assert "after training, the merged model in float32" in caplog.text and "GiB free" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 says it for every process
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        preflight.prepare(cfg)
    assert "after training" not in caplog.text
