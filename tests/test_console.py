"""The console: the libraries' output goes to the stage's log file, lorapipe's own lines stay on the terminal."""

import logging
import os
import subprocess
import sys

import pytest

from lorapipe import console


@pytest.fixture
def root_handler():
    """A console handler like the CLI's logging.basicConfig makes (its stream writes to file descriptor 2)."""
    h = logging.StreamHandler(sys.__stderr__)
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.INFO)
    yield h
    root.removeHandler(h)
    root.setLevel(old)


def test_to_log_sends_everything_written_to_the_file_descriptors_to_the_log(tmp_path, capfd, monkeypatch,
                                                                               root_handler):
    monkeypatch.delenv(console.ENV, raising=False)
    path = tmp_path / "logs" / "stage.log"
    with console.to_log(path) as term:
        print("a library's print", file=sys.__stdout__, flush=True)  # what a real CLI's sys.stdout is
        os.write(2, b"C code writing to fd 2\n")
        subprocess.run([sys.executable, "-c", "print('an engine process')"], check=True)
        logging.getLogger("lorapipe.test").warning("a warning for the user")
        logging.getLogger("vllm.platforms").warning("a library's warning")
        term.write("the stage's progress bar\n")
        assert console.terminal() is term
    out, err = capfd.readouterr()
    text = path.read_text()
    for line in ("a library's print", "C code writing to fd 2", "an engine process", "a library's warning"):
        assert line in text and line not in out + err
    assert "a warning for the user" in err and "a warning for the user" not in text
    assert "the stage's progress bar" in err
    assert console.terminal() is sys.stderr and root_handler.stream is sys.__stderr__  # all restored
    print("after the block", file=sys.__stdout__, flush=True)
    assert "after the block" in capfd.readouterr().out


def test_to_log_shows_the_log_tail_when_the_block_fails(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(console.ENV, raising=False)
    path = tmp_path / "stage.log"
    with pytest.raises(RuntimeError, match="engine died"), console.to_log(path):
        print("the root cause, deep in the engine's log", file=sys.__stdout__, flush=True)
        raise RuntimeError("engine died")
    err = capfd.readouterr().err
    assert f"last lines of {path}" in err and "the root cause, deep in the engine's log" in err


def test_verbose_keeps_everything_on_the_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(console.ENV, "1")
    path = tmp_path / "stage.log"
    with console.to_log(path):
        print("seen", file=sys.__stdout__, flush=True)
    assert "seen" in capfd.readouterr().out and not path.exists()


def test_cli_verbose_flag_reaches_child_processes(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in (console.ENV, "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    monkeypatch.setattr(os, "environ", env)
    console.setup(verbose_flag=False)
    assert not console.verbose() and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    console.setup(verbose_flag=True)
    assert console.verbose() and os.environ[console.ENV] == "1"  # torchrun's and vLLM's processes inherit it
