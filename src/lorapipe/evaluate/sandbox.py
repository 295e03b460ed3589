"""Run untrusted generated code: one subprocess per candidate, isolated in layers, always cleaned up.

Layers, strongest first (each is used when the machine allows it; `isolation()` says which are active):
  1. bubblewrap (`bwrap`, Debian's package): its own mount namespace with the host filesystem read-only, private
     empty /tmp, /var/tmp and /dev/shm, only the candidate's folder writable; no network (an empty network
     namespace); its own PID namespace, so everything it forked dies with it; and it dies with its parent. Native
     code (ctypes, system(), a forked daemon) meets the kernel's walls, not Python's. Without bwrap:
     `unshare --net --pid --fork --kill-child` gives the network and PID layers only, and files outside the folder
     are guarded by layer 2 alone (world-writable places stay writable).
  2. as root: `setpriv` drops to the unprivileged `nobody` user, so files outside the candidate's temp dir cannot be
     written or deleted, and RLIMIT_NPROC (ignored for root) bounds fork bombs.
  3. resource limits: CPU seconds, address space, file size (which also caps output), open files, processes.
  4. a wall-clock timeout that SIGKILLs the whole process group (and the namespace with it).
  5. a Python audit hook installed before the candidate runs: denies sockets, and writes, deletes and renames
     outside the temp dir. This is the only file guard where neither namespaces nor root are available (a
     documented best effort: native code can bypass it).
The environment is minimal (no inherited variables, so no secrets); cwd, HOME and TMPDIR are a fresh temp dir.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

# Reporting, not a guard: CPU exhaustion exits 124 (the soft limit's SIGXCPU; the hard limit kills 1 s later).
RUNNER = """import os as _o, signal as _s
_s.signal(_s.SIGXCPU, lambda *_: _o._exit(124))
"""
EXEC = """with open("candidate.py") as _f:
    _src = _f.read()
exec(compile(_src, "candidate.py", "exec"), {"__name__": "__main__"})
"""

HOOK = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
def _inside(p):
    try:
        p = _os.path.realpath(_os.fsdecode(p))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + _os.sep)
_WRITE = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "shutil.rmtree",
                "os.utime", "os.symlink", "os.link", "os.rename", "shutil.move", "shutil.copyfile"}
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE)
        if path is not None and not isinstance(path, int) and writing and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
    elif event in _PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, _os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {a}")
    elif event.startswith("socket.") and event != "socket.gethostname":
        raise PermissionError("sandbox: network access is not allowed")
    elif event in ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {event} is not allowed")
_sys.addaudithook(_hook)
del _hook
'''


@dataclass
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    processes: int = 64
    audit_hook: bool = True  # tests switch it off to prove the OS layers on their own


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout | output_limit | error (killed by another signal)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


PRIVATE = ("/tmp", "/var/tmp", "/dev/shm")


def _interpreter_dirs(python: str) -> list[str]:
    """Where the candidate's interpreter and its environment live, if inside a folder the sandbox empties (a venv
    under /tmp, as in a CI checkout there): bound back read-only, or the interpreter would not start."""
    roots = {Path(python).parent.parent, Path(os.path.realpath(python)).parent.parent, Path(sys.prefix),
             Path(sys.base_prefix)}
    return sorted(str(r) for r in roots if any(str(r).startswith(d + os.sep) for d in PRIVATE))


def _bwrap(bwrap: str, root: bool, work: str, python: str) -> list[str]:
    """bubblewrap around one candidate whose folder is `work` (bound writable at its own path)."""
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in PRIVATE:
        cmd += ["--perms", "1777", "--tmpfs", d]
    for d in _interpreter_dirs(python):
        cmd += ["--ro-bind", d, d]
    cmd += ["--bind", work, work, "--chdir", work,
           "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session"]
    # as root: keep only what setpriv needs to drop to `nobody` (it clears them again); else a user namespace
    return cmd + (["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user"])


def _unshare(unshare: str | None, root: bool) -> list[str]:
    """The network + PID layer without bubblewrap, if the machine allows it."""
    if not unshare:
        return []
    ns = [unshare, "--net", "--pid", "--fork", "--kill-child"] + ([] if root else ["--map-root-user"])
    return ns if _works([*ns, "true"]) else []


@functools.lru_cache(maxsize=1)
def isolation() -> dict[str, object]:
    """Probe once which layers this machine allows, and the interpreter the candidate runs under."""
    setpriv = shutil.which("setpriv")
    bwrap = shutil.which("bwrap")
    root = os.geteuid() == 0
    drop: list[str] = []
    if root and setpriv:
        drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all"]
    python = sys.executable
    candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
    if drop:  # the interpreter must be usable by `nobody` (a venv under /root may not be)
        python = next((p for p in candidates if p and _works([*drop, p, "-c", "pass"])), "")
        if not python:
            drop, python = [], sys.executable
    filesystem = False
    if bwrap:  # probed as a candidate runs: in a fresh folder under the emptied /tmp
        work = tempfile.mkdtemp(prefix="lorapipe-sbx-probe-")
        try:
            if drop:
                os.chown(work, NOBODY, NOBODY)
            filesystem = _works([*_bwrap(bwrap, root, work, python), *drop, python, "-c", "pass"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    prefix = [bwrap] if filesystem else _unshare(shutil.which("unshare"), root)
    return {"namespaces": bool(prefix), "filesystem": filesystem, "drop_privileges": bool(drop), "python": python,
            "prefix": prefix, "drop": drop}


def _command(iso: dict[str, object], work: Path) -> list[str]:
    prefix = list(iso["prefix"])
    if iso["filesystem"]:
        prefix = _bwrap(prefix[0], os.geteuid() == 0, str(work), str(iso["python"]))
    return [*prefix, *iso["drop"], str(iso["python"]), "-I", "main.py"]


def _preexec(limits: Limits, dropping: bool):
    def setup() -> None:
        def cap(res: int, value: int) -> None:
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                pass

        try:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        except (ValueError, OSError):
            pass
        cap(resource.RLIMIT_AS, limits.memory_mb << 20)
        cap(resource.RLIMIT_FSIZE, limits.output_bytes)
        cap(resource.RLIMIT_NOFILE, 256)
        cap(resource.RLIMIT_CORE, 0)
        if dropping:  # counted per user: bounds the candidate's forks once it runs as `nobody`
            cap(resource.RLIMIT_NPROC, limits.processes)
        elif os.geteuid() != 0:  # our own user: allow what already runs plus the candidate's budget
            cap(resource.RLIMIT_NPROC, _user_processes() + limits.processes)
    return setup


def _user_processes() -> int:
    uid = os.geteuid()
    n = 0
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and d.stat().st_uid == uid:
                n += 1
        except OSError:
            pass
    return n


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def run_code(code: str, limits: Limits | None = None) -> Outcome:
    """Execute `code` (a candidate program plus its tests) in the sandbox; passed means exit code 0."""
    limits = limits or Limits()
    iso = isolation()
    dropping = bool(iso["drop_privileges"])
    tmp = Path(tempfile.mkdtemp(prefix="lorapipe-sbx-"))
    try:
        (tmp / "candidate.py").write_text(code)
        (tmp / "main.py").write_text(RUNNER + (HOOK if limits.audit_hook else "") + EXEC)
        if dropping:
            os.chown(tmp, NOBODY, NOBODY)
            for f in tmp.iterdir():
                os.chown(f, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = _command(iso, tmp)
        start = time.monotonic()
        with (tmp / ".stdout").open("wb") as out, (tmp / ".stderr").open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=_preexec(limits, dropping), start_new_session=True)
            status = None
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # leftovers in the group; the PID namespace dies with it
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.monotonic() - start
        rc = proc.returncode
        capped = max((tmp / ".stdout").stat().st_size, (tmp / ".stderr").stat().st_size) >= limits.output_bytes
        if status is None:
            status = ("passed" if rc == 0 else "timeout" if rc in (124, -signal.SIGXCPU, -signal.SIGKILL)
                      else "output_limit" if capped else "error" if rc < 0 else "failed")
        return Outcome(status == "passed", status, rc, _read(tmp / ".stdout", 64 << 10),
                       _read(tmp / ".stderr", 64 << 10), seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
