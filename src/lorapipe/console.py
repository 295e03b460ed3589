"""What reaches the terminal: lorapipe's own lines, its warnings, and one progress bar per long step.

The libraries below lorapipe speak a lot: vLLM prints a few hundred lines per engine start (from this process, its
engine-core process and C++ code that writes to the file descriptors directly), transformers and datasets draw a
progress bar for every weight load and dataset map. Unless `--verbose` (LORAPIPE_VERBOSE=1, inherited by every
process lorapipe starts):

- `setup()` and `quiet_transformers()` turn off the datasets and transformers bars (the stage's own bar stays: the
  Trainer's, vLLM's generation bar; so do the Hub's download bars);
- `to_log(path)` sends file descriptors 1 and 2 to the stage's log file for as long as a vLLM engine lives, so that
  everything vLLM writes lands there, from whichever process; lorapipe's own log records (and anyone's errors) and
  the stage's progress bar stay on the terminal, other libraries' records go to the file. If the block fails, the
  log's last lines are printed with its path.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ENV = "LORAPIPE_VERBOSE"
log = logging.getLogger(__name__)
_terminal: IO[str] | None = None  # inside to_log: the terminal, for the block's progress bar


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def setup(verbose_flag: bool) -> None:
    """Called once by the CLI: remembers --verbose for child processes, and turns off datasets' progress bars (TRL
    maps the dataset three times before training, one bar each; the stage's own bar is the one to watch)."""
    if verbose_flag:
        os.environ[ENV] = "1"
    if verbose():
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read by datasets when imported
    if "datasets" in sys.modules:  # already imported (the Python API, tests)
        sys.modules["datasets"].disable_progress_bars()


def quiet_transformers() -> None:
    """transformers' bars for loading and writing weights (verify alone loads four models) off, unless --verbose;
    the Hub's download bars stay (a long wait on a large model). Called where models are loaded, once transformers
    is imported anyway (importing it only for this would cost every CLI verb a second)."""
    if verbose():
        return
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()  # also switches the Hub's off ...
        enable_progress_bars()  # ... which come back on


def terminal() -> IO[str]:
    """Where a progress bar goes: the terminal, also while to_log has sent stdout/stderr to a log file."""
    return _terminal or sys.stderr


def bar():
    """A tqdm factory on the terminal, for vLLM's `use_tqdm`."""
    from functools import partial

    from tqdm.auto import tqdm

    return partial(tqdm, file=terminal())


def _ours(record: logging.LogRecord) -> bool:
    """What stays on the terminal inside to_log: lorapipe's records, and anyone's errors."""
    return record.name.startswith("lorapipe") or record.levelno >= logging.ERROR


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def to_log(path: Path | None) -> Iterator[IO[str]]:
    """Inside the block, whatever is written to this process's stdout/stderr (and by processes started in it)
    goes to `path`; yields a stream to the terminal for the block's progress bar. A no-op when `path` is None or
    --verbose (the terminal stream is then stderr)."""
    global _terminal
    if path is None or verbose() or _terminal is not None:  # nested: the outer block's log keeps it
        yield terminal()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    term = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                and _fileno(h.stream) in (1, 2)]  # the console handlers (logging.basicConfig's)
    streams = [h.setStream(term) for h in handlers]
    for h in handlers:
        h.addFilter(_ours)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n===== {os.path.basename(sys.argv[0])} {' '.join(sys.argv[1:])} (pid {os.getpid()})\n")
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        theirs = logging.StreamHandler(f)  # the libraries' records that reach the root logger: into the log too
        theirs.addFilter(lambda r: not _ours(r))
        theirs.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(theirs)
        _terminal = term
        try:
            yield term
        except Exception as exc:
            from lorapipe.errors import UserError

            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            text = "" if isinstance(exc, UserError) else tail(path)  # a UserError says all itself
            if text:
                print(f"--- last lines of {path}:\n{text}\n---", file=sys.stderr, flush=True)
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            logging.getLogger().removeHandler(theirs)
            for h, s in zip(handlers, streams):
                h.setStream(s)
                h.removeFilter(_ours)
            _terminal = None
            term.close()
