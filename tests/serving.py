"""Running the real `pocketr1 serve` in a subprocess for the server and page tests, and small HTTP helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import CLI, cli_env


class Server:
    """`pocketr1 serve FOLDER --port 0 ARGS...`; the URL comes from the line it prints once listening."""

    def __init__(self, folder: Path, *args: str, timeout: float = 60):
        self.proc = subprocess.Popen([*CLI, "serve", str(folder), "--port", "0", "--device", "cpu", *args],
                                     env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or " at http://" not in line[0]:
            self.stop()
            raise RuntimeError(f"server did not start: {line} {self.proc.stderr.read()[-3000:]}")
        self.url = line[0].split(" at ", 1)[1].split()[0]
        self.stderr = ""

    def health(self) -> dict:
        return get_json(self.url + "/health")[1]

    def wait_idle(self, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while (h := self.health())["running"] or h["waiting"]:
            assert time.monotonic() < deadline, h
            time.sleep(0.02)
        return h

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = self.proc.stderr.read()


def request(url: str, body: bytes | dict | None = None, headers: dict | None = None,
            method: str | None = None) -> tuple[int, bytes, dict]:
    """One HTTP request: (status, body, headers), error statuses included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json"} | (headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    status, body, _ = request(url, headers=headers)
    return status, json.loads(body)


def post_json(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    status, raw, _ = request(url, body, headers, method="POST")
    return status, json.loads(raw)
