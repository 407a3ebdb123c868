"""`pocketr1 serve` as clients see it: the official `openai` package and `curl` against the real server in a
subprocess, on two toy models built in a second (see `pocketr1.serve.toy`): a random one whose every token
depends on its whole context and that never stops early, and a scripted one whose reply (thinking, then
`</think>`, then the answer) is known. Plus the engine's continuous batching checked in-process against a
plain full-context forward."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
from serving import Server, get_json, post_json, request

from pocketr1.serve.toy import SCRIPT, random_model, scripted_model

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
THOUGHT, ANSWER = SCRIPT.split("</think>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return random_model(root / "rand", context=1024), scripted_model(root / "script")


@pytest.fixture(scope="module")
def rand(models):
    server = Server(models[0], "--api-key", KEY)
    yield server
    server.stop()
    assert "Traceback" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def script(models):
    server = Server(models[1])
    yield server
    server.stop()
    assert "Traceback" not in server.stderr, server.stderr


def client(server: Server, key: str = KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(server, content="Compute 1+2.", **kw):
    model = kw.pop("model", None) or server.health()["model"]
    return client(server).chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def stream_chat(server, content="Compute 1+2.", **kw) -> tuple[str, str, list[str | None], object, list]:
    """(reasoning, content, finish reasons, usage, chunks) of a streamed chat completion; the reasoning is
    read from each raw chunk's `reasoning_content`, which the openai package keeps as an extra field."""
    chunks = list(chat(server, content, stream=True, stream_options={"include_usage": True}, **kw))
    reasoning = content_text = ""
    finish = []
    for c in chunks[:-1]:
        delta = c.choices[0].delta
        extra = delta.model_extra or {}
        assert extra.get("reasoning_content") == extra.get("reasoning")
        reasoning += extra.get("reasoning_content") or ""
        content_text += delta.content or ""
        finish.append(c.choices[0].finish_reason)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return reasoning, content_text, finish, chunks[-1].usage, chunks


# --- the wire format through the openai package ------------------------------------------------------------

def test_health_and_models(rand):
    status, body = get_json(rand.url + "/health")  # no key needed
    assert status == 200 and body["status"] == "ok" and body["model"] == "rand"
    assert [m.id for m in client(rand).models.list()] == ["rand"]
    assert client(rand).models.retrieve("rand").id == "rand"


def test_thinking_split_non_stream_and_stream(script):
    reply = chat(script, max_tokens=100)
    message = reply.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == THOUGHT == message.model_extra["reasoning"]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + \
        reply.usage.completion_tokens
    reasoning, content, finish, usage, chunks = stream_chat(script, max_tokens=100)
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert usage.completion_tokens == reply.usage.completion_tokens
    # Thinking never leaks into content: every chunk carries one or the other.
    for c in chunks[1:-1]:
        assert not (c.choices[0].delta.content and (c.choices[0].delta.model_extra or {}).get("reasoning_content"))


def test_stop_strings_cut_the_text(script):
    for stop in (["three"], "gives th"):
        reply = chat(script, stop=stop)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.choices[0].message.model_extra["reasoning_content"] == THOUGHT.split(
            stop[0] if isinstance(stop, list) else stop)[0]
        assert reply.choices[0].message.content == ""
        reasoning, _, finish, _, _ = stream_chat(script, stop=stop)
        assert reasoning == reply.choices[0].message.model_extra["reasoning_content"] and finish[-1] == "stop"


def test_length_limit_seed_and_n(rand):
    reply = chat(rand, max_tokens=9, seed=5, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 27
    texts = [c.message.model_extra["reasoning_content"] for c in reply.choices]
    assert len(set(texts)) == 3  # each choice samples on its own
    again = chat(rand, max_tokens=9, seed=5, n=3)
    assert [c.message.model_extra["reasoning_content"] for c in again.choices] == texts
    greedy = [chat(rand, max_tokens=9, temperature=0).choices[0].message.model_extra["reasoning_content"]
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    reasoning, content, finish, usage, _ = stream_chat(rand, max_tokens=9, seed=5)
    assert (reasoning, content, finish[-1], usage.completion_tokens) == (texts[0], "", "length", 9)


def test_completions_endpoint(rand):
    c = client(rand)
    reply = c.completions.create(model="rand", prompt=["One two", "three"], max_tokens=6, n=2, seed=3)
    assert [ch.index for ch in reply.choices] == [0, 1, 2, 3]
    assert all(ch.finish_reason == "length" and ch.text for ch in reply.choices)
    streamed = [""] * 4
    for chunk in c.completions.create(model="rand", prompt=["One two", "three"], max_tokens=6, n=2, seed=3,
                                      stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == [ch.text for ch in reply.choices]


def test_errors_through_openai_client(rand):
    with pytest.raises(openai.NotFoundError) as e:
        chat(rand, model="gpt-4o")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(rand, "word " * 3000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        client(rand, key="wrong").models.list()


# --- errors on the wire: OpenAI's shape, the right status, never a crash -----------------------------------

def _chat_body(**kw) -> dict:
    return {"model": "rand", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | kw


BAD_REQUESTS = [  # (body, status, param or code it must name)
    (b'{"model": "rand", "messages": [', 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    (b"[" * 50_000 + b"]" * 50_000, 400, None),
    (b'{"model": "rand", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ({"model": "rand"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    (_chat_body(messages=[]), 400, "messages"),
    (_chat_body(model="nope"), 404, "model_not_found"),
    (_chat_body(messages=[{"role": "user", "content": "word " * 3000}]), 400, "context_length_exceeded"),
    (_chat_body(max_tokens=0), 400, "max_tokens"),
    (_chat_body(max_tokens=10**30), 400, "context_length_exceeded"),
    (_chat_body(max_tokens="ten"), 400, "max_tokens"),
    (_chat_body(messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "ok", "reasoning_content": "hmm"}]),
     400, "messages.1.reasoning_content"),
    (_chat_body(temperature=-1), 400, "temperature"),
    (_chat_body(temperature="hot"), 400, "temperature"),
    (_chat_body(top_p=1.5), 400, "top_p"),
    (_chat_body(n=0), 400, "n"),
    (_chat_body(n=1000), 400, "n"),
    (_chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (_chat_body(stop=5), 400, "stop"),
    (_chat_body(seed="x"), 400, "seed"),
    (_chat_body(seed=2**70), 400, "seed"),
    (_chat_body(stream="maybe"), 400, "stream"),
    (_chat_body(logprobs=True), 400, "logprobs"),
    (_chat_body(messages=[{"role": "tool", "content": "hi"}]), 400, "messages.0.role"),
    (_chat_body(messages=[{"role": "user", "content": 42}]), 400, "messages.0.content"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content"),
    (_chat_body(messages="hi"), 400, "messages"),
]


def test_bad_requests_get_openai_errors(rand):
    url = rand.url + "/v1/chat/completions"
    for body, status, mention in BAD_REQUESTS:
        got, reply = post_json(url, body, AUTH)
        assert got == status, (body if len(str(body)) < 300 else str(body)[:300], got, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], reply
        if mention:
            assert mention == error["code"] or mention in (error["param"] or ""), (mention, reply)
    completions = rand.url + "/v1/completions"
    for prompt in ([], [10**6], [-1], [[5], [-5]]):
        got, reply = post_json(completions, {"model": "rand", "prompt": prompt}, AUTH)
        assert got == 400 and reply["error"]["param"] == "prompt", (prompt, reply)
    for head in (f"Content-Length: {2 << 20}", "Transfer-Encoding: chunked"):  # declared, or counted
        assert _oversized(rand, head).startswith(b"HTTP/1.1 413"), head
    status, reply = post_json(url, _chat_body(), {"Authorization": "Bearer wrong"})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert post_json(url, _chat_body())[0] == 401
    status, raw, _ = request(url, json.dumps(_chat_body()).encode(), AUTH | {"Content-Type": "text/plain"},
                             method="POST")
    assert status == 400 and "application/json" in json.loads(raw)["error"]["message"]
    status, reply = get_json(rand.url + "/v1/nothing", AUTH)
    assert status == 404 and set(reply["error"]) == {"message", "type", "param", "code"}
    assert rand.health()["status"] == "ok"  # still serving


def _oversized(server: Server, head: str) -> bytes:
    """Announce a body over 1 MiB (the server answers at once), or send 1 MiB + 64 KiB in chunks and no more
    (the server has read all of it when it answers, so closing sends no reset that could eat the answer)."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}"
                     f"\r\nContent-Type: application/json\r\n{head}\r\n\r\n".encode())
        for _ in range(17 if "chunked" in head else 0):
            sock.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
        return _read_until(sock, b"\r\n\r\n")


# --- curl -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stream_and_non_stream(script):
    url = script.url + "/v1/chat/completions"
    body = json.dumps({"model": "script", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    done = subprocess.run(["curl", "-sS", "-N", "-i", "--max-time", "60", url, "-H",
                           "Content-Type: application/json", "-d", body], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    head, _, events = done.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    lines = [line for line in events.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    body = json.dumps({"model": "script", "messages": [{"role": "user", "content": "hi"}]})
    done = subprocess.run(["curl", "-sS", "--max-time", "60", url, "-H", "Content-Type: application/json",
                           "-d", body], capture_output=True, text=True)
    assert json.loads(done.stdout)["choices"][0]["message"]["content"] == ANSWER


# --- many users at once -----------------------------------------------------------------------------------

def test_32_concurrent_streams_match_each_alone(rand):
    """32 streaming clients at once, greedy and seeded sampling mixed, prompts and lengths all different:
    each gets exactly the text it gets when it is the only request."""
    words = "one two three four five six seven eight nine ten".split()
    asks = [(" ".join(words[i % 7:i % 7 + 1 + i % 9]) + f" #{i}",
             {"seed": 100 + i, "max_tokens": 12 + (i * 7) % 29,
              **({"temperature": 0} if i % 4 == 0 else {"temperature": 0.6 + 0.1 * (i % 5), "top_p": 0.9})})
            for i in range(32)]
    busiest, stop = [0], threading.Event()

    def watch():  # proof the requests really ran as one batch
        while not stop.is_set():
            busiest[0] = max(busiest[0], rand.health()["running"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = threading.Barrier(32)

    def one(ask):
        start.wait()
        return stream_chat(rand, ask[0], **ask[1])[:4]

    try:
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(one, asks))
    finally:
        stop.set()
        watcher.join()
    alone = [stream_chat(rand, text, **kw)[:4] for text, kw in asks]
    for (text, kw), got, ref in zip(asks, together, alone, strict=True):
        assert got[:3] == ref[:3], (text, kw)
        assert got[3].completion_tokens == ref[3].completion_tokens == kw["max_tokens"]
    assert len({r[0] for r in together}) == 32
    assert busiest[0] >= 16, busiest


def _open_stream(server: Server, body: dict, headers: dict | None = None) -> socket.socket:
    """POST a request on a raw socket (so the test can hang up at will); returns the socket."""
    url = urlparse(server.url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


def _read_until(sock: socket.socket, marker: bytes, limit: float = 30) -> bytes:
    got, deadline = b"", time.monotonic() + limit
    while marker not in got:
        assert time.monotonic() < deadline, got[-500:]
        chunk = sock.recv(65536)
        assert chunk, got[-500:]
        got += chunk
    return got


def test_disconnect_frees_the_row_at_once(rand):
    for stream in (True, False):
        rand.wait_idle()
        before = rand.health()["generated_tokens"]
        body = _chat_body(max_tokens=1000, stream=stream, temperature=0)
        sock = _open_stream(rand, body, AUTH)
        if stream:
            _read_until(sock, b"reasoning_content")  # generation is under way
        else:
            deadline = time.monotonic() + 30
            while rand.health()["running"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        sock.close()
        after = rand.wait_idle(timeout=5)["generated_tokens"]
        # Generating all 1000 tokens would take over a second; the row was freed long before.
        assert after - before < 700, (stream, after - before)


def test_bounded_queue_keepalive_and_a_freed_row(models):
    server = Server(models[0], "--max-batch", "1", "--queue", "1", "--keepalive", "0.2")
    try:
        body = {"model": "rand", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        first = _open_stream(server, body | {"max_tokens": 1000, "temperature": 0})
        _read_until(first, b"reasoning_content")  # holds the only row
        second = _open_stream(server, body | {"max_tokens": 5})
        _read_until(second, b": keep-alive")  # waiting in the queue, told so
        status, reply = post_json(server.url + "/v1/chat/completions", body)
        assert status == 429 and reply["error"]["code"] == "queue_full"
        first.close()  # its row goes to the waiting request
        events = _read_until(second, b"data: [DONE]", limit=10).split(b"\r\n")
        assert any(b'"finish_reason":"length"' in line for line in events)
        second.close()
    finally:
        server.stop()
    assert "Traceback" not in server.stderr, server.stderr


def test_usage_is_cumulative_over_choices_of_many_prompts(rand):
    conn = http.client.HTTPConnection(urlparse(rand.url).netloc, timeout=30)
    body = {"model": "rand", "prompt": ["a", "b c"], "n": 2, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), AUTH | {"Content-Type": "application/json"})
    lines = [line for line in conn.getresponse().read().decode().split("\n") if line.startswith("data: ")]
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(json.loads(line[6:])["usage"] is None for line in lines[:-2])
