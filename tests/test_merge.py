import pytest
import torch

from lorapipe import merge
from lorapipe.errors import UserError


def test_merge_matches_adapter_on_full_precision_base(tiny_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = merge.run(tiny_run, overwrite=True)
    assert (r.merged_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(r.merged_dir)
    assert "### Output:" in tok.chat_template  # the training template travels with the merged model
    merged = AutoModelForCausalLM.from_pretrained(r.merged_dir, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tiny_run / "adapter")
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = peft(ids).logits, merged(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    # the adapter is not a no-op, so this comparison means something
    with torch.no_grad(), peft.disable_adapter():
        assert (peft(ids).logits - a).abs().max().item() > 1e-6


def test_merge_refuses_to_overwrite_and_needs_a_run(tiny_run, tmp_path):
    merge.run(tiny_run, overwrite=True)
    with pytest.raises(UserError, match="already exists"):
        merge.run(tiny_run)
    with pytest.raises(UserError, match="not a lorapipe run directory"):
        merge.run(tmp_path)
