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
