import pytest
import torch

from lorapipe import models
from lorapipe.config import ModelCfg
from lorapipe.errors import UserError


class FakeTok:
    def __init__(self, vocab, eos, pad=None, unk=None, bos=None):
        self._vocab = {t: i for i, t in enumerate(vocab)}
        self.eos_token, self.pad_token, self.unk_token, self.bos_token = eos, pad, unk, bos

    def get_vocab(self):
        return self._vocab


def test_pad_distinct_from_eos_prefers_unk():
    tok = FakeTok(["<unk>", "<s>", "</s>"], eos="</s>", pad="</s>", unk="<unk>", bos="<s>")
    assert "set to '<unk>'" in models.ensure_pad_token(tok)
    assert tok.pad_token == "<unk>"


def test_pad_uses_reserved_llama3_pad():
    tok = FakeTok(["<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"], eos="<|eot_id|>",
                  bos="<|begin_of_text|>")
    models.ensure_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"


def test_existing_distinct_pad_kept_and_no_candidate_falls_back_to_eos():
    tok = FakeTok(["a", "<pad>", "</s>"], eos="</s>", pad="<pad>")
    assert "kept" in models.ensure_pad_token(tok)
    tok = FakeTok(["a", "</s>"], eos="</s>")
    assert "pad token = EOS" in models.ensure_pad_token(tok) and tok.pad_token == "</s>"


def test_compute_dtype():
    assert models.compute_dtype("float16") == torch.float16
    if not torch.cuda.is_available():
        expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32
        assert models.compute_dtype("auto") == expected


def test_resolve_model_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        models.resolve_model(ModelCfg(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="neither an existing folder nor a Hub id"):
        models.resolve_model(ModelCfg(name_or_path="./not-here"))
    assert models.resolve_model(ModelCfg(name_or_path="org/model")) == "org/model"


def test_unreachable_hub_model_is_a_clear_error():
    with pytest.raises(UserError, match="could not load 'nobody-lorapipe/no-such-model'"):
        models.load_tokenizer("nobody-lorapipe/no-such-model", ModelCfg(name_or_path="nobody-lorapipe/no-such-model"))


def test_four_bit_load_is_really_nf4(tiny_model):
    import bitsandbytes as bnb

    from lorapipe.config import QuantCfg

    m = models.load_model(str(tiny_model), ModelCfg(name_or_path=str(tiny_model)), QuantCfg(), torch.float32)
    layers = [mod for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    qs = layers[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # nested = double quantization
