"""Run untrusted Python (a model's answer to a code task) against hidden tests, and score it.

What each layer guarantees (layers that need something the machine lacks are skipped, never faked):

- *Hidden tests stay in the parent.* The child gets the inputs only (on stdin; nothing is written to disk);
  the parent compares the values it sends back with the expected ones it kept to itself, so nothing the
  child prints, forges or reads can make a wrong function pass.
- *Kernel-enforced, always:* a separate process (`python -I -S`: no site-packages, no user paths, no
  PYTHON* variables), a scrubbed environment, a fresh temp dir as cwd, HOME and TMPDIR, its own session
  (process group) killed with SIGKILL on a wall-clock timeout and again after every run, and rlimits the
  child sets on itself before any untrusted code runs: CPU seconds, address space, no new processes or
  threads (RLIMIT_NPROC 0; root ignores it, hence the next layer), file size, open files, no core files.
- *Kernel-enforced, when running as root:* the child drops to `nobody` before the untrusted code, so file
  permissions keep it out of the user's files and it may not signal the parent.
- *Kernel-enforced, when `unshare` works here* (root, or unprivileged user namespaces): a new network
  namespace (no interfaces but a down loopback: no network at all) and a new PID namespace (the parent
  and the host's processes are not addressable; when its first process dies the kernel kills the rest).
- *Best effort, always:* a Python audit hook, installed before the untrusted code, refuses sockets,
  process creation, signals, ctypes, and opening files outside the temp dir and the standard library.
  Audit hooks are not a security boundary (CPython documents ways around them); they are what remains
  on a non-root machine without user namespaces, and they make the common accidents fail fast.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

NOBODY = 65534
MAX_OUTPUT = 1 << 20  # bytes read back from the child; more and it is killed
MAX_CODE = 20_000  # characters of code accepted at all


@dataclass(frozen=True, slots=True)
class Limits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_mb: int = 512  # address space
    file_mb: int = 1  # largest file it may write (in its temp dir)
    audit_hook: bool = True  # off only to test what the kernel-enforced layers hold on their own


@dataclass(frozen=True, slots=True)
class Result:
    passed: int  # hidden tests whose returned value equals the expected one
    total: int
    status: str  # "ok" (ran to the end), "timeout", "crashed", "no-output", "rejected"

    @property
    def score(self) -> float:
        return 1.0 if self.total and self.passed == self.total else 0.0


# The child's side. It reads its job from stdin, locks itself down, then runs the untrusted code and
# prints one JSON line: the values returned per input. The parent judges them; the child never sees
# expected values, so a forged line can only ever contain guesses.
HARNESS = r'''
import json, os, resource, sys
job = json.loads(sys.stdin.buffer.read())
box = os.getcwd()
out = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
if os.getpid() == 1:  # init of a new PID namespace is spared even the rlimit's kill signals: work in a child
    worker = os.fork()
    if worker:
        # As init leaves, the kernel kills whatever else is left in the namespace.
        os._exit(1 if os.waitpid(worker, 0)[1] else 0)
for lim, value in ((resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_AS, job["mem"]),
                   (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0)):
    resource.setrlimit(lim, (value, value))
# Loaded before the drop: the interpreter may live where `nobody` cannot read (root's home).
import bisect, collections, fractions, functools, heapq, itertools, math, operator, re, string  # noqa
if job["drop"]:
    os.setgroups([])
    os.setgid(job["drop"])
    os.setuid(job["drop"])
roots = tuple(os.path.realpath(p) + os.sep for p in sys.path if p)  # the standard library only
mine = box + os.sep
DENY = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
        "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "os.chmod", "os.chown", "os.setuid",
        "os.link", "os.symlink", "ctypes.", "sys.addaudithook", "os.putenv", "os.setxattr", "mmap.",
        "pty.", "fcntl.", "winreg.", "webbrowser.", "shutil.", "os.rename", "os.truncate")
# Everything the hook uses is bound now, so the code cannot patch what it relies on (os.path.join, ...).
def hook(event, args, DENY=DENY, roots=roots, mine=mine, realpath=os.path.realpath, join=os.path.join, sep=os.sep,
         WRITE=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, PermissionError=PermissionError):
    if event.startswith(DENY):
        raise PermissionError("sandbox: " + event)
    if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess", "gc"):
        raise PermissionError("sandbox: import " + args[0])
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0]
        path = realpath(path if path.startswith(sep) else join(mine, path)) + sep
        flags = args[2] if isinstance(args[2], int) else 0
        writing = bool(flags & WRITE) or (
            isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
        if not path.startswith(mine) and (writing or not path.startswith(roots)):
            raise PermissionError("sandbox: open " + path)
    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.listdir", "os.scandir", "os.chdir"):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0] if isinstance(args[0], str) else "."
        if not (realpath(path if path.startswith(sep) else join(mine, path)) + sep).startswith(mine):
            raise PermissionError("sandbox: " + event)
if job["audit"]:
    sys.addaudithook(hook)
del hook
results = []
try:
    scope = {"__name__": "__sandbox__"}
    exec(compile(job["code"], "<answer>", "exec"), scope)
    func = scope[job["func"]]
    for args in job["inputs"]:
        try:
            value = func(*args)
            results.append(["ok", json.loads(json.dumps(value))])
        except BaseException as e:
            results.append(["error", type(e).__name__])
except BaseException as e:
    results = [["error", type(e).__name__]] * len(job["inputs"])
os.write(out, (job["nonce"] + json.dumps(results) + "\n").encode())
os._exit(0)
'''


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` command that gives a new network and PID namespace here, or () when none works."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    flags = ["--net", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        flags.insert(0, "--map-root-user")
    try:
        done = subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (exe, *flags) if done.returncode == 0 else ()


def layers() -> dict[str, bool]:
    """Which of the optional kernel-enforced layers this machine gives (for logs and the docs)."""
    return {"drop_to_nobody": os.geteuid() == 0, "namespaces": bool(_unshare_prefix()), "rlimits": True,
            "audit_hook": True}


def run_tests(code: str, func: str, inputs: list[list[Any]], expected: list[Any],
              limits: Limits = Limits()) -> Result:
    """Define `func` by running `code` in the sandbox, call it on each input, compare with `expected`."""
    if len(code) > MAX_CODE or "\x00" in code:
        return Result(0, len(inputs), "rejected")
    nonce = secrets.token_hex(16)
    job = {"code": code, "func": func, "inputs": inputs, "nonce": nonce, "cpu": limits.cpu_seconds,
           "mem": limits.memory_mb << 20, "fsize": limits.file_mb << 20,
           "drop": NOBODY if os.geteuid() == 0 else 0, "audit": limits.audit_hook}
    box = tempfile.mkdtemp(prefix="pocketr1-sandbox-")
    try:
        if job["drop"]:
            os.chown(box, NOBODY, NOBODY)
        raw, status = _run_child(box, json.dumps(job).encode(), limits.wall_seconds)
    finally:
        shutil.rmtree(box, ignore_errors=True)
    return _judge(raw, nonce, expected, status)


def _run_child(box: str, job: bytes, wall_seconds: float) -> tuple[bytes, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    cmd = [*_unshare_prefix(), sys.executable, "-I", "-S", "-c", HARNESS, "pocketr1-sandbox"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=box, env=env, start_new_session=True, close_fds=True)
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except OSError:
        pass  # it died before reading its job: judged by what it printed (nothing)
    out, status = bytearray(), "ok"
    deadline = time.monotonic() + wall_seconds
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > MAX_OUTPUT:
                status = "crashed"
                break
    _kill_group(proc)
    proc.stdout.close()
    if status == "ok" and proc.returncode != 0:
        status = "crashed"
    return bytes(out), status


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole session (anything it started is in it), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _judge(raw: bytes, nonce: str, expected: list[Any], status: str) -> Result:
    """Count the returned values equal (as JSON, so True is not 1) to the expected ones."""
    total = len(expected)
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith(nonce):
            continue
        try:
            returned = json.loads(line[len(nonce):])
        except ValueError:
            break
        if not isinstance(returned, list) or len(returned) != total:
            break
        passed = sum(isinstance(r, list) and len(r) == 2 and r[0] == "ok" and _same(r[1], want)
                     for r, want in zip(returned, expected))
        return Result(passed, total, status)
    return Result(0, total, status if status != "ok" else "no-output")


def _same(got: Any, want: Any) -> bool:
    return json.dumps(got, sort_keys=True) == json.dumps(json.loads(json.dumps(want)), sort_keys=True)
