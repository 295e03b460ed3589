from pathlib import Path

import pytest

from lorapipe.config import DEFAULT_TARGETS, RunCfg, load_config
from lorapipe.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "lorapipe" / "assets" / "configs"


def test_defaults_are_the_tutorial_recipe():
    cfg = RunCfg()
    assert (cfg.quant.load_in_4bit, cfg.quant.quant_type, cfg.quant.double_quant) == (True, "nf4", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == DEFAULT_TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = cfg.train
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 4, 4)
    assert t.num_train_epochs == 1 and t.warmup_ratio > 0


def test_yaml_plus_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 8\ndata:\n  max_length: 128\n")
    cfg = load_config(p, {"lora.r": 32, "lora.target_modules": "all-linear", "quant.double_quant": False})
    assert cfg.lora.r == 32 and cfg.lora.target_modules == "all-linear" and cfg.quant.double_quant is False
    assert cfg.data.max_length == 128
    assert cfg.name == "c"  # the run is named after the config file


def test_unknown_field_names_file_line_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name_or_path: x/y\nlora:\n  r: 8\n  alpah: 16\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:5" in msg and "lora.alpah" in msg and "did you mean 'lora.alpha'" in msg


def test_bad_value_names_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 0\n")
    with pytest.raises(UserError, match=r"c.yaml:2: lora.r: Input should be greater than 0"):
        load_config(p)


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 8\n  alpha: [16\n")
    with pytest.raises(UserError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_target_modules_rejected():
    with pytest.raises(UserError, match="lora.target_modules"):
        load_config(None, {"lora.target_modules": []})


def test_tutorial_config_reproduces_the_tutorial():
    cfg = load_config(CONFIGS / "tutorial.yaml")
    assert cfg.model.name_or_path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.data.source == "iamtarun/python_code_instructions_18k_alpaca"
    assert cfg.data.split == "train[:2000]" and cfg.data.template == "tutorial"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 32, 0.05, DEFAULT_TARGETS)
    assert (cfg.quant.quant_type, cfg.quant.double_quant) == ("nf4", True)
    assert cfg.train.optim == "paged_adamw_32bit"
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (4, 4)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lorapipe ") and path.name in first
    load_config(path)
