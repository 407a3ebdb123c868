"""The code sandbox's battery of escapes: each attack is written so that it would return the right values
(and score 1) exactly when its escape worked; every one must score 0 and leave the host as it was."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pocketr1.tasks.sandbox import Limits, layers, run_tests

LIMITS = Limits(cpu_seconds=1, wall_seconds=2.0, memory_mb=256)
INPUTS = [[1], [2], [3]]
EXPECTED = [2, 3, 4]
SLACK = 4.0  # seconds on top of the wall limit: the machine is shared and loaded


def run(code: str, expected: list = EXPECTED, limits: Limits = LIMITS):
    return run_tests(code, "f", INPUTS, expected, limits)


def sandbox_processes() -> list[str]:
    """Processes still running a sandbox child (or anything carrying the attacks' marker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "pocketr1-sandbox" in cmdline or "31337" in cmdline:
            found.append(f"{entry.name}: {cmdline[:80]}")
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("pocketr1-sandbox-*")}


@pytest.fixture(autouse=True)
def host_unaffected():
    """Around every test: no sandbox process left behind, no temp dir left behind, this process alive."""
    dirs = sandbox_dirs()
    yield
    deadline = time.monotonic() + 2
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel may take a moment to reap a killed namespace
    assert not sandbox_processes()
    assert sandbox_dirs() <= dirs


# --- the honest cases ---------------------------------------------------------------------------------------

def test_correct_code_scores_one_and_wrong_code_zero():
    ok = run("def f(x):\n    return x + 1\n")
    assert (ok.score, ok.passed, ok.status) == (1.0, 3, "ok")
    partly = run("def f(x): return 0 if x == 2 else x + 1")
    assert (partly.score, partly.passed) == (0.0, 2)
    assert run("def f(x): return x").score == 0.0
    assert run("def g(x): return x + 1").score == 0.0  # the wrong name
    assert run("def f(x) return x + 1").score == 0.0  # a syntax error
    assert run("def f(x): return float(x + 1)").score == 0.0  # 2.0 is not 2 ...
    assert run("def f(x): return x > 0", [True, True, True]).score == 1.0  # ... and True is not 1
    assert run("def f(x): return 1", [True, True, True]).score == 0.0


def test_standard_library_and_own_temp_dir_are_usable():
    code = ("import math, collections, json\n"
            "open('scratch.txt', 'w').write('7')\n"
            "def f(x): return int(math.sqrt(x * x)) + int(open('scratch.txt').read()) - 6")
    assert run(code).score == 1.0


# --- the battery --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "while True:\n    pass\ndef f(x): return x + 1",
    "def f(x):\n    while True:\n        x += 1",
    "import time\ntime.sleep(60)\ndef f(x): return x + 1",
    "def f(x):\n    return len(str(10 ** (10 ** 9))) - len(str(10 ** (10 ** 9))) + x + 1",  # long C-level work
])
def test_infinite_loops_are_killed_in_time(code):
    start = time.monotonic()
    result = run(code)
    assert result.score == 0.0 and result.status != "ok"
    assert time.monotonic() - start < LIMITS.wall_seconds + SLACK


def test_fork_bomb_is_contained():
    code = ("import os\nforked = 0\n"
            "try:\n    for _ in range(10000):\n        os.fork()\n        forked += 1\n"
            "except BaseException:\n    pass\n"
            "def f(x): return x + 1 if forked else -1")
    assert run(code).score == 0.0


def test_spawned_processes_do_not_outlive_the_run():
    code = ("import subprocess, os\nspawned = False\n"
            "try:\n    subprocess.Popen(['sleep', '31337'], start_new_session=True)\n    spawned = True\n"
            "except BaseException:\n    pass\n"
            "try:\n    os.system('sleep 31337 &')\n    spawned = True\nexcept BaseException:\n    pass\n"
            "def f(x): return x + 1 if spawned else -1")
    assert run(code).score == 0.0  # and the fixture finds no `sleep 31337` left


def test_memory_bomb_is_contained():
    code = "blob = bytearray(4 << 30)\ndef f(x): return x + 1"
    result = run(code)
    assert result.score == 0.0
    assert run("def f(x): return x + 1").score == 1.0  # the host is fine for the next run


def _listening_server() -> tuple[socket.socket, list]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    got: list = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            got.append(conn.recv(100))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, got


def test_network_is_unreachable():
    server, got = _listening_server()
    port = server.getsockname()[1]
    code = ("import socket\nreached = False\n"
            f"try:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'escaped')\n    reached = True\nexcept BaseException:\n    pass\n"
            "try:\n    socket.getaddrinfo('example.com', 80)\n    reached = True\nexcept BaseException:\n    pass\n"
            "def f(x): return x + 1 if reached else -1")
    try:
        assert run(code).score == 0.0
        time.sleep(0.3)
        assert got == []
    finally:
        server.close()


def test_cannot_write_outside_its_temp_dir(tmp_path):
    targets = [tmp_path / "escaped.txt", Path.cwd() / "escaped-from-sandbox.txt"]
    code = ("import os\nwrote = 0\n"
            f"for path in {[str(t) for t in targets]!r} + ['../escaped-from-sandbox.txt']:\n"
            "    try:\n        with open(path, 'w') as fh:\n            fh.write('x')\n        wrote += 1\n"
            "    except BaseException:\n        pass\n"
            f"try:\n    os.mkdir({str(tmp_path / 'escaped-dir')!r})\n    wrote += 1\nexcept BaseException:\n    pass\n"
            "def f(x): return x + 1 if wrote else -1")
    assert run(code).score == 0.0
    assert not any(t.exists() for t in targets)
    assert not (tmp_path / "escaped-dir").exists()
    assert not (Path(tempfile.gettempdir()) / "escaped-from-sandbox.txt").exists()


# Looks everywhere a child could find the hidden expected values: its stdin, the harness's own variables,
# the parent's command line, environment and memory, and files in the temp dirs.
SNOOP = r'''
import os, re, sys
found = []
def look(blob):
    if isinstance(blob, str):
        blob = blob.encode(errors="ignore")
    found.extend(m.decode() for m in re.findall(rb"SECRET-[0-9a-f]{32}", blob or b""))
for attempt in (lambda: sys.stdin.buffer.read(), lambda: repr(vars(sys.modules["__main__"])),
                lambda: open("/proc/%d/cmdline" % os.getppid(), "rb").read(),
                lambda: open("/proc/%d/environ" % os.getppid(), "rb").read(), lambda: repr(dict(os.environ))):
    try:
        look(attempt())
    except BaseException:
        pass
try:
    maps = open("/proc/%d/maps" % os.getppid()).read().splitlines()
    with open("/proc/%d/mem" % os.getppid(), "rb") as mem:
        for line in maps:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if "rw" in line.split()[1] and hi - lo < 1 << 28:
                try:
                    mem.seek(lo)
                    look(mem.read(hi - lo))
                except BaseException:
                    pass
except BaseException:
    pass
for root in ("/tmp", os.path.expanduser("~"), "/proc/%d/cwd" % os.getppid()):
    try:
        for name in os.listdir(root):
            try:
                look(open(os.path.join(root, name), "rb").read(1 << 20))
            except BaseException:
                pass
    except BaseException:
        pass
def f(x):
    return found[0] if found else None
'''


def test_hidden_tests_are_out_of_reach():
    secret = "SECRET-" + secrets.token_hex(16)
    assert run(SNOOP, [secret] * 3).score == 0.0
    leaked = run("def f(x): return 'SECRET-' + '0' * 32", [secret] * 3)
    assert leaked.score == 0.0


def test_users_home_is_out_of_reach(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_rsa"
    content = "SECRET-" + secrets.token_hex(16)
    key.write_text(content)
    key.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    code = ("import os\ntaken = None\n"
            f"for path in ('~/.ssh/id_rsa', {str(key)!r}, os.environ.get('HOME', '') + '/.ssh/id_rsa'):\n"
            "    try:\n        taken = open(os.path.expanduser(path)).read()\n        break\n"
            "    except BaseException:\n        pass\n"
            "def f(x): return taken")
    assert run(code, [content] * 3).score == 0.0


def test_cannot_kill_its_parent_or_other_processes():
    canary = subprocess.Popen(["sleep", "60"])
    try:
        code = ("import os, signal\nhit = False\n"
                "ppid = os.getppid()\n"
                "try:\n    if ppid > 1:\n        os.kill(ppid, 0)\n        hit = True\n"
                "except BaseException:\n    pass\n"
                f"try:\n    os.kill({canary.pid}, signal.SIGKILL)\n    hit = True\nexcept BaseException:\n    pass\n"
                f"try:\n    os.killpg({os.getpgid(0)}, 0)\n    hit = True\nexcept BaseException:\n    pass\n"
                "def f(x): return x + 1 if hit else -1")
        assert run(code).score == 0.0
        assert canary.poll() is None  # still running
    finally:
        canary.kill()
        canary.wait()


def test_printing_pass_or_forging_results_earns_nothing():
    attacks = [
        "print('PASS')\nprint('3/3 tests passed')\ndef f(x): return 'PASS'",
        "import os\nos.write(1, b'PASS\\n')\nos._exit(0)",
        # forge the harness's result line, nonce and all, with values of its own choosing
        "import sys, os, json\njob = sys.modules['__main__'].job\n"
        "line = (job['nonce'] + json.dumps([['ok', 'PASS']] * 3) + '\\n').encode()\n"
        "for fd in range(3, 10):\n    try:\n        os.write(fd, line)\n    except OSError:\n        pass\n"
        "def f(x): return 'PASS'",
    ]
    for code in attacks:
        result = run(code)
        assert result.score == 0.0 and result.passed == 0, code


def test_oversized_or_binary_code_is_rejected_without_running():
    assert run("def f(x): return x + 1\n" + "#" * 30_000).status == "rejected"
    assert run("def f(x): return x + 1\x00").status == "rejected"


def test_flood_of_output_is_cut_off():
    code = "import os\nwhile True:\n    os.write(3, b'x' * 65536)"
    result = run(code)
    assert result.score == 0.0


# --- the kernel-enforced layers on their own (the audit hook off) -------------------------------------------

KERNEL_ONLY = Limits(cpu_seconds=1, wall_seconds=2.0, memory_mb=256, audit_hook=False)


@pytest.mark.skipif(not (layers()["drop_to_nobody"] and layers()["namespaces"]),
                    reason="needs root (to drop to nobody) and working namespaces")
def test_kernel_layers_alone_contain_the_battery(tmp_path):
    server, got = _listening_server()
    port = server.getsockname()[1]
    secret = tmp_path / "secret"
    secret.write_text("SECRET-" + secrets.token_hex(16))
    secret.chmod(0o600)
    try:
        attacks = {
            "fork": "import os\nos.fork()\ndef f(x): return x + 1",
            "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                       "def f(x): return x + 1",
            "write": f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')\ndef f(x): return x + 1",
            "read": f"open({str(secret)!r}).read()\ndef f(x): return x + 1",
            "kill": f"import os\nos.kill({os.getpid()}, 0)\ndef f(x): return x + 1",
        }
        for name, code in attacks.items():
            assert run(code, limits=KERNEL_ONLY).score == 0.0, name
        assert run("def f(x): return x + 1", limits=KERNEL_ONLY).score == 1.0
        assert got == [] and not (tmp_path / "escaped.txt").exists()
    finally:
        server.close()


def test_parent_survives_and_keeps_its_signal_handlers():
    before = signal.getsignal(signal.SIGINT)
    run("import os, signal\nos.kill(os.getppid(), signal.SIGINT)\ndef f(x): return x + 1")
    assert signal.getsignal(signal.SIGINT) is before
