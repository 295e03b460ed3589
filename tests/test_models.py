import os

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


def test_the_base_quantized_in_cpu_memory_is_kept_for_later_runs(tiny_model, tmp_path, monkeypatch):
    """train.fsdp_loading cpu: bitsandbytes quantizes on the CPU slowly (minutes for large models), so the first run
    keeps the 4-bit base in lorapipe's cache and later runs read it back: the same 4-bit codes, scales and loss,
    without quantizing, and the model still names the real base (the adapter records it). Another base, other
    weights in the same folder, or other quantization settings get another entry; LORAPIPE_QUANTIZED_CACHE=0 keeps
    nothing."""
    import os

    import bitsandbytes.functional as bnbf

    from lorapipe.config import QuantCfg

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    path, cfg, quant = str(tiny_model), ModelCfg(name_or_path=str(tiny_model)), QuantCfg()

    def load():
        return models._quantized_in_cpu_memory(path, cfg, quant, torch.bfloat16)

    first = load()
    kept = models.quantized_cache(path, cfg, quant, torch.bfloat16)
    assert (kept / "config.json").is_file() and kept.parent == tmp_path / "cache" / "quantized"
    monkeypatch.setattr(bnbf, "quantize_4bit", lambda *a, **k: pytest.fail("quantized again"))
    again = load()
    w1, w2 = (m.model.layers[0].mlp.down_proj.weight for m in (first, again))
    assert torch.equal(w1.view(torch.uint8), w2.view(torch.uint8)) and w2.dtype == torch.bfloat16
    assert torch.equal(w1.quant_state.absmax, w2.quant_state.absmax)
    assert torch.equal(w1.quant_state.state2.absmax, w2.quant_state.state2.absmax)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    assert again(input_ids=ids, labels=ids).loss.item() == first(input_ids=ids, labels=ids).loss.item()
    assert again.config._name_or_path == path and again.is_loaded_in_4bit
    assert models.quantized_cache(path, cfg, QuantCfg(double_quant=False), torch.bfloat16) != kept
    assert models.quantized_cache(path, cfg, quant, torch.float16) != kept
    weights = next(f for f in tiny_model.iterdir() if f.suffix == ".safetensors")
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    os.utime(weights, ns=(times[0], times[1] + 1))  # the same name and size, written again
    try:
        assert models.quantized_cache(path, cfg, quant, torch.bfloat16) != kept
    finally:
        os.utime(weights, ns=times)
    monkeypatch.setenv("LORAPIPE_QUANTIZED_CACHE", "0")
    assert models.quantized_cache(path, cfg, quant, torch.bfloat16) is None


def test_a_kept_4bit_base_is_never_swapped_for_another_copy(tmp_path):
    """Two processes may quantize the same base at once (each node's rank 0 over a shared cache folder, or two runs
    started together). The second to finish must not swap out the copy the first kept, which other processes may be
    reading: it removes its own. A copy already there is not written again; a broken entry in the way is an OSError
    (the caller then keeps nothing) and leaves nothing behind."""
    from pathlib import Path

    class Quantized:  # what _keep_quantized uses of a model
        def __init__(self, meanwhile=lambda: None):
            self.meanwhile = meanwhile

        def state_dict(self):
            return {"weight": torch.zeros(8)}

        def save_pretrained(self, folder):
            self.meanwhile()  # the other process finishes while this one writes
            (Path(folder) / "config.json").write_text("mine")
            (Path(folder) / "model.safetensors").write_bytes(b"mine")

    cached = tmp_path / "quantized" / "key"

    def theirs():
        cached.mkdir(parents=True)
        (cached / "config.json").write_text("theirs")

    models._keep_quantized(Quantized(theirs), cached)
    assert (cached / "config.json").read_text() == "theirs" and not (cached / "model.safetensors").exists()
    assert [p.name for p in cached.parent.iterdir()] == ["key"]
    models._keep_quantized(Quantized(lambda: pytest.fail("written again")), cached)
    broken = tmp_path / "quantized" / "broken"
    broken.mkdir()
    (broken / "leftover").write_text("")
    with pytest.raises(OSError):
        models._keep_quantized(Quantized(), broken)
    assert sorted(p.name for p in cached.parent.iterdir()) == ["broken", "key"]
    fresh = tmp_path / "quantized" / "fresh"
    models._keep_quantized(Quantized(), fresh)
    assert (fresh / "config.json").read_text() == "mine"


def test_only_local_rank_0_quantizes_the_others_read_its_copy(tiny_model, tmp_path):
    """train.fsdp_loading cpu with several processes: local rank 0 quantizes (with all the cores) and keeps the
    base; the others wait for it and read it back, the same bytes, without quantizing. When rank 0 cannot keep it
    (the disk is short) it says so to the others, and each quantizes itself."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    def run(case: str) -> list[dict]:
        env = {**os.environ, "LORAPIPE_CACHE": str(tmp_path / case / "cache")}
        env.pop("LORAPIPE_QUANTIZED_CACHE", None)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(Path(__file__).parent / "quantized_wait.py"), str(tiny_model),
                               str(tmp_path / case / "out"), case], capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((tmp_path / case / f"out-{r}.json").read_text()) for r in (0, 1)]

    zero, one = run("kept")
    assert zero["quantized"] > 0 and one["quantized"] == 0
    assert (zero["codes"], zero["absmax"]) == (one["codes"], one["absmax"])
    assert zero["base"] == one["base"] == str(tiny_model)
    zero, one = run("short")
    assert zero["quantized"] > 0 and one["quantized"] > 0 and zero["codes"] == one["codes"]
    assert not list((tmp_path / "short" / "cache" / "quantized").glob("*/config.json"))
