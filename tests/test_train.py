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


def test_fsdp_adapter_is_written_as_peft_writes_it_through_checkpoint_wrappers(tiny_model, tmp_path):
    """An FSDP run's adapter: FSDP's activation checkpointing wraps every decoder layer, which renames the LoRA
    weights (`layers.0._checkpoint_wrapped_module.self_attn...`), and PEFT's save_pretrained, given the gathered
    weights, then wrote none of them (seen on 2 H200s). lorapipe gathers and writes them itself: the same file, keys,
    values and config as PEFT writes for the unwrapped model."""
    import functools

    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from safetensors.torch import load_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lorapipe.config import RunCfg

    cfg = RunCfg.model_validate({"model": {"name_or_path": str(tiny_model)}})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, train._lora_config(cfg, base))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # not the zeros they start at, so that values are compared too
    model.save_pretrained(tmp_path / "peft")
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper),
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        weights = train._gather_adapter(model)
    finally:
        if started:
            dist.destroy_process_group()
    train._save_adapter(model, weights, tmp_path / "ours")
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(got) == sorted(want) and len(want) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cw, cg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    cw["target_modules"], cg["target_modules"] = sorted(cw["target_modules"]), sorted(cg["target_modules"])
    assert cg == cw


def test_cuda_out_of_memory_says_where_and_what_fits(tiny_cfg, monkeypatch, capsys):
    """CUDA's out-of-memory error, while loading or at a step, becomes one message (exit code 2) that says where it
    happened, preflight's estimate, and what fits; the in-progress folder stays. Under torchrun every process that
    meets it says so (the GPU that filled may not be rank 0's), unlike a bad input, said once per machine."""
    from types import SimpleNamespace

    import torch
    import trl

    from lorapipe import cli, preflight
    from lorapipe.errors import OutOfMemory

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=24 * 2**30))
    real_prepare = preflight.prepare

    def prepare(cfg):  # a GPU's figures in the CPU run's preflight
        prep = real_prepare(cfg)
        prep.estimate.update(total=30.0, gpu_free=23.5)
        prep.alternatives = lambda: preflight.Fit("--train.mode memory (9.0 GiB)")
        return prep

    monkeypatch.setattr(preflight, "prepare", prepare)
    calls = []
    real_step = trl.SFTTrainer.training_step

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *a, **k)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", step)
    cfg = tiny_cfg(name="oom")
    with pytest.raises(OutOfMemory) as exc:
        train.run(cfg)
    msg = str(exc.value)
    assert msg.startswith("CUDA out of memory at step 2 of 2 (GPU 0: 24.0 GiB, 23.5 free before loading; preflight "
                          "estimated 30.0 GiB for the ") and "What fits by preflight's estimate: --train.mode memory " \
        "(9.0 GiB)." in msg and "--restart" in msg and "oom.incomplete" in msg, msg
    assert (cfg.run_dir().parent / "oom.incomplete" / "INCOMPLETE").is_file() and not cfg.run_dir().exists()

    def load(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "load_model", load)
    with pytest.raises(OutOfMemory, match="^CUDA out of memory while loading the base "):
        train.run(tiny_cfg(name="oom2"))

    def refuse(error):
        def run(*a, **k):
            raise error
        return run

    monkeypatch.setenv("LOCAL_RANK", "1")  # a second process on this machine
    monkeypatch.setattr(train, "run", refuse(OutOfMemory("CUDA out of memory at step 7 of 9")))
    assert cli.main(["train", "--name", "x"]) == 2
    assert "error: CUDA out of memory at step 7 of 9" in capsys.readouterr().err
    monkeypatch.setattr(train, "run", refuse(UserError("data.source: no such file")))
    assert cli.main(["train", "--name", "x"]) == 2
    assert "data.source" not in capsys.readouterr().err  # rank 0 of the machine says it


def test_a_run_one_gpu_cannot_hold_trains_fsdp_over_the_gpus_preflight_named(tiny_cfg, monkeypatch, capsys):
    """train.run with preflight's scale-out (an unset train.processes, a run that fits FSDP over visible GPUs and
    not one): no model is loaded here; the same run is launched FSDP-sharded over those GPUs (lorapipe.launch, as
    `--train.processes N --train.fsdp true` would), and its result read back; a failed launch keeps its exit code."""
    import json

    from lorapipe import cli, launch, preflight
    from lorapipe.errors import Stopped

    real_prepare = preflight.prepare

    def prepare(cfg):
        prep = real_prepare(cfg)
        prep.report["scale_out"] = {"processes": 2, "why": "memory: the estimated peak is 30.0 GiB per GPU (...)"}
        return prep

    launched = []

    def start(cfg, n, overwrite=False, force=False, restart=False):
        launched.append((cfg, n, overwrite, force, restart))
        cfg.run_dir().mkdir(parents=True)
        (cfg.run_dir() / "metrics.json").write_text(json.dumps({"train_loss": 1.5, "steps": 2, "runtime_s": 3.0,
                                                                "processes": n}))
        return rc["code"]

    def load(*a, **k):
        raise AssertionError("the launching process loads no model")

    rc = {"code": 0}
    monkeypatch.setattr(preflight, "prepare", prepare)
    monkeypatch.setattr(launch, "train", start)
    monkeypatch.setattr(train, "load_model", load)
    cfg = tiny_cfg(name="wide")
    r = train.run(cfg, restart=True)
    (wide, n, overwrite, force, restart), = launched
    assert (n, wide.train.processes, wide.train.fsdp, overwrite, force, restart) == (2, 2, True, False, False, True)
    assert wide.name == cfg.name and cfg.train.processes is None and not cfg.train.fsdp  # the caller's cfg unchanged
    assert r.relaunched and (r.run_dir, r.train_loss, r.steps, r.metrics["processes"]) == (cfg.run_dir(), 1.5, 2, 2)
    assert not (cfg.run_dir().parent / "wide.incomplete").exists()
    capsys.readouterr()
    assert cli.main(["train", "--name", "wide2", "--output_dir", str(cfg.output_dir), "--model.name_or_path",
                     cfg.model.name_or_path, "--data.max_examples", "8", "--train.max_steps", "2"]) == 0
    assert "trained" not in capsys.readouterr().out  # rank 0 of the launched processes said it
    rc["code"] = 143
    with pytest.raises(Stopped, match="training in 2 FSDP-sharded processes exited with code 143") as exc:
        train.run(tiny_cfg(name="wide3"))
    assert exc.value.code == 143
