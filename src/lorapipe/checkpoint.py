"""Crash-safe training: the in-progress folder, checkpoints resume can trust, and stopping on a signal.

A run trains in `runs/<name>.incomplete/` (its INCOMPLETE file says so and how to go on). transformers' Trainer
writes checkpoints into its `logs/checkpoint-N/`: adapter, optimizer, scheduler, RNG states, and the trainer state,
which holds the data position. A checkpoint is trusted only once lorapipe has flushed every file of it to disk and
then written `lorapipe-checkpoint.json` beside them (each file's size and sha256): a crash while a checkpoint is
being written leaves one without that manifest, which resume discards. The Trainer keeps the last two checkpoints,
so a crash in the middle of a save still leaves the one before it whole. Sealing (fsync, hashing) runs beside the
next steps and is waited for before the next save, so that one still finds the one before it sealed.

By default a checkpoint is saved every tenth of the run, but not within a minute of the last: each save stops every
process (about 0.3 s for a Llama-3-8B adapter and its optimizer state on an H200 host, 4.6 s once while the disk was
still writing out a freshly saved model), and saving every tenth made a 22-second loop 19-45 % longer.

Resume refuses, with what differs and how to start over, a run whose config (model, quantization, LoRA, data,
training), training data, or library versions changed since it began, and a checkpoint whose files no longer match
its manifest. It deletes nothing; `--restart` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from lorapipe import __version__
from lorapipe.config import RunCfg, dump_config
from lorapipe.errors import UserError
from lorapipe.runs import write_json, write_text

log = logging.getLogger(__name__)

MANIFEST = "lorapipe-checkpoint.json"
PROGRESS = "progress.json"
FORMAT = 1
# Sections that decide what is trained; within them, fields that may change on resume (they only say when to log,
# evaluate or save).
SECTIONS = ("model", "quant", "lora", "data", "train")
FREE = {"train.save_steps", "train.save_minutes", "train.logging_steps", "train.eval_steps", "train.report_to",
        "train.fsdp_loading"}  # where the base is quantized: the same 4-bit codes either way
PACKAGES = ("torch", "transformers", "peft", "trl")


def in_progress(run_dir: Path) -> Path:
    return Path(run_dir).with_name(Path(run_dir).name + ".incomplete")


def resume_command(folder: Path) -> str:
    return f"lorapipe train {folder / 'config.yaml'}"


@dataclass
class Resume:
    folder: Path
    checkpoint: Path | None  # None: training starts at step 0
    step: int
    tokens: int = 0  # input tokens seen before the resume point


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"lorapipe": __version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 of the tokenized training rows: changed data (or tokenizer, template, max_length) changes it."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()


def prepare(cfg: RunCfg, data_sha: str, restart: bool) -> Resume:
    """The in-progress folder to train in: a new one, or an interrupted one checked and ready to resume."""
    folder = in_progress(cfg.run_dir())
    if folder.exists() and restart:
        log.info("--restart: removing %s", folder)
        shutil.rmtree(folder)
    if not folder.exists():
        (folder / "logs").mkdir(parents=True)
        write_text(folder / "config.yaml", dump_config(cfg))
        write_json(folder / PROGRESS, {"format": FORMAT, "state": "training", "versions": versions(),
                                       "data_sha256": data_sha, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_text(folder / "INCOMPLETE", f"This run is training, or was stopped before it finished.\n"
                   f"Resume it from its last checkpoint:  {resume_command(folder)}\n"
                   f"Start over (deletes this folder):     add --restart\n")
        return Resume(folder, None, 0)
    _check_same(folder, cfg, data_sha)
    ckpt = last_trusted(folder / "logs")
    _truncate_log(folder / "logs" / "metrics.jsonl", _step(ckpt) if ckpt else 0)
    if not ckpt:
        log.info("%s has no complete checkpoint yet: training starts again at step 0", folder)
        return Resume(folder, None, 0)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    log.info("resuming %s from %s (step %d of %s)", folder, ckpt.name, _step(ckpt), state.get("max_steps"))
    return Resume(folder, ckpt, _step(ckpt), int(state.get("num_input_tokens_seen") or 0))


def training_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide what is trained, as dotted names."""
    return {f"{s}.{k}": v for s in SECTIONS for k, v in (cfg.get(s) or {}).items() if f"{s}.{k}" not in FREE}


def config_changes(old_cfg: dict[str, Any], cfg: RunCfg, finished: bool = False) -> list[str]:
    """The training fields in which a run's saved config differs from `cfg` (an unresolved data.format 'auto'
    matches the format train resolved).

    An unset train.processes matches 1 (its meaning, and the default before it could be unset). For a `finished`
    run it also matches the FSDP layout train chose where one GPU could not hold the run (train._scale_out): `lorapipe
    run` again skips that training. An interrupted FSDP run does not match it: its sharded checkpoints resume only
    in the FSDP layout, which the same preflight chooses again (the processes then compare their own config)."""
    old, new = training_fields(old_cfg), training_fields(cfg.model_dump(mode="json"))
    if new.get("data.format") == "auto":
        new["data.format"] = old.get("data.format")
    if new.get("train.processes") is None:
        scaled = finished and bool(old.get("train.fsdp")) and (old.get("train.processes") or 1) > 1
        if scaled or old.get("train.processes") in (None, 1):
            new["train.processes"] = old.get("train.processes")
        if scaled:
            new["train.fsdp"] = old.get("train.fsdp")
    return [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _check_same(folder: Path, cfg: RunCfg, data_sha: str) -> None:
    how = f"resume with what it was started with, or pass --restart to start over (deletes {folder})"
    progress_path = folder / PROGRESS
    try:
        progress = json.loads(progress_path.read_text())
        old_cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{folder}: exists but is not a readable lorapipe in-progress run (no valid {PROGRESS} and "
                        f"config.yaml); move it away, or pass --restart to replace it") from None
    if progress.get("format") != FORMAT:
        raise UserError(f"{progress_path}: written by another lorapipe version (format {progress.get('format')}, "
                        f"this one reads {FORMAT}); pass --restart to start over (deletes {folder})")
    was, now = progress.get("versions", {}), versions()
    diff = [f"{k} {was.get(k)} -> {now.get(k)}" for k in now if was.get(k) != now.get(k)]
    if diff:
        raise UserError(f"{progress_path}: the run began under other versions ({', '.join(diff)}), and its "
                        f"checkpoints may not load the same way; {how}")
    changed = config_changes(old_cfg, cfg)
    if changed:
        raise UserError(f"{folder / 'config.yaml'}: the config changed since this run began:\n    "
                        + "\n    ".join(changed) + f"\n  {how}")
    if progress.get("data_sha256") != data_sha:
        raise UserError(f"{progress_path}: the training data changed since this run began (the tokenized rows "
                        f"differ: a changed file, tokenizer or template); {how}")


def _step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[1])


def checkpoints(logs: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in logs.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=_step, reverse=True)


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(ckpt: Path) -> None:
    """Flush a finished checkpoint to disk, then write its manifest: from now on resume may trust it."""
    files = {}
    for p in _files(ckpt):
        with p.open("rb") as f:
            os.fsync(f.fileno())
        files[str(p.relative_to(ckpt))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    write_json(ckpt / MANIFEST, {"step": _step(ckpt), "files": files})
    fd = os.open(ckpt, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_trusted(logs: Path) -> Path | None:
    """The newest sealed checkpoint whose files match its manifest; unsealed ones (a save cut short) are removed."""
    for ckpt in checkpoints(logs):
        mark = ckpt / MANIFEST
        if not mark.is_file():
            log.warning("%s: its save was cut short (no %s); discarding it", ckpt, MANIFEST)
            shutil.rmtree(ckpt)
            continue
        try:
            files = json.loads(mark.read_text())["files"]
        except (OSError, ValueError, KeyError):
            files = None
        problem = "its manifest is unreadable" if files is None else None
        for rel, want in (files or {}).items():
            p = ckpt / rel
            if not p.is_file():
                problem = f"{rel} is missing"
            elif p.stat().st_size != want["bytes"]:
                problem = f"{rel} is {p.stat().st_size} bytes, the manifest says {want['bytes']}"
            elif sha256_file(p) != want["sha256"]:
                problem = f"{rel} does not match its sha256 in the manifest"
            if problem:
                break
        if problem:
            older = [c.name for c in checkpoints(logs) if _step(c) < _step(ckpt)]
            alt = f", or delete {ckpt} to resume from {older[0]}" if older else ""
            raise UserError(f"{ckpt}: corrupt checkpoint ({problem}); pass --restart to start over (deletes "
                            f"{logs.parent}){alt}")
        return ckpt
    return None


def _truncate_log(path: Path, step: int) -> None:
    """Keep the per-step log up to the resume point: the steps after it are trained again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in keep))


def finish(folder: Path) -> None:
    """Drop what only resume needed (checkpoints, progress, the INCOMPLETE note) before the run is renamed."""
    for ckpt in checkpoints(folder / "logs"):
        shutil.rmtree(ckpt)
    for name in (PROGRESS, "INCOMPLETE"):
        (folder / name).unlink(missing_ok=True)


# the default cadence (save_steps unset) skips a tenth-of-the-run save this soon after the last one
MIN_GAP_S = 60.0


class Checkpoints(TrainerCallback):
    """When to save (every `save_steps`; by default every tenth of the run, at most once a minute; and every
    `save_minutes`), seal each save, and stop at the next step boundary, saved, once SIGTERM or SIGINT arrived (the
    way preemptible machines, SLURM and Ctrl-C stop a job). A second Ctrl-C stops at once."""

    def __init__(self, save_steps: int | None, save_minutes: float):
        self.dtypes: dict[str, torch.dtype] = {}
        self.save_steps = save_steps
        self.save_minutes = save_minutes
        self.every = 1
        self.last = time.monotonic()
        self.signal: int | None = None
        self.sealing: threading.Thread | None = None
        self.seal_error: BaseException | None = None
        self.group = None  # the processes' host-side (gloo) group for agreeing on saves and stops

    def keep_dtypes(self, model) -> None:
        """TRL keeps a QLoRA adapter in bf16, but the Trainer's resume reloads it through PEFT, which upcasts it to
        float32: the resumed run would train at another precision than the run it continues. The dtypes are
        recorded here and restored in on_train_begin (after the reload, before the first step)."""
        self.dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}

    @contextmanager
    def signals(self) -> Iterator[None]:
        def on_signal(signum, frame) -> None:
            if self.signal is not None and signal.SIGINT in (signum, self.signal):
                # Ctrl-C again. With several processes torchrun's agent passes a second Ctrl-C on as SIGTERM
                raise KeyboardInterrupt
            if self.signal is not None:  # the same stop twice (a scheduler signals every process, and so does
                return  # torchrun's agent): one checkpoint still
            self.signal = signum
            log.warning("%s: saving a checkpoint at the end of this step, then stopping (Ctrl-C again: stop now)",
                        signal.Signals(signum).name)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        for name, p in model.named_parameters() if model is not None else ():
            dtype = self.dtypes.get(name)
            if dtype is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)
                for key, value in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        optimizer.state[p][key] = value.to(dtype)
        self.every = self.save_steps or max(1, math.ceil(state.max_steps / 10))
        self.last = time.monotonic()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.group is None:
            # agreed on the host: an NCCL all-reduce read back by the host waits for the GPU to finish the step,
            # every step, which the sync-free CUDA-graph step (speed.sft_trainer) exists to avoid
            self.group = torch.distributed.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kw):
        stop = self.signal is not None
        since = time.monotonic() - self.last
        due = state.global_step % self.every == 0 and (self.save_steps is not None or since >= MIN_GAP_S)
        save = stop or (state.global_step < state.max_steps and (
            due or bool(self.save_minutes and since >= self.save_minutes * 60)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process saves and stops at the same step: a signal may reach them at different steps, and
            # their clocks differ
            flags = torch.tensor([int(save), int(stop)])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
            save, stop = bool(flags[0]), bool(flags[1])
            if stop and self.signal is None:
                self.signal = signal.SIGTERM  # another process was told to stop
        if save:
            self.wait()  # the Trainer deletes the oldest of its two checkpoints as it writes the next one
        control.should_save = control.should_save or save
        control.should_training_stop = control.should_training_stop or stop

    def on_save(self, args, state, control, **kw):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part (its RNG state) before the seal
        if state.is_world_process_zero:
            self.wait()
            self.sealing = threading.Thread(target=self._seal, name="lorapipe-seal",
                                            args=(Path(args.output_dir) / f"checkpoint-{state.global_step}",))
            self.sealing.start()  # not a daemon: an exiting process still finishes the seal
        self.last = time.monotonic()

    def on_train_end(self, args, state, control, **kw):
        self.wait()  # a stop's message says the checkpoint is saved; the run's end removes the checkpoints

    def _seal(self, ckpt: Path) -> None:
        try:
            seal(ckpt)
        except BaseException as e:  # raised in the training thread by wait()
            self.seal_error = e

    def wait(self) -> None:
        """Until the last save is sealed; its error, if sealing failed (a disk that filled up, say), is raised here."""
        if self.sealing is not None:
            self.sealing.join()
            self.sealing = None
        if self.seal_error is not None:
            error, self.seal_error = self.seal_error, None
            raise error
