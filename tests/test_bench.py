"""`lorapipe bench train --tiny` on CPU: both paths run on the same data and agree on the first step's loss."""

import pytest


@pytest.mark.slow
def test_tutorial_and_speed_paths_agree_on_first_step_loss(tmp_path):
    from lorapipe import bench

    rows = bench.train_bench(["tiny"], ["tutorial", "speed"], 2, tmp_path)
    tut, fast = rows
    assert tut["setting"] == "tutorial" and fast["setting"] == "speed"
    assert len(tut["losses"]) == len(fast["losses"]) == 2
    assert abs(tut["losses"][0] - fast["losses"][0]) / tut["losses"][0] < 0.01
    assert tut["tokens_per_s"] > 0 and fast["speedup"] > 0


@pytest.mark.slow
def test_warm_run_starts_where_the_first_did(tmp_path):
    """--warm times a second run from the same adapter and seed: it repeats the first run's losses exactly."""
    from lorapipe import bench

    (cold,) = bench.train_bench(["tiny"], ["speed"], 3, tmp_path / "cold")
    (warm,) = bench.train_bench(["tiny"], ["speed"], 3, tmp_path / "warm", warm=True)
    assert warm["warm"] is True and warm["run_s"] > 0 and warm["run_tokens_per_s"] > 0
    assert len(warm["step_s"]) == 3 and warm["losses"] == pytest.approx(cold["losses"], rel=1e-5)


def test_e2e_effective_batch_is_set_for_every_setting(tmp_path):
    """`bench train --e2e --batch 32`: the config every setting trains from has that effective batch, in micro-batches
    of 4 where they divide it (each mode then lays it out as it would a user's)."""
    import yaml

    from lorapipe import bench_e2e

    for batch, layout in ((32, (4, 8)), (6, (6, 1)), (None, (4, 4))):
        cfg = yaml.safe_load(bench_e2e.setup("tiny", tmp_path, 8, batch=batch).read_text())
        assert (cfg["train"]["per_device_train_batch_size"], cfg["train"]["gradient_accumulation_steps"]) == layout


def test_e2e_lengths_and_unset_processes(tmp_path):
    """`--lengths 600-700`: the data's examples are that long and data.max_length holds them (none truncated); the
    default range keeps its data file and max_length. A setting without `:N` leaves train.processes unset, as a user
    does; `:N` sets it."""
    import json
    from pathlib import Path

    import yaml

    from lorapipe import bench_e2e
    from lorapipe.errors import UserError

    cfg = yaml.safe_load(bench_e2e.setup("tiny", tmp_path, 8, lengths=bench_e2e.parse_lengths("600-700")).read_text())
    rows = [json.loads(line) for line in Path(cfg["data"]["source"]).read_text().splitlines()]
    words = [len((r["prompt"] + r["completion"]).split()) for r in rows]
    assert len(rows) == 8 and min(words) >= 599 and max(words) <= 699 and cfg["data"]["max_length"] == 701
    default = yaml.safe_load(bench_e2e.setup("tiny", tmp_path, 8).read_text())
    assert default["data"]["max_length"] == 512 and default["data"]["source"].endswith("data-tiny-8.jsonl")
    for bad in ("4095-3000", "3000", "a-b", "4-8"):
        with pytest.raises(UserError, match="--lengths: cannot read"):
            bench_e2e.parse_lengths(bad)
    with pytest.raises(UserError, match="shipped data"):
        bench_e2e.setup("smollm2-135m", tmp_path, 8, lengths=(100, 200))
    assert bench_e2e.parse_setting("auto")[1] == {"train.mode": "auto"}
    assert bench_e2e.parse_setting("memory:2")[1] == {"train.mode": "memory", "train.processes": "2"}


@pytest.mark.slow
def test_e2e_runs_the_cli_per_setting_and_counts_real_tokens_alike(tmp_path, capsys):
    """`bench train --e2e` runs `lorapipe train` itself per setting: the padded tutorial batches and the padding-free
    speed batches see the same data, so they count the same real tokens (padding is not a token) and log the same
    losses; the whole command's wall time holds the time before, in and after the loop."""
    from lorapipe import bench_e2e
    from lorapipe.errors import UserError

    with pytest.raises(UserError, match="MODE\\[\\+graphs\\|\\+fsdp\\|\\+fsdp-cpu\\]\\[:PROCESSES\\]"):
        bench_e2e.run("tiny", ["tutorial", "fast:x"], 16, tmp_path)  # refused before anything runs
    assert not (tmp_path / "runs").exists()
    assert bench_e2e.parse_setting("speed+graphs:2")[1] == {"train.mode": "speed", "train.processes": "2",
                                                            "train.cuda_graphs": "true"}
    assert bench_e2e.parse_setting("memory+fsdp:2")[1] == {"train.mode": "memory", "train.processes": "2",
                                                           "train.fsdp": "true"}
    assert bench_e2e.parse_setting("memory+fsdp-cpu:2")[1] == {"train.mode": "memory", "train.processes": "2",
                                                               "train.fsdp": "true", "train.fsdp_loading": "cpu"}
    rows = bench_e2e.run("tiny", ["tutorial", "speed"], 16, tmp_path)
    tut, fast = rows
    assert "error" not in tut and "error" not in fast, rows
    assert (tut["mode"], tut["layout"], fast["mode"], fast["layout"]) == ("tutorial", "4x4", "speed", "16x1")
    assert tut["steps"] == fast["steps"] == 1 and tut["processes"] == fast["processes"] == 1  # unset: one process
    assert tut["tokens"] == fast["tokens"] > 16 * 64  # 16 examples of at least 64 tokens, no padding counted
    assert fast["loss_diff_pct"] < 1.0
    for r in rows:
        assert r["wall_s"] >= r["before_loop_s"] + r["loop_s"] > 0 and r["first_step_s"] <= r["loop_s"]
        parts = r["before_loop_parts"]  # where the time before the loop went, in order, adding up to it
        assert list(parts) == ["start", "imports", "preflight", "load", "lora", "prepare", "trainer"]
        assert min(parts.values()) >= 0 and sum(parts.values()) <= r["before_loop_s"] + 0.5
        assert (tmp_path / "runs" / f"e2e-{r['setting']}" / "adapter").is_dir()
    bench_e2e.print_table(rows)
    out = capsys.readouterr().out
    assert "end to end" in out and "tutorial: before the loop start" in out


def test_a_sparse_shape_writes_no_mlp_bytes_and_loads_like_real_weights(tmp_path):
    """The Llama-3-70B shape's bf16 weights (141 GB) do not fit the GPU machine's disk, so bench writes its MLP
    weights as holes in sparse files: they take no disk blocks and read back as zeros; the attention weights are
    random as written; the 4-bit load quantizes the zeros without NaNs, and LoRA on q/k/v/o gets a gradient."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorapipe import bench, models
    from lorapipe.config import ModelCfg, QuantCfg

    assert "llama3-70b" in bench.SPARSE and bench.SHAPES["llama3-70b"][:3] == (8192, 28672, 80)
    out = bench._sparse_model_dir((64, 4096, 2, 4, 2, 640), tmp_path / "m")
    layer = out / "model-layer-001.safetensors"
    mlp_bytes = 3 * 64 * 4096 * 2
    assert layer.stat().st_size > mlp_bytes > 8 * layer.stat().st_blocks * 512
    written = load_file(layer)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert not model.model.layers[1].mlp.up_proj.weight.any()
    assert not written["model.layers.1.mlp.down_proj.weight"].any()
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, written["model.layers.1.self_attn.q_proj.weight"]) and 0.015 < q.float().std() < 0.025
    path = str(out)
    four = models.load_model(path, ModelCfg(name_or_path=path), QuantCfg(), torch.bfloat16)
    lora = get_peft_model(four, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ids = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 8]])
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
