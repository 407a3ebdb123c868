"""The server under abuse, against the real `pocketr1 serve` subprocess (tests/serving.py) with --api-key:
schemathesis cases from its own /openapi.json (no 5xx, still alive), the key on every API route, oversized
headers and bodies turned away before they are read, and clients that are slow to send or that stop
reading, which must not hold up anybody else. The bigger run is bench/soak.py."""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
from serving import Server, get_json, post_json, request

from pocketr1.serve.toy import random_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import AUTH, KEY, fuzz, soak  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = random_model(tmp_path_factory.mktemp("fuzz") / "toy", context=256)
    server = Server(folder, "--api-key", KEY, "--max-batch", "16")
    yield server
    server.stop()
    assert "Traceback" not in server.stderr, server.stderr[-3000:]


def address(server: Server) -> tuple[str, int]:
    url = urlparse(server.url)
    return url.hostname, url.port


def raw(server: Server, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        data = b""
        try:  # until the answer's head is in (a kept-alive connection would wait for more)
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return data


def chat(server: Server, max_tokens: int = 8, stream: bool = False) -> tuple[int, dict | bytes]:
    model = server.health()["model"]
    body = {"model": model, "messages": [{"role": "user", "content": "Compute 1+2."}], "max_tokens": max_tokens,
            "stream": stream}
    if stream:
        status, data, _ = request(server.url + "/v1/chat/completions", body, AUTH, method="POST")
        return status, data
    return post_json(server.url + "/v1/chat/completions", body, AUTH)


# --- fuzzing from the schema ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_schemathesis_cases_never_get_a_5xx(server):
    stats = fuzz(server.url, AUTH, per_operation=10, at_least=100)
    assert stats["cases"] >= 100, stats
    assert stats["server_errors"] == [], stats["server_errors"][:5]
    assert "200" in stats["statuses"] and "400" in stats["statuses"]  # both valid and invalid requests went in
    assert server.health()["status"] == "ok"


# --- the key ---------------------------------------------------------------------------------------------------

def test_every_route_but_health_needs_the_key(server):
    status, schema = get_json(server.url + "/openapi.json", AUTH)
    assert status == 200
    assert get_json(server.url + "/openapi.json")[0] == 401
    routes = [(path.replace("{name}", "x"), method.upper()) for path, ops in schema["paths"].items() for method in ops]
    assert len(routes) >= 4
    for path, method in routes:
        body = b"{}" if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            status = request(server.url + path, body, headers, method=method)[0]
            assert status == (200 if path == "/health" else 401), (path, method, headers, status)
    # The page too: a browser gets a Basic challenge, so it prompts for the key (as the password).
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"anyone:wrong").decode()}
    for path in ("/", "/static/app.js"):
        assert request(server.url + path)[0] == 401
        assert request(server.url + path, headers=wrong)[0] == 401
        assert request(server.url + path, headers=basic)[0] == 200
    assert request(server.url + "/v1/models", headers=basic)[0] == 200  # what the page's own calls then carry


def test_the_key_is_compared_in_constant_time():
    source = (Path(__file__).resolve().parent.parent / "pocketr1" / "serve" / "api.py").read_text()
    assert "hmac.compare_digest(" in source and "== self.key" not in source


# --- oversized requests -------------------------------------------------------------------------------------------

def test_oversized_headers_are_refused_and_the_server_lives_on(server):
    t0 = time.monotonic()
    answer = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:200]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    answer = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:200]
    assert time.monotonic() - t0 < 20
    assert server.health()["status"] == "ok"


def test_oversized_body_is_refused_before_it_is_sent(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100000000\r\n\r\n")
    answer = raw(server, head)  # the 100 MB never follow: the answer must come anyway
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    answer = raw(server, chunked + piece * 20)  # 1.3 MB with no length announced
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert server.health()["status"] == "ok"


# --- slow clients ---------------------------------------------------------------------------------------------------

def test_clients_sending_headers_byte_by_byte_do_not_block_others(server):
    stop = threading.Event()

    def crawl() -> None:
        with socket.create_connection(address(server), timeout=30) as sock:
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 1000:
                if stop.is_set():
                    return
                sock.send(bytes([byte]))
                time.sleep(0.02)

    crawlers = [threading.Thread(target=crawl, daemon=True) for _ in range(8)]
    for t in crawlers:
        t.start()
    time.sleep(0.5)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: chat(server), range(8)))
        assert all(status == 200 for status, _ in results), results
        assert time.monotonic() - t0 < 30
    finally:
        stop.set()
        for t in crawlers:
            t.join(10)


def test_a_stream_nobody_reads_does_not_block_others(server):
    model = server.health()["model"]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Compute 1+2."}],
                       "max_tokens": 200, "stream": True, "n": 4}).encode()
    sock = socket.create_connection(address(server), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)  # the stream is running; this client reads nothing
        t0 = time.monotonic()
        for stream in (False, True):
            status, data = chat(server, stream=stream)
            assert status == 200, data
        assert time.monotonic() - t0 < 30
    finally:
        sock.close()
    assert server.wait_idle(timeout=30)["running"] == 0  # the abandoned stream's rows were freed


def test_a_short_soak_has_no_errors(server):
    result = soak(server.url, server.proc.pid, clients=8, seconds=4)
    assert result["requests"] >= 8, result
    assert result["errors"] == 0, result["error_kinds"]
