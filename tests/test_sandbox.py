"""Hostile candidates: none may hang the evaluation, touch the host, reach the network, or leave processes behind.

Guards are proven twice where it matters: with the Python audit hook, and without it (the OS layers alone).
"""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from lorapipe.evaluate.sandbox import Limits, isolation, run_code

BOTH = pytest.mark.parametrize("hook", [True, False], ids=["hook", "os-only"])


def leftovers() -> list[int]:
    """Processes still running in (or from) a sandbox temp dir."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if "lorapipe-sbx-" in os.readlink(d / "cwd"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    deadline = time.monotonic() + 5
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == []


def test_passing_and_failing_candidates():
    assert run_code("def f(x):\n    return x + 1\nassert f(1) == 2\n").passed
    bad = run_code("def f(x):\n    return x\nassert f(1) == 2, 'wrong'\n")
    assert bad.status == "failed" and "AssertionError: wrong" in bad.stderr


@BOTH
def test_infinite_loop_is_stopped(hook):
    out = run_code("while True:\n    pass\n", Limits(timeout_s=3, cpu_s=2, audit_hook=hook))
    assert out.status == "timeout" and out.seconds < 6


@BOTH
def test_fork_bomb_is_contained(hook):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = time.monotonic()
    out = run_code(code, Limits(timeout_s=4, cpu_s=3, audit_hook=hook))
    assert not out.passed and time.monotonic() - t < 15


@BOTH
def test_huge_allocation_fails_inside_the_sandbox(hook):
    out = run_code("x = bytearray(10 * 1024 ** 3)\n", Limits(memory_mb=512, audit_hook=hook))
    assert out.status == "failed" and "MemoryError" in out.stderr


@BOTH
def test_writing_outside_the_temp_dir_is_denied(hook, tmp_path):
    target = tmp_path / "pwned.txt"
    if not hook and not isolation()["drop_privileges"]:
        pytest.skip("without root there is no OS-level file guard; the audit hook is the guard")
    out = run_code(f"open({str(target)!r}, 'w').write('x')\n", Limits(audit_hook=hook))
    assert not out.passed and not target.exists()
    assert run_code("open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'\n").passed


@BOTH
def test_deleting_files_is_denied(hook, tmp_path):
    if not hook and not isolation()["drop_privileges"]:
        pytest.skip("without root there is no OS-level file guard; the audit hook is the guard")
    victim = tmp_path / "keep" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    code = (f"import os, shutil\ntry:\n    os.remove({str(victim)!r})\nexcept OSError:\n    pass\n"
            f"shutil.rmtree({str(victim.parent)!r})\n")
    out = run_code(code, Limits(audit_hook=hook))
    assert not out.passed and victim.read_text() == "precious"


@BOTH
def test_network_is_denied(hook):
    if not hook and not isolation()["namespaces"]:
        pytest.skip("no network namespace on this machine; the audit hook is the guard")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(8)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(_accept(server)))
    t.start()
    out = run_code(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                   "s.sendall(b'leak')\n", Limits(audit_hook=hook))
    t.join()
    server.close()
    assert not out.passed and accepted == [None]


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


@BOTH
def test_megabytes_of_output_are_capped(hook):
    out = run_code("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n",
                   Limits(output_bytes=1 << 20, audit_hook=hook))
    assert out.status == "output_limit" and len(out.stdout) <= 64 << 10


def test_no_secrets_and_a_fresh_home(monkeypatch):
    monkeypatch.setenv("LORAPIPE_TEST_SECRET", "s3cret-token")
    out = run_code("import os\nprint(dict(os.environ))\nprint(os.getcwd() == os.environ['HOME'])\n")
    assert out.passed and "s3cret-token" not in out.stdout and out.stdout.strip().endswith("True")


def test_isolation_report():
    iso = isolation()
    assert set(iso) >= {"namespaces", "drop_privileges", "python"}


def test_isolation_has_a_mount_namespace_in_ci():
    """CI installs bubblewrap (the README's setup): there, the filesystem layer must be active, not skipped."""
    if os.environ.get("CI"):
        assert isolation()["filesystem"], "bubblewrap missing or refused: `apt-get install bubblewrap`"


@BOTH
def test_native_code_cannot_touch_the_host_filesystem(hook, tmp_path):
    """ctypes open/write, system() and a forked, setsid daemon: checked from outside, nothing changed.

    The audit hook never sees any of these (they are native calls), so both runs rely on the mount namespace.
    """
    if not isolation()["filesystem"]:
        pytest.skip("no mount namespace here (bubblewrap missing): world-writable places are not guarded")
    import tempfile
    import uuid

    outside = Path(tempfile.mkdtemp(prefix=".sbx-victim-", dir=Path(__file__).parent))  # visible, not under /tmp
    try:
        outside.chmod(0o777)
        victims = [outside / "world.txt", tmp_path / "world.txt"]
        for v in victims:
            v.write_text("precious")
            v.chmod(0o666)
        tmp_path.chmod(0o777)
        tag = uuid.uuid4().hex
        fresh = [Path(f"/tmp/escape-{tag}-{i}") for i in range(4)] + [outside / f"new-{tag}", Path(f"/dev/shm/{tag}")]
        targets = [str(p) for p in victims + fresh]
        code = f"""import ctypes, os
libc = ctypes.CDLL(None)
def put(path):
    fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    if fd >= 0:
        libc.write(fd, b"pwned", 5)
        libc.close(fd)
for p in {targets!r}:
    put(p)
libc.system(b"echo pwned > {fresh[1]}; echo pwned >> {victims[0]}; echo pwned >> {victims[1]}")
if libc.fork() == 0:
    libc.setsid()
    libc.sleep(1)
    put({str(fresh[2])!r})
    put({str(victims[0])!r})
    libc._exit(0)
"""
        out = run_code(code, Limits(audit_hook=hook, timeout_s=10))
        time.sleep(2.5)  # a daemon that survived would have written by now
        assert out.status in ("passed", "failed", "error"), out
        assert all(v.read_text() == "precious" for v in victims)
        assert not any(p.exists() for p in fresh)
        assert sorted(p.name for p in outside.iterdir()) == ["world.txt"]
    finally:
        import shutil

        shutil.rmtree(outside, ignore_errors=True)
