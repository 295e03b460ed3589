"""Model cards in the Hugging Face format, rewritten as stages add to a run; `lorapipe push` (no network: a fake
HfApi records what would be sent)."""

import json

import pytest
from huggingface_hub import ModelCard

from lorapipe import cards, merge
from lorapipe.cli import main
from lorapipe.errors import UserError


def test_training_and_merge_write_cards_from_the_run(run_copy):
    card = ModelCard.load(run_copy / "adapter" / "README.md")  # written by `train`
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local folder is no Hub id; the body names it instead
    assert {"lorapipe", "sft", "qlora", "lora"} <= set(card.data.tags)
    m = json.loads((run_copy / "metrics.json").read_text())
    text = card.text
    assert f"train loss {m['train_loss']:.4f}" in text and "| LoRA rank / alpha / dropout | 8 / 32 / 0.05 |" in text
    assert "PeftModel.from_pretrained" in text and "eval: not run" in text and "verify: not run" in text
    merge.run(run_copy, overwrite=True)
    merged = ModelCard.load(run_copy / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "merge" in merged.data.tags
    assert "AutoModelForCausalLM.from_pretrained" in merged.text and "PeftModel" not in merged.text


def test_hub_ids_go_into_the_header(run_copy):
    import yaml

    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B"
    cfg["data"]["source"] = "tatsu-lab/alpaca"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path,) = cards.write(run_copy, repo_id="me/tiny-lora")
    card = ModelCard.load(path)
    assert card.data.base_model == "meta-llama/Llama-3.1-8B" and card.data.datasets == ["tatsu-lab/alpaca"]
    assert "base_model:adapter:meta-llama/Llama-3.1-8B" in card.data.tags and card.data.license is None
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card.text and "REPO_ID" not in card.text


def test_push_uploads_the_folder_with_its_card(run_copy, capsys):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))

    url, files = cards.push(run_copy, "me/tiny-lora", private=True, api=FakeApi())
    assert url == "https://huggingface.co/me/tiny-lora"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= set(files)
    assert calls[0] == ("create", "me/tiny-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    up = calls[1][1]
    assert up["folder_path"] == str(run_copy / "adapter") and up["allow_patterns"] == files
    with pytest.raises(UserError, match="has no merged model to push; run `lorapipe merge"):
        cards.push(run_copy, "me/tiny-merged", merged=True, api=FakeApi())
    with pytest.raises(UserError, match="expected NAMESPACE/NAME"):
        cards.push(run_copy, "no-namespace", api=FakeApi())
    assert len(calls) == 2  # the refusals sent nothing
    assert main(["push", str(run_copy), "me/tiny-lora", "--dry-run"]) in (0, None)
    out = capsys.readouterr().out
    assert "would upload" in out and "adapter_model.safetensors" in out
    assert main(["push", str(run_copy), "me/x", "--merged", "--dry-run"]) == 2  # exit 2, a message, no traceback
