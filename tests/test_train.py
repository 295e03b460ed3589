import json

import pytest
import yaml

from lorapipe import train
from lorapipe.errors import UserError


def test_run_directory_contract(tiny_run):
    rd = tiny_run
    for rel in ["config.yaml", "metrics.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "adapter/tokenizer_config.json", "adapter/chat_template.jinja", "logs/metrics.jsonl",
                "logs/trainer_state.json"]:
        assert (rd / rel).is_file(), rel
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    assert cfg["name"] == "tiny" and cfg["lora"]["r"] == 8
    acfg = json.loads((rd / "adapter" / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 32 and set(acfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    m = json.loads((rd / "metrics.json").read_text())
    assert m["steps"] == 2 and m["tokens_seen"] > 0 and m["data"]["examples"] == 8
    steps = [json.loads(line) for line in (rd / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert not list(rd.parent.glob(".*tmp*"))  # no temp folders left


def test_adapter_tokenizer_has_distinct_pad_and_training_template(tiny_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run / "adapter")
    assert tok.pad_token != tok.eos_token
    assert "### Output:" in tok.chat_template


def test_loss_is_on_the_response_and_eos_only(tiny_cfg):
    """What TRL trains on, token by token: prompt masked, response + EOS carry loss."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorapipe import data as data_mod
    from lorapipe.models import ensure_pad_token

    cfg = tiny_cfg()
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    ensure_pad_token(tok)
    pair = data_mod.to_prompt_completion(data_mod.load_records(cfg.data)[:1], "tutorial")[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list([pair]),
                         args=SFTConfig(output_dir="/tmp/lorapipe-mask", use_cpu=True, report_to="none",
                                        completion_only_loss=True, max_length=256))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(tok(pair["prompt"])["input_ids"])
    assert all(lbl == -100 for lbl in labels[:n_prompt])
    trained = [i for i, lbl in zip(ids, labels) if lbl != -100]
    assert trained[-1] == tok.eos_token_id
    assert tok.decode(trained[:-1]) == pair["completion"]


def test_existing_run_dir_is_refused(tiny_cfg):
    cfg = tiny_cfg()
    cfg.run_dir().mkdir(parents=True)
    with pytest.raises(UserError, match="already exists"):
        train.run(cfg)


def test_failed_training_leaves_only_a_marked_in_progress_folder(tiny_cfg, monkeypatch):
    import trl

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(trl.SFTTrainer, "train", boom)
    cfg = tiny_cfg(name="crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(cfg)
    assert not cfg.run_dir().exists()
    assert [p.name for p in cfg.run_dir().parent.iterdir()] == ["crash.incomplete"]
    assert "lorapipe train" in (cfg.run_dir().parent / "crash.incomplete" / "INCOMPLETE").read_text()


def test_unknown_target_module_is_a_user_error(tiny_cfg):
    with pytest.raises(UserError, match="lora.target_modules"):
        train.run(tiny_cfg(**{"lora.target_modules": ["not_a_module"]}))


def test_all_linear_targets(tiny_cfg):
    r = train.run(tiny_cfg(name="alllin", **{"lora.target_modules": "all-linear", "train.max_steps": 1}))
    acfg = json.loads((r.run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
