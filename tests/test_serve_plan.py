"""The vLLM flags are derived from the adapters; what vLLM cannot serve is refused before a server starts."""

import json
import shutil
import signal
import socket

import pytest
import torch
from adapters import run_with_adapter, tiny_gpt2, tiny_llama

from lorapipe import gate, layout, serve
from lorapipe.errors import UserError
from lorapipe.models import cpu_has_bf16


def copy_run(src, dst, **adapter_changes):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    p = dst / "adapter" / "adapter_config.json"
    acfg = json.loads(p.read_text())
    acfg.update(adapter_changes)
    p.write_text(json.dumps(acfg))
    return dst


def test_flags_come_from_the_adapters(tiny_run, tmp_path):
    other = copy_run(tiny_run, tmp_path / "second", r=12)
    p = serve.plan([tiny_run, other], {"serve.port": 8123})
    assert p.max_lora_rank == 16  # r=8 and r=12 -> vLLM's bucket 16
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in cmd
    mods = cmd[cmd.index("--lora-modules") + 1:][:2]
    assert mods == [f"tiny={(tiny_run / 'adapter').resolve()}", f"second={(other / 'adapter').resolve()}"]
    assert cmd[cmd.index("--chat-template") + 1].endswith("chat_template.jinja")
    assert cmd[cmd.index("--port") + 1] == "8123"
    kw = serve.engine_kwargs(p)
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and kw["model"] == p.base
    # the same dtype and compile choice on both paths: on CPU eager, float32 unless the CPU computes bf16 natively
    assert cmd[cmd.index("--dtype") + 1] == kw["dtype"] and ("--enforce-eager" in cmd) == kw["enforce_eager"]
    if not torch.cuda.is_available():
        assert kw["enforce_eager"] and kw["dtype"] == ("auto" if cpu_has_bf16() else "float32")
    forced = serve.plan([tiny_run], {"serve.dtype": "bfloat16", "serve.enforce_eager": False})
    assert serve.engine_kwargs(forced)["dtype"] == "bfloat16" and "--enforce-eager" not in serve.server_command(forced)


@pytest.mark.parametrize("case, lora, match", [
    ("modules_to_save", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("dora", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}, "DoRA"),
    ("huge_rank", {"target_modules": ["q_proj"], "r": 1024}, "above vLLM's maximum 512"),
])
def test_refuses_what_vllm_lora_cannot_load(case, lora, match, tiny_run, tiny_model, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / case, tiny_llama(tokenizer_dir=tiny_model), lora)
    with pytest.raises(UserError, match=match) as e:
        serve.plan([run])
    assert f"lorapipe serve {run} --merged" in str(e.value)  # says what to do instead


def test_refuses_adapter_for_another_base(tiny_run, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / "other", tiny_llama(hidden=32), {"target_modules": ["q_proj"]})
    with pytest.raises(UserError, match=r"trained for another base model \(model.layers.0.self_attn.q_proj takes 64"):
        serve.plan([run])


def test_refuses_targets_the_base_does_not_have(tiny_run, tmp_path):
    run = run_with_adapter(tiny_run, tmp_path / "gpt2", tiny_gpt2(), {"target_modules": ["c_attn"]})
    with pytest.raises(UserError, match="targets modules the base does not have: c_attn"):
        serve.plan([run])


def test_refuses_added_tokens(tiny_run, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = tiny_llama(tokenizer_dir=tiny_model)
    model.resize_token_embeddings(len(tok))
    run = run_with_adapter(tiny_run, tmp_path / "added", model, {"target_modules": ["q_proj"]}, tokenizer=tok)
    with pytest.raises(UserError, match="added tokens"):
        serve.plan([run])


def test_merged_mode_serves_the_merged_model(tiny_run, tmp_path):
    from lorapipe import merge

    with pytest.raises(UserError, match="has no merged model"):
        serve.plan([copy_run(tiny_run, tmp_path / "unmerged")], merged=True)
    merge.run(tiny_run, overwrite=True)
    p = serve.plan([tiny_run], merged=True)
    cmd = serve.server_command(p)
    assert "--enable-lora" not in cmd and cmd[cmd.index("--model") + 1] == str((tiny_run / "merged").resolve())
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny"


def test_refuses_runs_on_different_bases(tiny_run, tiny_model, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model, other_base)
    other = copy_run(tiny_run, tmp_path / "other")
    cfg = (other / "config.yaml").read_text().replace(str(tiny_model), str(other_base))
    (other / "config.yaml").write_text(cfg)
    with pytest.raises(UserError, match="different base models"):
        serve.plan([tiny_run, other])


def test_refuses_mixed_templates_and_duplicate_names(tiny_run, tmp_path):
    other = copy_run(tiny_run, tmp_path / "x" / "tiny")
    with pytest.raises(UserError, match="share a name"):
        serve.plan([tiny_run, other])
    alp = copy_run(tiny_run, tmp_path / "alp")
    (alp / "adapter" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(UserError, match="different prompt templates"):
        serve.plan([tiny_run, alp])


def test_lora_settings_come_from_the_adapters(tiny_run, tmp_path):
    """LoRA only on the modules the adapters train, as many adapters per batch as are served, and runtime adds."""
    second = copy_run(tiny_run, tmp_path / "second")
    p = serve.plan([tiny_run, second])
    assert p.target_modules == sorted(gate.adapter_targets(tiny_run / "adapter")) == ["k_proj", "o_proj", "q_proj",
                                                                                     "v_proj"]
    assert (p.max_loras, p.max_cpu_loras) == (2, 2)
    kw = serve.engine_kwargs(p)
    assert kw["lora_target_modules"] == p.target_modules and kw["max_loras"] == 2 and kw["max_cpu_loras"] == 2
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--lora-target-modules") + 1:][:4] == p.target_modules
    assert "--middleware" not in cmd and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in serve._env(p)
    grow = serve.plan([tiny_run], {"serve.add_from": str(tmp_path)})
    assert (grow.max_loras, grow.max_cpu_loras) == (8, 33) and grow.add_from == [tmp_path.resolve()]
    assert "lorapipe.gate.RunGate" in serve.server_command(grow)
    assert serve._env(grow)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    with pytest.raises(UserError, match="serve.add_from: .* is not a folder"):
        serve.plan([tiny_run], {"serve.add_from": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="max_cpu_loras"):
        serve.plan([tiny_run], {"serve.max_loras": 4, "serve.max_cpu_loras": 2})


def _verified(run, dtype, passed=True):
    from lorapipe import merge

    if not (run / "merged").exists():
        merge.run(run)
    (run / "verify.json").write_text(json.dumps({"paths": {"vllm_merged": {"dtype": dtype, "passed": passed,
                                                                           "agreement": 0.5}}}))


def test_route_serves_a_verified_merged_model_at_base_speed(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "one")
    lora = serve.route([run])
    assert lora.adapters and "has no merged model" in lora.notes[-1]
    dtype = lora.dtype
    _verified(run, dtype)
    p = serve.route([run])
    assert p.merged_from == run and not p.adapters and p.routes() == [("one", f"merged weights {p.base}")]
    assert "the base model is not served" in p.notes[-1] and p.dtype == dtype
    assert serve.route([run], {"serve.path": "lora"}).adapters  # asked for: base + adapter
    assert serve.route([run], {"serve.add_from": str(tmp_path)}).adapters  # runs may be added: LoRA
    assert serve.route([run, copy_run(tiny_run, tmp_path / "two")]).adapters  # several runs share one base
    _verified(run, "float16" if dtype != "float16" else "bfloat16")
    assert "no verdict on its merged model through vLLM at" in serve.route([run]).notes[-1]
    _verified(run, dtype, passed=False)
    assert "unfaithful" in serve.route([run]).notes[-1]
    _verified(run, dtype)
    (run / "adapter" / "adapter_model.safetensors").touch()
    import os
    import time

    os.utime(run / "verify.json", (time.time() - 60, time.time() - 60))
    assert "older than its weights" in serve.route([run]).notes[-1]


def test_gate_admits_runs_under_the_folders_with_the_start_checks(tiny_run, tiny_model, tmp_path):
    pool = tmp_path / "pool"
    good = copy_run(tiny_run, pool / "good")
    p = serve.plan([tiny_run], {"serve.add_from": str(pool)})
    plan = serve.plan_record(p)
    req = gate.admit(plan, {"lora_name": "good"}, tmp_path)
    assert req == {"lora_name": "good", "lora_path": str((good / "adapter").resolve())}
    assert gate.admit(plan, {"lora_name": "g2", "lora_path": "pool/good/adapter"}, tmp_path)["lora_path"] == \
        req["lora_path"]
    cases = [({"lora_name": "x", "lora_path": str(tiny_run)}, "not inside a folder this server takes runs from"),
             ({"lora_name": "missing"}, "no run named 'missing'"), ({"lora_path": str(good)}, "give lora_name")]
    wide = run_with_adapter(tiny_run, pool / "wide", tiny_llama(tokenizer_dir=tiny_model),
                            {"target_modules": ["q_proj", "up_proj"], "r": 8})
    cases.append(({"lora_name": wide.name}, "trains LoRA on up_proj, and this server applies LoRA to"))
    big = run_with_adapter(tiny_run, pool / "big", tiny_llama(tokenizer_dir=tiny_model),
                           {"target_modules": ["q_proj"], "r": 12})
    cases.append(({"lora_name": big.name}, "rank 12 is above this server's max_lora_rank 8"))
    other = copy_run(tiny_run, pool / "other")
    (other / "adapter" / "chat_template.jinja").write_text("{{ messages }}")
    cases.append(({"lora_name": "other"}, "another prompt template"))
    dora = run_with_adapter(tiny_run, pool / "dora", tiny_llama(tokenizer_dir=tiny_model),
                            {"target_modules": ["q_proj"], "r": 8, "use_dora": True})
    cases.append(({"lora_name": dora.name}, "DoRA"))
    (pool / "notarun").mkdir()
    cases.append(({"lora_name": "notarun"}, "not a lorapipe run directory"))
    for body, match in cases:
        with pytest.raises(gate.Refused, match=match):
            gate.admit(plan, body, tmp_path)


def test_refuses_a_taken_port_and_a_gpu_without_the_memory(tiny_run, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = serve.plan([tiny_run], {"serve.port": s.getsockname()[1]})
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1:.*Pick another with --serve.port"):
            serve.check_port(p)

    class Nvml:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return type("Info", (), {"free": 40 * 2**30, "total": 140 * 2**30})

    monkeypatch.setattr(layout, "nvml_device", lambda i=0: (Nvml, None))
    with pytest.raises(UserError, match=r"GPU 0 has 40.0 of 140.0 GiB free.*--serve.gpu_memory_utilization 0.26"):
        layout.check_free(p)


def test_generate_refuses_a_prompt_longer_than_the_engine_takes(tiny_run, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text('{"prompt": "short"}\n' + json.dumps({"prompt": "def f(x): return x " * 400}) + "\n")
    with pytest.raises(UserError, match=r"long.jsonl:2: the prompt has \d+ tokens, and the engine takes 256 \(serve.max_model_len"):
        serve.generate(tiny_run, str(prompts), {"serve.max_model_len": 256})


def test_serving_beyond_loopback_needs_a_key_that_stays_out_of_files(tiny_run, monkeypatch):
    from lorapipe.config import dump_config, load_config

    monkeypatch.delenv("LORAPIPE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    wide = serve.plan([tiny_run], {"serve.host": "0.0.0.0"})
    with pytest.raises(UserError, match="serve.host 0.0.0.0 is reachable from other machines, and the server has no"):
        serve.check_auth(wide)
    serve.check_auth(serve.plan([tiny_run], {"serve.host": "0.0.0.0", "serve.allow_unauthenticated": True}))
    serve.check_auth(serve.plan([tiny_run], {"serve.host": "::1"}))  # loopback needs no key
    assert "VLLM_API_KEY" not in serve._env(wide)
    monkeypatch.setenv("LORAPIPE_API_KEY", "k-from-env")
    keyed = serve.plan([tiny_run], {"serve.host": "0.0.0.0"})
    serve.check_auth(keyed)
    assert serve._env(keyed)["VLLM_API_KEY"] == "k-from-env"
    assert "k-from-env" not in " ".join(serve.server_command(keyed)) + json.dumps(serve.plan_record(keyed))
    assert serve.api_key(serve.plan([tiny_run], {"serve.api_key": "k-flag"}).serve) == "k-flag"  # the flag wins
    assert "k-flag" not in dump_config(load_config(None, {"serve.api_key": "k-flag"}))  # never in config.yaml


def test_parallel_layouts_reach_vllm_and_bad_ones_stop_before_loading(tiny_run, monkeypatch):
    """serve.tensor_parallel_size / data_parallel_size become vLLM's own flags; a layout vLLM would fail on after
    loading (too few GPUs, heads that do not split, data parallelism in an offline stage) is refused first."""
    p = serve.plan([tiny_run], {"serve.tensor_parallel_size": 2, "serve.data_parallel_size": 2})
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--data-parallel-size") + 1] == "2"
    assert serve.engine_kwargs(p)["tensor_parallel_size"] == 2
    assert serve.plan_record(p)["data_parallel_size"] == 2
    one = serve.plan([tiny_run])
    assert "--tensor-parallel-size" not in serve.server_command(one) and "tensor_parallel_size" not in \
        serve.engine_kwargs(one)
    layout.check(one, offline=True)  # one GPU (or none): nothing to refuse
    with pytest.raises(UserError, match="offline stages .* run one vLLM engine"):
        layout.check(p, offline=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    with pytest.raises(UserError, match="needs 4 GPUs, and 3 are visible"):
        layout.check(p, offline=False)
    base_cfg = json.loads((serve.Path(p.base) / "config.json").read_text())
    assert base_cfg["num_attention_heads"] % 3  # the tiny Llama's heads do not split in 3
    with pytest.raises(UserError, match="do not split evenly across that many GPUs"):
        layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 3}), offline=False)
    layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 2}), offline=False)  # 2 of 3 GPUs


def test_cpu_parallel_layouts_need_a_numa_node_per_worker(tiny_run, monkeypatch):
    """On CPU vLLM binds each worker to its own NUMA node's cores: with fewer nodes than tensor x data parallel
    workers the layout is refused before loading (data parallel engines would share cores; measured slower), unless
    the user binds cores by hand (VLLM_CPU_OMP_THREADS_BIND)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    nodes = layout.cpu_nodes()
    assert nodes and all(isinstance(n, int) for n in nodes)  # this Linux machine's Mems_allowed_list
    dp2 = serve.plan([tiny_run], {"serve.data_parallel_size": 2})
    monkeypatch.setattr(layout, "cpu_nodes", lambda: [0])
    with pytest.raises(UserError, match=r"data_parallel_size 2: on CPU, vLLM gives each of the 2 workers the cores "
                                        r"of its own NUMA node, and this machine has 1"):
        layout.check(dp2, offline=False)
    layout.check(serve.plan([tiny_run]), offline=False)  # one engine: nothing to refuse
    monkeypatch.setattr(layout, "cpu_nodes", lambda: [0, 1])
    layout.check(dp2, offline=False)  # two nodes: one engine on each
    monkeypatch.setattr(layout, "cpu_nodes", lambda: [0])
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    layout.check(dp2, offline=False)  # bound by hand: the user's choice


def test_a_ray_cluster_spans_machines_and_its_gpus_are_counted(tiny_run, monkeypatch):
    """serve.ray_cluster: vLLM's Ray backends as flags (server) and engine arguments (offline); the GPU count a
    layout needs is the cluster's, asked of Ray, not this machine's; no Ray, no cluster, or a CPU: said before
    loading."""
    import sys
    import types

    p = serve.plan([tiny_run], {"serve.tensor_parallel_size": 2, "serve.data_parallel_size": 2,
                                "serve.ray_cluster": True})
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "ray"
    assert cmd[cmd.index("--data-parallel-backend") + 1] == "ray"
    assert serve.engine_kwargs(p)["distributed_executor_backend"] == "ray" and serve.plan_record(p)["ray_cluster"]
    plain = serve.plan([tiny_run], {"serve.tensor_parallel_size": 2})
    assert "--distributed-executor-backend" not in serve.server_command(plain)
    assert "distributed_executor_backend" not in serve.engine_kwargs(plain)
    one_engine = serve.plan([tiny_run], {"serve.tensor_parallel_size": 2, "serve.ray_cluster": True})
    assert "--data-parallel-backend" not in serve.server_command(one_engine)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="vLLM-cpu does not run on Ray"):
        layout.check(p, offline=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(layout, "nvml_device", lambda i=0: None)  # GPU sizes unknown: no fit judgement
    with pytest.raises(UserError, match="needs 4 GPUs, and 1 is visible .* --serve.ray_cluster true"):
        layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 2, "serve.data_parallel_size": 2}),
                     offline=False)
    monkeypatch.setattr(layout, "ray_gpus", lambda: 4)
    layout.check(p, offline=False)  # 4 GPUs in the cluster, 1 here: Ray places them
    monkeypatch.setattr(layout, "ray_gpus", lambda: 2)
    with pytest.raises(UserError, match="needs 4 GPUs, and the Ray cluster has 2"):
        layout.check(p, offline=False)

    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    with pytest.raises(UserError, match="Ray is not installed; `pip install ray`"):
        layout.ray_gpus()
    calls = []

    def ray_init(**kw):  # as Ray's does, first thing: SIGTERM then exits at once, past lorapipe's clean stop
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        calls.append(kw)
        if kw.get("fail"):
            raise ConnectionError("Could not find any running Ray instance")

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    try:
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=lambda **kw: ray_init(fail=True, **kw)))
        with pytest.raises(UserError, match="no running Ray cluster found .* `ray start --head`"):
            layout.ray_gpus()
        assert signal.getsignal(signal.SIGTERM) is ours
        fake = types.SimpleNamespace(init=ray_init, cluster_resources=lambda: {"GPU": 16.0},
                                     shutdown=lambda: calls.append("shutdown"))
        monkeypatch.setitem(sys.modules, "ray", fake)
        assert layout.ray_gpus() == 16 and calls[-2]["address"] == "auto" and calls[-1] == "shutdown"
        assert signal.getsignal(signal.SIGTERM) is ours  # `lorapipe serve` still stops vLLM cleanly on SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)

    with socket.socket() as s:  # a port nothing listens on: a cluster that was stopped
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    calls.clear()
    with pytest.raises(UserError, match=f"the Ray cluster at 127.0.0.1:{port} does not answer"):
        layout.ray_gpus()  # said at once: Ray itself would wait minutes for it
    assert not calls


def test_bench_serve_has_a_ray_row(tiny_run, tmp_path):
    """`lorapipe bench serve --rows online,online-ray`: the same online work through vLLM's Ray executor, on
    lorapipe's own plan, so the Ray checks come before any engine starts (here, without a GPU cluster: refused)."""
    from lorapipe import bench_serve as bs

    assert "online-ray" in bs.ROWS and "online-ray" not in bs.OFFLINE
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="serve.ray_cluster: "):
        bs.online_rows([tiny_run], "unused", bs.default_work(False, tiny=True), tmp_path, port, "online-ray")
    assert not (tmp_path / "serve.log").exists()  # nothing started


def test_the_engine_needs_its_weights_one_sequence_and_its_lora_slots(tiny_run, tmp_path):
    """layout.need counts, from headers alone, what vLLM allocates at the least: every weight at the serving dtype,
    one max_model_len sequence's keys and values in every layer, and max_loras adapter slots at the rank bucket."""
    from safetensors.torch import load_file

    p = serve.plan([tiny_run], {"serve.max_loras": 3})
    n = layout.need(p, 256)
    size = 4 if p.dtype == "float32" else 2
    base = serve.Path(p.base)
    assert n.weights == sum(t.numel() for f in base.glob("*.safetensors") for t in load_file(f).values()) * size
    c = json.loads((base / "config.json").read_text())
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    assert n.kv == 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * size * 256
    lora = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    r = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())["r"]
    assert n.lora == sum(t.numel() for t in lora.values()) // r * p.max_lora_rank * 3 * size
    assert n.per_gpu(2) == (n.weights + n.kv + n.lora) / 2
    bare = serve.plan([tiny_run])
    bare.adapters = []  # as a merged model is served: no LoRA slots
    assert layout.need(bare, 256).lora == 0 and layout.need(bare, 256).weights == n.weights
    quantized = copy_run(tiny_run, tmp_path / "q")  # a base whose packed tensors are not its bytes: no judgement
    qbase = tmp_path / "qbase"
    shutil.copytree(base, qbase)
    cq = json.loads((qbase / "config.json").read_text())
    (qbase / "config.json").write_text(json.dumps({**cq, "quantization_config": {"quant_method": "gptq"}}))
    pq = serve.plan([quantized])
    pq.base = str(qbase)
    assert layout.need(pq, 256) is None


def test_tensor_parallel_unset_takes_the_fewest_gpus_that_hold_the_model(tiny_run, monkeypatch):
    """serve.tensor_parallel_size unset: 1 GPU when the model fits one (within gpu_memory_utilization), else the
    fewest visible GPUs whose heads split and that hold it; a named size or a machine that cannot hold the model is
    refused before vLLM loads, with what would work."""
    plain = serve.plan([tiny_run])
    need = layout.need(plain, serve.max_model_len(plain)).per_gpu(1)  # 1,024: the model's positions
    total = {"now": 0.0}

    class Nvml:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return type("Info", (), {"free": total["now"], "total": total["now"]})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(layout, "nvml_device", lambda i=0: (Nvml, None))

    total["now"] = need / 0.9 * 10  # fits one GPU many times over
    p = serve.plan([tiny_run])
    layout.check(p, offline=True)
    assert p.serve.tensor_parallel_size == 1 and "tensor_parallel_size" not in serve.engine_kwargs(p)

    total["now"] = need / 0.9 / 1.5  # two GPUs hold it, one does not
    p = serve.plan([tiny_run])
    layout.check(p, offline=False)
    assert p.serve.tensor_parallel_size == 2 and serve.engine_kwargs(p)["tensor_parallel_size"] == 2
    cmd = serve.server_command(p)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and serve.plan_record(p)["tensor_parallel_size"] == 2
    assert any("split over 2 GPUs" in note for note in p.notes)
    with pytest.raises(UserError, match=r"needs at least .* GiB per GPU split over 1 \(weights .* GiB in .*KV cache"
                       r".*LoRA slots for 1 adapter of rank 8.*Use --serve.tensor_parallel_size 2"):
        layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 1}), offline=True)
    p = serve.plan([tiny_run], {"serve.data_parallel_size": 2})  # two engines, each split over 2 of the 4 GPUs
    layout.check(p, offline=False)
    assert p.serve.tensor_parallel_size == 2

    total["now"] = need / 0.9 / 5  # 4 GPUs are not enough, and the heads split no further
    with pytest.raises(UserError, match=r"split over 4 .*Use .*larger GPUs"):
        layout.check(serve.plan([tiny_run]), offline=True)

    total["now"] = need / 0.9 * 1.2  # one GPU holds it at 0.9, not at the 0.3 asked for
    with pytest.raises(UserError, match=r"split over 1 .*Use --serve.tensor_parallel_size 4 or "
                       r"--serve.gpu_memory_utilization 0.77"):
        layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 1, "serve.gpu_memory_utilization": 0.3}),
                     offline=True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: vLLM-cpu has no GPUs to split over
    p = serve.plan([tiny_run])
    layout.check(p, offline=True)
    assert p.serve.tensor_parallel_size == 1


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP", "SIGTERM"])
def test_serve_stops_cleanly_on_interrupt_hangup_and_terminate(tiny_run, monkeypatch, sig):
    """serve.serve turns SIGINT, SIGHUP and SIGTERM into one clean stop: the server's context exits (which stops
    vLLM), and the previous handlers come back. The real server under SIGTERM and SIGKILL: test_integration."""
    import contextlib
    import os
    import signal
    import threading

    events = []

    class Proc:
        def poll(self):
            return None

    @contextlib.contextmanager
    def fake_running(p, log_path):
        events.append("started")
        try:
            yield serve.Server("http://127.0.0.1:1", ["tiny"], Proc(), log_path)
        finally:
            events.append("stopped")

    monkeypatch.setattr(serve, "running", fake_running)
    signum = getattr(signal, sig)
    before = signal.getsignal(signum)
    threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()
    serve.serve([tiny_run], {"serve.path": "lora"}, on_ready=lambda s, p: events.append("ready"))
    assert events == ["started", "ready", "stopped"]
    assert signal.getsignal(signum) == before


def test_preflight_says_before_training_when_vllm_will_not_hold_the_model(tiny_model, monkeypatch, caplog):
    """`lorapipe run` trains, then verifies, evaluates and serves through vLLM: a model no layout of the visible GPUs
    holds is said before training (a warning: the adapter is still worth training), not at verify hours later."""
    import logging

    from lorapipe import preflight
    from lorapipe.config import load_config

    cfg = load_config(None, {"name": "t", "model.name_or_path": str(tiny_model)})
    bare = serve.Plan(str(tiny_model), "t", [], None, 0, cfg.serve, dtype="bfloat16")
    total = layout.need(bare, serve.max_model_len(bare)).per_gpu(1) / 0.9 / 1.5  # one GPU short, two enough

    class Nvml:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return type("Info", (), {"free": 0, "total": total})  # the GPUs are busy: not preflight's concern

        @staticmethod
        def nvmlDeviceGetCudaComputeCapability(handle):
            return (9, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(serve, "has_vllm", lambda: True)
    monkeypatch.setattr(layout, "nvml_device", lambda i=0: (Nvml, None))
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        preflight._warn_if_unservable(cfg, str(tiny_model))
    assert "after training, vLLM (verify, eval, serve) will not start on these GPUs: the model needs at least" in \
        caplog.text and "2 such GPUs per engine (1 is visible)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two hold it: the unset size will take both
    with caplog.at_level(logging.WARNING, logger="lorapipe.preflight"):
        preflight._warn_if_unservable(cfg, str(tiny_model))
    assert "after training" not in caplog.text


def test_a_busy_gpu_names_the_visible_ones_with_room(tiny_run, monkeypatch):
    """On a shared machine (training on GPU 0, say), the refusal of a busy GPU names the visible GPUs that have the
    share vLLM is set to take, as CUDA_VISIBLE_DEVICES would name them."""
    free = {0: 10, 1: 20, 2: 130}  # GiB free of 140, by visible index

    class Nvml:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return type("Info", (), {"free": free[handle] * 2**30, "total": 140 * 2**30})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(layout, "nvml_device", lambda i=0: (Nvml, i))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    p = serve.plan([tiny_run])
    with pytest.raises(UserError, match=r"GPU 0 has 10.0 of 140.0 GiB free.*--serve.gpu_memory_utilization 0.05, or "
                       r"use GPUs that have room: CUDA_VISIBLE_DEVICES=6$"):
        layout.check(p, offline=True)
    two = serve.plan([tiny_run], {"serve.tensor_parallel_size": 2})  # one GPU with room is not enough for two
    with pytest.raises(UserError, match=r"--serve.gpu_memory_utilization 0.05$"):
        layout.check(two, offline=True)
    free[1] = 140
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(UserError, match=r"CUDA_VISIBLE_DEVICES=1,2$"):
        layout.check(serve.plan([tiny_run], {"serve.tensor_parallel_size": 2}), offline=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    plain = serve.plan([tiny_run])
    total = layout.need(plain, serve.max_model_len(plain)).per_gpu(1) * 2  # holds the model at 0.9 when free

    class Small:
        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return type("Info", (), {"free": total * 0.2, "total": total})

    monkeypatch.setattr(layout, "nvml_device", lambda i=0: (Small, i))
    with pytest.raises(UserError, match=r"free the GPU \(the model needs at least .* GiB of it\)$"):  # no share
        layout.check(plain, offline=True)  # of what is free would hold it: no --serve.gpu_memory_utilization offered
