"""Bad input: one clear message naming the file (and line) and the field, exit code 2, no traceback, nothing written."""

import json
import subprocess
import sys

import pytest

from lorapipe.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorapipe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


def test_unknown_field_in_yaml(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rank: 8\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml:2: unknown field 'lora.rank'" in err and "Traceback" not in err


def test_unknown_flag_suggests(capsys):
    assert main(["train", "--lora.rr", "3"]) == 2
    assert "did you mean --lora.r?" in capsys.readouterr().err


def test_malformed_data_line_exits_2_and_writes_nothing(tmp_path, tiny_model):
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json}\n")
    r = run_cli("train", "--model.name_or_path", str(tiny_model), "--data.source", str(bad),
                "--output_dir", str(tmp_path / "runs"), "--name", "x")
    assert r.returncode == 2, r.stderr
    assert f"error: {bad}:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "x").exists()


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "train", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["merge", str(tmp_path)]) == 2
    assert "not a lorapipe run directory" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "merge", "compare", "eval", "verify", "generate", "serve", "demo",
                                  "config", "bench"])
def test_help_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    if verb == "train":
        assert "--lora.r" in out and "LoRA rank" in out  # field docs are the help text


def test_preflight_verb_writes_report_and_exits_1_on_a_problem(tiny_model, tmp_path, capsys):
    args = ["preflight", "--model.name_or_path", str(tiny_model), "--data.max_examples", "8", "--name", "pf",
            "--output_dir", str(tmp_path)]
    assert main(args + ["--data.max_length", "256"]) == 0
    out = capsys.readouterr().out
    assert "# Preflight" in out and "loss on the response" in out and "⟦" in out
    report = json.loads((tmp_path / "pf.preflight" / "preflight.json").read_text())
    assert report["examples"] == 8 and report["problems"] == []
    assert main(args + ["--data.max_length", "16"]) == 1  # every response cut away
    assert "PROBLEM" in capsys.readouterr().out


def test_fsdp_without_gpus_exits_2_before_any_process_starts(tiny_model, tmp_path):
    """train.fsdp on a machine without GPUs: accelerate would silently train data-parallel instead. Refused by the
    launching parent, before torchrun starts and before any model loads; one process is refused too."""
    for procs in ("2", "1"):
        r = run_cli("train", "--model.name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "runs"),
                    "--name", "x", "--train.fsdp", "true", "--train.processes", procs)
        assert r.returncode == 2, r.stderr
        assert "error: train.fsdp: FSDP shards the model over GPUs" in r.stderr and "Traceback" not in r.stderr
        assert "processes (torchrun" not in r.stdout
    assert not (tmp_path / "runs" / "x").exists()
