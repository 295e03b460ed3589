"""GGUF export through the gguf library: the file loads back with transformers' GGUF loader, with the same
tokenizer ids and chat template, and its greedy tokens follow the merged model's; bad input is refused."""


import pytest

from lorapipe import export, merge
from lorapipe.cli import main
from lorapipe.errors import UserError


def test_export_refuses_what_it_cannot_write(run_copy, tmp_path):
    with pytest.raises(UserError, match="has no merged model; run `lorapipe merge"):
        export.run(run_copy, pre="gpt2")
    merge.run(run_copy)
    with pytest.raises(UserError, match="--gguf-pre"):  # a base that did not come from a GGUF
        export.run(run_copy)
    with pytest.raises(UserError, match="only gguf"):
        export.run(run_copy, fmt="onnx")
    assert main(["export", str(run_copy)]) == 2
    assert not (run_copy / "export").exists() or not list((run_copy / "export").iterdir())  # nothing half-written


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_export_loads_back_and_follows_the_merged_model(run_copy, outtype):
    merge.run(run_copy)
    r = export.run(run_copy, outtype=outtype, pre="gpt2")
    assert r.path == run_copy / "export" / f"tiny-{outtype}.gguf" and r.size_bytes > 0
    assert not list(r.path.parent.glob(".*tmp*"))
    c = export.check(run_copy, r.path, n_prompts=8, max_tokens=16)
    assert c["tokenizer_equal"] == 1.0 and c["chat_template_equal"]  # the training template travels
    assert c["agreement"] >= (0.95 if outtype == "f16" else 0.8), c  # random tiny weights: near-ties flip
    assert (r.path.parent / f"{r.path.name}.verify.json").is_file()


def test_export_writes_a_sharded_merged_model_tensor_by_tensor(run_copy, monkeypatch):
    """merged/ in several safetensors files (as a merged 8B is): the GGUF is planned from their headers and
    written one tensor at a time (never all of them held, as GGUFWriter.add_tensor would), and loads back."""
    import gguf
    from transformers import AutoModelForCausalLM

    merge.run(run_copy)
    merged = run_copy / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    for f in merged.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(merged, max_shard_size="60KB")
    assert len(list(merged.glob("*.safetensors"))) > 3
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda *a, **k: pytest.fail("a tensor held until the end"))
    r = export.run(run_copy, pre="gpt2")
    reader = gguf.GGUFReader(str(r.path))
    assert len(reader.tensors) == r.tensors == sum(1 for k in model.state_dict() if k != "lm_head.weight")
    c = export.check(run_copy, r.path, n_prompts=4, max_tokens=8)
    assert c["agreement"] >= 0.95 and c["tokenizer_equal"] == 1.0, c


def test_export_refuses_a_disk_too_small_before_writing(run_copy, monkeypatch, capsys):
    from collections import namedtuple

    merge.run(run_copy)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lorapipe.export.shutil.disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match=r"GGUF needs about .* GiB free.*--outtype q8_0"):
        export.run(run_copy, pre="gpt2")
    assert not list((run_copy / "export").iterdir())  # not a byte written
    assert main(["export", str(run_copy), "--gguf-pre", "gpt2"]) == 2
    assert "Free space there" in capsys.readouterr().err


def test_export_says_up_front_when_the_check_cannot_fit(run_copy, monkeypatch, capsys):
    merge.run(run_copy)
    monkeypatch.setattr("lorapipe.preflight.available_ram_gib", lambda: 1e-6)  # as a 70B model on a 128 GB machine
    assert "CPU memory has" in export.check_short(run_copy)
    assert main(["export", str(run_copy), "--gguf-pre", "gpt2"]) == 2
    assert "Pass --no-check" in capsys.readouterr().err
    assert not (run_copy / "export").exists()  # refused before writing
    assert main(["export", str(run_copy), "--gguf-pre", "gpt2", "--no-check"]) == 0
    assert (run_copy / "export" / "tiny-f16.gguf").is_file()
