"""Crash safety: a run killed mid-training resumes to the same result as one never interrupted; bad resumes refuse.

The end-to-end test drives real `lorapipe train` processes (SIGKILL, then SIGTERM, then a resume to the end) and
compares per-step losses and the final adapter with an uninterrupted run of the same config and seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorapipe import checkpoint, train
from lorapipe.errors import UserError

STEPS = 48


def _config(tmp_path: Path, tiny_model: Path, name: str) -> Path:
    cfg = {"name": name, "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": str(tiny_model)},
           "data": {"max_examples": 2 * STEPS, "max_length": 256},
           "train": {"max_steps": STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "gradient_checkpointing": False, "save_steps": 4}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorapipe", "-q", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"training ended before the test could stop it: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for training to progress"
        time.sleep(0.005)


def _steps(run: Path) -> dict[int, float]:
    """step -> loss from the run's per-step log; each step must appear once."""
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len({s for s, _ in losses}) == len(losses), "a step was logged twice"
    return dict(losses)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tiny_model, tmp_path):
    ref = _train(_config(tmp_path, tiny_model, "ref"))
    config = _config(tmp_path, tiny_model, "crash")
    partial = tmp_path / "runs" / "crash.incomplete"
    logs = partial / "logs"

    # 1. SIGKILL once checkpoint-8 is sealed: no handler runs, whatever was being written stays half-written.
    proc = _train(config)
    _wait_for(lambda: (logs / "checkpoint-8" / checkpoint.MANIFEST).is_file(), proc)
    proc.kill()
    proc.wait()
    assert partial.is_dir() and not (tmp_path / "runs" / "crash").exists()
    killed_at = max(_steps(partial))

    # 2. Resume, then SIGTERM a few steps later: a checkpoint at the step boundary, exit 143, the resume command.
    proc = _train(config)
    _wait_for(lambda: (logs / "metrics.jsonl").is_file() and max(_steps(partial), default=0) >= 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"resume with: lorapipe train {partial / 'config.yaml'}" in err
    stopped = checkpoint.last_trusted(logs)
    assert stopped is not None and checkpoint._step(stopped) >= 20
    assert checkpoint._step(stopped) == max(_steps(partial)), "the stop checkpoint is the last step logged"

    # 3. Resume to the end.
    proc = _train(config)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed at step" in out
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err

    run, ref_run = tmp_path / "runs" / "crash", tmp_path / "runs" / "ref"
    assert not partial.exists() and not list((run / "logs").glob("checkpoint-*"))
    got, want = _steps(run), _steps(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert killed_at < STEPS
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
    a, b = _adapter(run), _adapter(ref_run)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k


@pytest.fixture()
def interrupted(tiny_cfg, monkeypatch):
    """An in-progress run that crashed after sealing its checkpoints at steps 2 and 4 (of 6)."""
    seal = checkpoint.seal

    def seal_then_crash(ckpt):
        seal(ckpt)
        if checkpoint._step(ckpt) == 4:
            raise RuntimeError("simulated crash after a checkpoint")

    monkeypatch.setattr(checkpoint, "seal", seal_then_crash)
    make = lambda **kw: tiny_cfg(name="t", **{"train.max_steps": 6, "train.save_steps": 2, **kw})  # noqa: E731
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(make())
    monkeypatch.setattr(checkpoint, "seal", seal)
    folder = checkpoint.in_progress(make().run_dir())
    assert [p.name for p in checkpoint.checkpoints(folder / "logs")] == ["checkpoint-4", "checkpoint-2"]
    return make, folder


def test_changed_config_is_refused_and_nothing_deleted(interrupted):
    make, folder = interrupted
    with pytest.raises(UserError, match=r"lora\.r: 16 in the run, 8 now[\s\S]*--restart"):
        train.run(make(**{"lora.r": 8}))
    with pytest.raises(UserError, match=r"data\.max_examples"):
        train.run(make(**{"data.max_examples": 6}))
    assert len(checkpoint.checkpoints(folder / "logs")) == 2


def test_corrupt_checkpoint_is_refused_and_restart_starts_over(interrupted):
    make, folder = interrupted
    opt = folder / "logs" / "checkpoint-4" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoint-4: corrupt checkpoint \(optimizer\.pt is 100 bytes.*"
                                        r"--restart.*delete .*checkpoint-4 to resume from checkpoint-2"):
        train.run(make())
    assert opt.stat().st_size == 100
    r = train.run(make(), restart=True)
    assert r.steps == 6 and r.metrics["resumed_from_step"] is None and not folder.exists()


def test_other_versions_are_refused(interrupted):
    make, folder = interrupted
    progress = json.loads((folder / checkpoint.PROGRESS).read_text())
    progress["versions"]["transformers"] = "4.0.0"
    (folder / checkpoint.PROGRESS).write_text(json.dumps(progress))
    with pytest.raises(UserError, match=r"other versions \(transformers 4\.0\.0 -> "):
        train.run(make())


def test_a_save_cut_short_is_discarded_and_resume_uses_the_one_before(interrupted):
    make, folder = interrupted
    (folder / "logs" / "checkpoint-4" / checkpoint.MANIFEST).unlink()  # as if killed before sealing
    r = train.run(make())
    assert r.metrics["resumed_from_step"] == 2 and r.steps == 6
    assert sorted(_steps(r.run_dir)) == list(range(1, 7))


def test_changed_data_file_is_refused(tiny_cfg, tmp_path, monkeypatch):
    from lorapipe.data import DEFAULT_TRAIN

    data = tmp_path / "d.jsonl"
    lines = DEFAULT_TRAIN.read_text().splitlines()[:8]
    data.write_text("\n".join(lines) + "\n")
    make = lambda: tiny_cfg(name="d", **{"data.source": str(data), "train.save_steps": 1})  # noqa: E731
    monkeypatch.setattr(checkpoint, "finish", lambda folder: (_ for _ in ()).throw(RuntimeError("crash at the end")))
    with pytest.raises(RuntimeError):
        train.run(make())
    monkeypatch.undo()
    first = json.loads(lines[0])
    first["output"] += "\n# changed"
    data.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    with pytest.raises(UserError, match="the training data changed"):
        train.run(make())


def _step_end(saver: checkpoint.Checkpoints, step: int, max_steps: int = 100) -> bool:
    from transformers import TrainerControl, TrainerState

    control = TrainerControl()
    saver.on_step_end(None, TrainerState(global_step=step, max_steps=max_steps), control)
    return control.should_save


def test_default_cadence_is_a_tenth_of_the_run_but_not_within_a_minute(monkeypatch):
    from transformers import TrainerControl, TrainerState

    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    saver = checkpoint.Checkpoints(None, 0)
    saver.on_train_begin(None, TrainerState(max_steps=100), TrainerControl())
    clock[0] += 5
    assert not _step_end(saver, 10)  # a tenth of the run, 5 s in: too soon
    clock[0] += 56
    assert not _step_end(saver, 15)  # a minute in, but not a tenth
    assert _step_end(saver, 20)
    saver.last = clock[0]  # saved
    clock[0] += 30
    assert not _step_end(saver, 30) and not _step_end(saver, 100)  # the last step: the run's end saves the adapter

    explicit = checkpoint.Checkpoints(10, 0)  # asked for: every 10 steps, however soon
    explicit.on_train_begin(None, TrainerState(max_steps=100), TrainerControl())
    assert _step_end(explicit, 10) and not _step_end(explicit, 11)
    explicit.signal = signal.SIGTERM  # a stop saves at once
    assert _step_end(explicit, 11)


def test_a_save_is_sealed_beside_training_and_its_failure_is_raised(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    saver = checkpoint.Checkpoints(None, 0)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(global_step=3, max_steps=10)
    saver.on_save(args, state, TrainerControl())
    saver.on_train_end(args, state, TrainerControl())  # waits
    assert saver.sealing is None and checkpoint.last_trusted(tmp_path) == ckpt

    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "seal", full)
    saver.on_save(args, state, TrainerControl())
    with pytest.raises(OSError, match="No space left"):
        saver.wait()
    saver.wait()  # raised once


def test_an_unset_train_processes_matches_what_it_meant_when_the_run_was_trained(tiny_cfg):
    """Unset, train.processes is 1, or FSDP over the GPUs preflight chose where one GPU could not hold the run: a run
    saved with 1 (the old default) or unset resumes; a finished scaled-out run counts as the same config for `lorapipe
    run`; an interrupted FSDP run, whose sharded checkpoints resume only sharded, does not, nor does a changed field."""
    from lorapipe.checkpoint import config_changes

    cfg = tiny_cfg()
    saved = cfg.model_dump(mode="json")
    for recorded in (None, 1):
        saved["train"]["processes"] = recorded
        assert config_changes(saved, cfg) == [] and config_changes(saved, cfg, finished=True) == []
    saved["train"].update(processes=2, fsdp=True)  # what train._scale_out ran
    assert config_changes(saved, cfg, finished=True) == []
    assert config_changes(saved, cfg) == ["train.fsdp: True in the run, False now",
                                          "train.processes: 2 in the run, None now"]
    saved["train"].update(processes=2, fsdp=False)  # data-parallel, chosen by the user
    assert config_changes(saved, cfg, finished=True) == ["train.processes: 2 in the run, None now"]
    assert config_changes(saved, tiny_cfg(**{"train.processes": 2})) == []
