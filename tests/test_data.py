import json

import pytest

from lorapipe import data
from lorapipe.config import DataCfg
from lorapipe.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


REC = {"instruction": "Add two numbers.", "input": "", "output": "def add(a, b):\n    return a + b\n"}


def test_tutorial_template_exact():
    assert data.render_prompt({"instruction": "Do X.", "input": ""}, "tutorial") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Input:\n\n\n### Output:\n")


def test_alpaca_template_omits_empty_input():
    no_input = data.render_prompt({"instruction": "Do X.", "input": ""}, "alpaca")
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")
    with_input = data.render_prompt({"instruction": "Do X.", "input": "[1, 2]"}, "alpaca")
    assert "paired with an input" in with_input and "### Input:\n[1, 2]\n\n### Response:\n" in with_input


@pytest.mark.parametrize("template", ["tutorial", "alpaca"])
def test_chat_template_renders_exactly_what_training_saw(template, tiny_model):
    """The saved chat template must give the server the same text (and ids) as the trainer's prompt + EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = data.chat_template(template)
    rec = {"instruction": "Write `f(x)` that returns x's \"double\".\nUse one line.", "input": ""}
    prompt = data.render_prompt(rec, template)
    msgs = [{"role": "user", "content": rec["instruction"]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == prompt
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "def f(x): return 2 * x"}],
                                   tokenize=False)
    assert full == prompt + "def f(x): return 2 * x" + tok.eos_token
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok(prompt)["input_ids"]
    system = tok.apply_chat_template([{"role": "system", "content": "You write Python."}] + msgs, tokenize=False)
    assert system.startswith("You write Python.\n\n### Instruction:\n")


def test_local_jsonl_with_split_slice(tmp_path):
    rows = [dict(REC, instruction=f"task {i}") for i in range(10)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    recs = data.load_records(DataCfg(source=str(p), split="train[2:5]"))
    assert [r["instruction"] for r in recs] == ["task 2", "task 3", "task 4"]
    assert len(data.load_records(DataCfg(source=str(p), split="train[:50%]"))) == 5
    assert len(data.load_records(DataCfg(source=str(p), max_examples=3))) == 3


def test_json_list_and_null_input(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([dict(REC, input=None)]))
    assert data.load_records(DataCfg(source=str(p)))[0]["input"] == ""


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [REC, REC, '{"instruction": "x", "output": }'])
    with pytest.raises(UserError, match=r"d.jsonl:3: malformed JSON"):
        data.load_records(DataCfg(source=str(p)))


def test_missing_column_names_it_and_lists_present(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [REC, {"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'instruction' \(present: question, answer\)"):
        data.load_records(DataCfg(source=str(p)))


def test_wrong_type_and_empty_output(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [dict(REC, output=3)])
    with pytest.raises(UserError, match="field 'output' must be a string"):
        data.load_records(DataCfg(source=str(p)))
    p = write_jsonl(tmp_path / "e.jsonl", [dict(REC, output="  ")])
    with pytest.raises(UserError, match="'output' is empty"):
        data.load_records(DataCfg(source=str(p)))


def test_non_utf8_and_missing_and_empty(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"instruction": "\xff\xfe"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        data.load_records(DataCfg(source=str(p)))
    with pytest.raises(UserError, match="not found"):
        data.load_records(DataCfg(source=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no usable examples"):
        data.load_records(DataCfg(source=str(tmp_path / "empty.jsonl")))


def test_bad_split_syntax():
    with pytest.raises(UserError, match="data.split"):
        data.parse_split("train[:two]")


def test_saved_dataset_folder_goes_through_datasets(tmp_path):
    """The Hub code path (datasets) exercised offline on a save_to_disk folder and a local dataset folder."""
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list([dict(REC, instruction=f"t{i}")
                                                                    for i in range(6)])})
    ds.save_to_disk(tmp_path / "saved")
    recs = data.load_records(DataCfg(source=str(tmp_path / "saved"), split="train[:4]"))
    assert [r["instruction"] for r in recs] == ["t0", "t1", "t2", "t3"]
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [dict(REC, instruction=f"p{i}") for i in range(5)])
    assert len(data.load_records(DataCfg(source=str(folder)))) == 5
    sliced = data.load_records(DataCfg(source=str(folder), split="train[1:3]"))  # sliced by `datasets` itself
    assert [r["instruction"] for r in sliced] == ["p1", "p2"]
    with pytest.raises(UserError, match="no split 'test'"):
        data.load_records(DataCfg(source=str(tmp_path / "saved"), split="test"))


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="could not load dataset 'nobody-lorapipe/no-such-dataset'"):
        data.load_records(DataCfg(source="nobody-lorapipe/no-such-dataset"))


def test_shipped_sets_sizes_disjoint_and_correct():
    train = [json.loads(line) for line in data.DEFAULT_TRAIN.read_text().splitlines()]
    held = [json.loads(line) for line in data.HELDOUT.read_text().splitlines()]
    assert len(train) >= 300 and len(held) >= 40
    assert len({(r["instruction"], r["input"]) for r in train}) == len(train)
    train_text = "\n".join(r["instruction"] + r["output"] for r in train)
    for h in held:
        assert f"{h['entry_point']}(" not in train_text, h["entry_point"]
    for r in train + held:  # every reference passes its own test
        ns: dict = {}
        exec(r.get("output", r.get("canonical_solution")) + "\n" + r["test"], ns)


def test_prompts_file_forms(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi"}, {"instruction": "Sum", "input": "[1]"}])
    assert data.load_prompts(str(p)) == [{"instruction": "Say hi", "input": ""}, {"instruction": "Sum", "input": "[1]"}]
    assert len(data.load_prompts(None, 3)) == 3  # default: held-out tasks
    write_jsonl(tmp_path / "q.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"q.jsonl:1: each line needs"):
        data.load_prompts(str(tmp_path / "q.jsonl"))


def test_chat_template_writes_bos_when_training_saw_one(tiny_model):
    """Llama-style tokenizers add BOS when the trainer tokenizes; a server tokenizes a rendered chat without
    special tokens, so the template must write BOS itself for the ids to match."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert not data.adds_bos(tok)
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                       special_tokens=[("<|im_start|>", tok.bos_token_id)])
    assert data.adds_bos(tok)
    tok.chat_template = data.chat_template("tutorial", bos=data.adds_bos(tok))
    prompt = data.render_prompt({"instruction": "Sum a list.", "input": ""}, "tutorial")
    text = tok.apply_chat_template([{"role": "user", "content": "Sum a list."}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == tok(prompt)["input_ids"]
