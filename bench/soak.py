"""The server under abuse: `pocketr1 serve` (a subprocess, as a user runs it, with --api-key) fuzzed by
schemathesis from its own /openapi.json, then soaked by N concurrent clients for a while.

- fuzz: for every operation of the schema, Hypothesis-generated valid ("positive") and invalid ("negative")
  requests; a case fails if the server answers 5xx or stops answering. Cases the HTTP client itself
  refuses to send (e.g. a header value it cannot encode) are counted apart.
- soak: N threads, each sending chat completions back to back (streamed and not, in turn) for D seconds;
  an error is any status other than 200, a stream that does not end in [DONE], or a connection failure.
  The server's RSS is sampled every second: flat memory = the last quarter's mean within a few percent of
  the second quarter's (after warm-up).

    python bench/soak.py                                   # 1000+ fuzz cases, 64 clients x 600 s -> results/soak.json
    python bench/soak.py --cases 200 --clients 16 --seconds 30 --quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server(folder: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pocketr1", "serve", str(folder), "--port", "0", "--device", "cpu",
                             "--api-key", KEY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line} {proc.stderr.read()[-3000:]}")
    return proc, line.split(" at ", 1)[1].split()[0]


def fuzz(url: str, headers: dict, per_operation: int, seed: int = 0, at_least: int = 0) -> dict:
    """schemathesis cases for every operation in both generation modes (rounds with new seeds until `at_least`
    cases were sent); the 5xx answers and the cases the client library refused to send."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
    model = json.loads(_get(url, "/v1/models"))["data"][0]["id"]
    stats = {"cases": 0, "not_sent": 0, "server_errors": [], "statuses": Counter()}
    operations = [result.ok() for result in schema.get_all_operations()]
    while True:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _fuzz_operation(url, headers, operation, mode, per_operation, seed, model, stats)
                except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                    pass
        if stats["cases"] >= at_least:
            break
        seed += 1
    stats["statuses"] = {str(k): v for k, v in sorted(stats["statuses"].items())}
    return stats


def _fuzz_operation(url: str, headers: dict, operation, mode, examples: int, seed: int, model: str,
                    stats: dict) -> None:
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    positive = mode == GenerationMode.POSITIVE

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def one(case) -> None:
        if positive and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model  # else nearly every valid request stops at "no such model"
        try:
            response = case.call(base_url=url, headers=headers, timeout=120)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
            stats["not_sent"] += 1  # refused by the client library before anything was sent
            return
        stats["cases"] += 1
        stats["statuses"][response.status_code] += 1
        if response.status_code >= 500:
            stats["server_errors"].append(f"{operation.label}: {response.status_code} {response.text[:300]}")

    one()


def chat_once(url: str, model: str, stream: bool, seed: int, max_tokens: int) -> str | None:
    """One chat completion over its own connection; None if it went well, else what went wrong."""
    host = urlparse(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
    body = {"model": model, "messages": [{"role": "user", "content": f"Compute {seed % 97}+{seed % 13}."}],
            "max_tokens": max_tokens, "stream": stream, "seed": seed}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {**AUTH, "Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            return f"status {response.status}: {data[:200]!r}"
        if stream and not data.rstrip().endswith(b"data: [DONE]"):
            return "stream did not end in [DONE]"
        if not stream and "choices" not in json.loads(data):
            return "no choices"
        return None
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def soak(url: str, pid: int, clients: int, seconds: float, max_tokens: int = 16) -> dict:
    """`clients` threads sending requests back to back for `seconds`; errors and the server's RSS over time."""
    model = json.loads(_get(url, "/v1/models"))["data"][0]["id"]
    stop = time.monotonic() + seconds
    served, errors, lock = Counter(), Counter(), threading.Lock()

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            problem = chat_once(url, model, stream=n % 2 == 0, seed=i * 100_003 + n, max_tokens=max_tokens)
            with lock:
                served["requests"] += 1
                if problem:
                    errors[problem[:80]] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    rss = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(round(rss_mib(pid), 1))
        time.sleep(1.0)
    for t in threads:
        t.join()
    quarter = max(1, len(rss) // 4)
    early, late = statistics.mean(rss[quarter:2 * quarter] or rss), statistics.mean(rss[-quarter:])
    return {"clients": clients, "seconds": seconds, "requests": served["requests"],
            "errors": sum(errors.values()), "error_kinds": dict(errors), "rss_mib": rss,
            "rss_growth_pct": round(100 * (late - early) / early, 1)}


def _get(url: str, path: str) -> bytes:
    host = urlparse(url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        conn.request("GET", path, headers=AUTH)
        return conn.getresponse().read()
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="fuzz cases in all (spread over operations and modes)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="don't write results/soak.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pocketr1.serve.toy import random_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model(Path(tmp) / "toy", context=256)
        proc, url = start_server(folder, "--max-batch", "64", "--queue", "256")
        try:
            t0 = time.monotonic()
            fuzzed = fuzz(url, AUTH, per_operation=max(10, args.cases // 6), at_least=args.cases)
            fuzz_s = time.monotonic() - t0
            alive = json.loads(_get(url, "/health"))["status"] == "ok"
            print(f"fuzz: {fuzzed['cases']} cases ({fuzzed['not_sent']} not sendable) in {fuzz_s:.0f} s, "
                  f"{len(fuzzed['server_errors'])} 5xx, server alive: {alive}; statuses {fuzzed['statuses']}")
            soaked = soak(url, proc.pid, args.clients, args.seconds, args.max_tokens)
            print(f"soak: {soaked['clients']} clients x {soaked['seconds']:.0f} s: {soaked['requests']} requests, "
                  f"{soaked['errors']} errors {soaked['error_kinds'] or ''}; RSS {soaked['rss_mib'][0]} -> "
                  f"{soaked['rss_mib'][-1]} MiB ({soaked['rss_growth_pct']:+.1f}% from the 2nd to the last quarter)")
            crashed = proc.poll() is not None
        finally:
            proc.terminate()
            stderr = proc.communicate(timeout=30)[1]
    result = {"fuzz": fuzzed | {"seconds": round(fuzz_s, 1), "alive_after": alive}, "soak": soaked,
              "server_crashed": crashed, "server_tracebacks": stderr.count("Traceback")}
    if not args.quick:
        out = ROOT / "bench" / "results" / "soak.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {out}")
    bad = fuzzed["server_errors"] or soaked["errors"] or crashed or not alive
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
