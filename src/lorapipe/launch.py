"""Data-parallel training: `lorapipe train --train.processes N` relaunches itself under torchrun, one process per GPU.

The command stays the one users type on one GPU. When more than one process is wanted (train.processes), the
resolved config is written beside the runs and torchrun's agent (`torchrun --standalone --nproc_per_node N -m
lorapipe train`, run in this process) takes over; train.py then joins torchrun's process group through accelerate,
splits the effective batch (preflight.layout), and lets rank 0 alone write the run directory. SIGTERM, SIGINT and
SIGHUP to lorapipe are passed on by the agent to every process; they agree on one step at which to checkpoint and
stop (checkpoint.Checkpoints).
"""

from __future__ import annotations

import logging
import os
import signal
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
    """Run `lorapipe train` in `n` processes under torchrun's agent, here in this process, and wait; the exit code.

    torchrun as a child process cost its own interpreter and imports (about 6 s on the H200 host), and a Ctrl-C arrived
    there twice: the terminal signalled the child and this parent, which passed it on again, so the agent broke off
    its shutdown with a traceback. The agent starts each training process in a session of its own and passes every
    signal on once; they agree on one step at which to checkpoint and stop (checkpoint.Checkpoints). It waits 30 s
    for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, read by torch >= 2.12, changes that), then kills them: a checkpoint
    cut off there is left unsealed, and resuming takes the one before. A
    bad input that the processes found (exit 2, printed once per machine) and a stop on a signal (128 + signal, the
    checkpoint saved) keep their exit codes; any other failure is summed up in one line instead of torchrun's
    report."""
    check(cfg, n)
    print(f"training in {n} {'FSDP-sharded' if cfg.train.fsdp else 'data-parallel'} processes (torchrun; "
          "train.processes)", flush=True)
    config = Path(cfg.output_dir) / f".{cfg.name}.launch.yaml"
    write_text(config, dump_config(cfg))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc_per_node={n}", "-m", "lorapipe", "train", str(config)]
    argv += [flag for flag, on in (("--overwrite", overwrite), ("--force", force), ("--restart", restart)) if on]
    env = dict(os.environ)  # the agent sets OMP_NUM_THREADS for the processes it starts, in its own environment
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    logging.disable(logging.ERROR)  # the agent's own loggers (banner, per-process failure lines): said below
    try:
        run(parse_args(argv))
        return 0
    except SignalException as exc:  # the agent passed the signal on and waited for the processes' checkpoint
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()  # the others were stopped by the agent after it
        if first.exitcode == 2 or first.exitcode > 128:
            return first.exitcode  # a bad input, or stopped on a signal: the process said so
        what = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
                else f"exited with code {first.exitcode}")
        print(f"error: training process {rank} of {n} {what} (its output is above)", file=sys.stderr)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(env)
        logging.disable(logging.NOTSET)
        for s, h in handlers.items():  # the agent's handlers raise; a later signal must not land in them
            signal.signal(s, h)
