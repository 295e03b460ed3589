"""Data-parallel training: `lorapipe train --train.processes N` relaunches itself under torchrun, one process per GPU.

The command stays the one users type on one GPU. When more than one process is wanted (train.processes), the
resolved config is written beside the runs and `python -m torch.distributed.run
--standalone --nproc_per_node N -m lorapipe train` takes over; train.py then joins torchrun's process group through
accelerate, splits the effective batch (preflight.layout), and lets rank 0 alone write the run directory. SIGTERM,
SIGINT and SIGHUP to lorapipe are passed on to torchrun, which passes them to every process; they agree on one step
at which to checkpoint and stop (checkpoint.Checkpoints).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lorapipe import preflight, speed
from lorapipe.config import RunCfg, dump_config
from lorapipe.runs import write_text


def wanted(cfg: RunCfg) -> int:
    """Processes to launch, or 0 when this process trains alone (one process, or already under torchrun)."""
    if os.environ.get("LOCAL_RANK") is not None:
        return 0
    n = preflight.processes(cfg)
    return n if n > 1 else 0


def check(cfg: RunCfg, n: int) -> None:
    """What can be refused before `n` processes start: an effective batch that does not split, more processes than
    GPUs (each process takes the GPU of its local rank: the extra ones would fail on a device that does not exist,
    once per process), FSDP without GPUs, and data or a model path that cannot be read. Refused here, a bad input is
    one message and exit code 2; inside torchrun it was one message per process, exit code 1 and torchrun's report.
    Reading the data here costs about 1 s per 100,000 examples (a 95 MB JSONL file), a fraction of what each process
    then spends tokenizing them."""
    import torch

    from lorapipe import data
    from lorapipe.models import resolve_model

    resolve_model(cfg.model)  # the embedded model is converted here, once (every process then finds it)
    data.split_validation(data.load_data(cfg.data), cfg.data, cfg.train.seed)
    speed.split(cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps, n)  # every mode keeps
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        from lorapipe.errors import UserError

        gpus = torch.cuda.device_count()
        raise UserError(f"train.processes {n}: one process per GPU, and {gpus} GPU{'s' * (gpus != 1)} "
                        f"{'are' if gpus != 1 else 'is'} visible (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --train.processes {gpus} or fewer")
    if cfg.train.fsdp:
        speed.check_fsdp(n, torch.cuda.is_available())


def train(cfg: RunCfg, n: int, overwrite: bool = False, force: bool = False, restart: bool = False) -> int:
    """Run `lorapipe train` in `n` processes under torchrun and wait; the exit code of the launch."""
    check(cfg, n)
    print(f"training in {n} {'FSDP-sharded' if cfg.train.fsdp else 'data-parallel'} processes (torchrun; "
          "train.processes)", flush=True)
    config = Path(cfg.output_dir) / f".{cfg.name}.launch.yaml"
    write_text(config, dump_config(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "lorapipe", "train", str(config)]
    cmd += [flag for flag, on in (("--overwrite", overwrite), ("--force", force), ("--restart", restart)) if on]
    proc = subprocess.Popen(cmd)
    got: list[int] = []

    def forward(signum, frame) -> None:
        got.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = proc.wait()
        return 128 + got[0] if rc and got else rc  # stopped on a signal, checkpoint saved: the shell's code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
