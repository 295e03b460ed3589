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


def test_a_disk_too_small_for_the_merged_model_is_refused_before_writing(run_copy, monkeypatch, capsys):
    """A 70B merge writes 280 GB in float32: where the run's disk cannot take it, merge says how much it needs and
    that --dtype auto halves it, before writing anything (not when the disk fills minutes in); the CLI exits 2."""
    import shutil
    from collections import namedtuple

    from lorapipe.cli import main

    shutil.rmtree(run_copy / "merged", ignore_errors=True)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lorapipe.merge.shutil.disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match=r"merge: the merged model in float32 \(0\.\dM parameters\) needs about "
                                        r"0\.0 GiB and .* has 0\.0 GiB free\. Free space there$"):
        merge.run(run_copy)  # the tiny base is float32 itself: nothing smaller to suggest
    assert main(["merge", str(run_copy)]) == 2 and "GiB free" in capsys.readouterr().err
    assert not (run_copy / "merged").exists() and not list(run_copy.glob(".merged.tmp-*"))
    with pytest.raises(UserError, match=r"\(70\.0B parameters\) needs about 263\.4 GiB .* or pass --dtype auto "
                                        r"\(the base's bfloat16: about 131\.7 GiB"):
        merge.check_disk(run_copy, 70 * 10**9, torch.float32, torch.bfloat16)


def test_merge_streams_the_base_shard_by_shard_to_what_peft_merges(run_copy, tiny_model, tmp_path, monkeypatch):
    """The merge reads the base one safetensors shard at a time (never the whole model: an 8B base is 32 GB in
    float32, 70B 280 GB), and writes what PEFT's merge_and_unload gives, tensor for tensor: for a sharded base, in
    float32 and in the base's dtype, and with rsLoRA's scaling. What the plain formula does not cover (per-module
    ranks here) is merged in memory by PEFT, as before."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorapipe import models
    from lorapipe.runs import load_run

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model / name).is_file():
            (sharded / name).write_bytes((tiny_model / name).read_bytes())
    cfg = (run_copy / "config.yaml").read_text().replace(str(tiny_model), str(sharded))
    (run_copy / "config.yaml").write_text(cfg)
    assert load_run(run_copy).model.name_or_path == str(sharded)
    adapter = run_copy / "adapter"

    def merged_tensors(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            out.update(load_file(f))
        return out

    def peft_merged(dtype):  # what PEFT's merge_and_unload and save_pretrained write, as before
        out = tmp_path / f"peft-{dtype}-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        merge._merge_in_memory(str(sharded), load_run(run_copy), adapter, dtype, out)
        return merged_tensors(out)

    expected, expected_bf16 = peft_merged(torch.float32), peft_merged(torch.bfloat16)
    monkeypatch.setattr("lorapipe.merge.load_model", lambda *a, **k: pytest.fail("the whole base was loaded"))
    r = merge.run(run_copy, overwrite=True)
    assert json.loads((r.merged_dir / "lorapipe_merge.json").read_text())["how"].startswith("streamed")
    assert (r.merged_dir / "model.safetensors.index.json").is_file()
    got = merged_tensors(r.merged_dir)
    assert set(got) == set(expected) and all(got[k].dtype == torch.float32 for k in got)
    changed = [k for k in got if not torch.equal(got[k], load_file_any(sharded, k).float())]
    assert changed and all(torch.allclose(got[k], expected[k], atol=1e-7, rtol=0) for k in got), changed[:3]
    before = got
    r = merge.run(run_copy, dtype="auto", overwrite=True)
    got = merged_tensors(r.merged_dir)
    assert r.dtype == "bfloat16" and all(torch.equal(got[k], expected_bf16[k]) for k in expected_bf16)
    loaded = AutoModelForCausalLM.from_pretrained(r.merged_dir)
    assert loaded.dtype == torch.bfloat16

    acfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**acfg, "use_rslora": True}))
    got = merged_tensors(merge.run(run_copy, overwrite=True).merged_dir)
    monkeypatch.setattr("lorapipe.merge.load_model", models.load_model)
    expected = peft_merged(torch.float32)
    assert any(not torch.equal(got[k], before[k]) for k in got)  # rsLoRA scales the delta otherwise
    assert all(torch.allclose(got[k], expected[k], atol=1e-7, rtol=0) for k in expected)

    target = next(iter(acfg["target_modules"]))
    (adapter / "adapter_config.json").write_text(json.dumps({**acfg, "rank_pattern": {target: acfg["r"]}}))
    r = merge.run(run_copy, overwrite=True)
    assert json.loads((r.merged_dir / "lorapipe_merge.json").read_text())["how"].startswith("in memory")


def load_file_any(folder, key):
    from safetensors import safe_open

    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            if key in s.keys():
                return s.get_tensor(key)
    raise KeyError(key)


def test_safetensors_written_a_tensor_at_a_time_read_back_as_given(tmp_path):
    """runs.write_safetensors (the merge's and bench's sparse shapes' writer): every dtype it names, a scalar, an
    empty tensor and a hole read back through safetensors itself as written (the hole as zeros); a tensor that does
    not match its declared dtype or shape is refused."""
    from safetensors.torch import load_file

    from lorapipe.runs import SAFETENSORS_DTYPES, write_safetensors

    tensors = {f"t.{name}": (torch.arange(12).reshape(3, 4) % 3).to(getattr(torch, name))
               for name in SAFETENSORS_DTYPES.values()}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} | {"hole": (torch.bfloat16, (5, 7))}
    write_safetensors(tmp_path / "a.safetensors", specs, tensors.get)
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(specs) and all(torch.equal(back[k], t) and back[k].dtype == t.dtype
                                           for k, t in tensors.items())
    assert back["hole"].dtype == torch.bfloat16 and back["hole"].shape == (5, 7) and not back["hole"].any()
    with pytest.raises(ValueError, match="given for"):
        write_safetensors(tmp_path / "b.safetensors", {"x": (torch.float32, (2,))}, lambda k: torch.zeros(3))


def test_a_hub_base_streams_from_the_hub_cache_offline(run_copy, tiny_model, tmp_path, monkeypatch):
    """A run trained on a Hub id merges from the Hub cache, where training's from_pretrained put the weights, with
    no network (the tests run with HF_HUB_OFFLINE=1): only the files from_pretrained reads are asked for, so a second
    copy of the weights in the repo (Mistral's consolidated.safetensors) is not fetched, nor its absence held against
    the cached copy. A cache that lacks a listed shard falls back to PEFT's merge, which says what is missing."""
    import json
    import shutil
    from fnmatch import fnmatch

    import huggingface_hub
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from lorapipe.runs import load_run

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = (run_copy / "config.yaml").read_text().replace(str(tiny_model), "org/tiny")
    (run_copy / "config.yaml").write_text(cfg)
    asked = []
    real = huggingface_hub.snapshot_download

    def snapshot_download(*args, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("lorapipe.merge.load_model", lambda *a, **k: pytest.fail("the whole base was loaded"))
    r = merge.run(run_copy)
    assert json.loads((r.merged_dir / "lorapipe_merge.json").read_text())["how"].startswith("streamed")
    assert asked and not any(fnmatch("consolidated.safetensors", p) for p in asked[0])
    weights = load_file(r.merged_dir / "model.safetensors")
    assert set(weights) == set(load_file(snapshot / "model.safetensors"))

    (snapshot / "model.safetensors").rename(snapshot / "model-00001-of-00002.safetensors")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    assert merge._streaming_plan("org/tiny", load_run(run_copy).model, run_copy / "adapter") is None
