"""Serving throughput: aggregate tokens/s and time to first token of `pocketr1 serve` under 1..32 concurrent
streaming clients.

The server runs as a user runs it (`python -m pocketr1 serve FOLDER`, a subprocess, float32), by default on
a toy random model the size of the `tiny` preset (hidden 64, 2 layers, vocab 320; see
`pocketr1.serve.toy.random_model`), which never stops early: every stream generates exactly
`--max-tokens` tokens. Each level starts its clients together (a barrier); each client streams one chat
completion over plain HTTP (stdlib `http.client`, one thread each, so the client side stays light) with its
own seed at T=0.6, top-p 0.95, and `stream_options.include_usage` for the token count.

- aggregate tokens/s: all completion tokens of a level / wall time from the first request to the last [DONE]
- TTFT: from sending a request to its first chunk of text (the role chunk that opens a stream is not text)

The clients share the machine with the server, as they would on a laptop.

    python bench/serve.py                      # levels 1 8 16 32, 256 tokens, best of 3 -> results/serve.json
    python bench/serve.py --model runs/latest  # a real model folder (or run folder)
    python bench/serve.py --quick              # smoke run: levels 1 and 4, 16 tokens -> serve-quick.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pocketr1.fsutil import write_json
from pocketr1.serve.toy import random_model

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model or run folder (default: a toy random model, tiny preset size)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16, 32], help="concurrency levels")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per stream (default: 256)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions per level; the table shows the best")
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1 and 4, 16 tokens, 1 round")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/serve.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.max_tokens, args.rounds = [1, 4], 16, 1
    args.out = args.out or RESULTS / ("serve-quick.json" if args.quick else "serve.json")
    return args


def start_server(folder: Path, max_batch: int) -> tuple[subprocess.Popen, str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pocketr1", "serve", str(folder), "--port", "0",
                             "--max-batch", str(max_batch), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    model, url = line.split("serve: ", 1)[1].split(" at ")
    return proc, model, url.split()[0]


def stream_once(host: str, model: str, seed: int, max_tokens: int, start: threading.Barrier) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Question number {seed}?"}],
                       "max_tokens": max_tokens, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, timeout=600)
    start.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        text = b'"reasoning_content"' in line or (b'"content":"' in line and b'"content":""' not in line)
        if first is None and text:
            first = time.perf_counter()
        if b'"usage":{' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        if line.startswith(b"data: [DONE]"):
            break
    done = time.perf_counter()
    conn.close()
    return {"sent": sent, "first": first or done, "done": done, "tokens": tokens}


def run_level(host: str, model: str, streams: int, max_tokens: int, round_: int) -> dict:
    start = threading.Barrier(streams)
    results: list[dict] = [{}] * streams

    def client(i: int) -> None:
        results[i] = stream_once(host, model, 1000 * round_ + i, max_tokens, start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    ttft = sorted((r["first"] - r["sent"]) * 1000 for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"streams": streams, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(ttft), 1),
            "ttft_p99_ms": round(ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))], 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or random_model(Path(tmp) / "tiny-random", context=1024)
        proc, model, url = start_server(folder, max(args.streams))
        try:
            host = url.removeprefix("http://")
            run_level(host, model, 2, 8, 0)  # warm-up: first-call costs out of the figures
            rows = []
            for streams in args.streams:
                runs = [run_level(host, model, streams, args.max_tokens, r) for r in range(args.rounds)]
                rows.append(max(runs, key=lambda r: r["tokens_per_s"]))
        finally:
            proc.terminate()
            proc.wait(30)
    single = next((r["tokens_per_s"] for r in rows if r["streams"] == 1), None)
    print(f"pocketr1 serve, {model}, {args.max_tokens} tokens per stream, best of {args.rounds}")
    print(f"{'streams':>7} {'tokens/s':>9} {'vs 1':>6} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / single, 2) if single else None
        ratio = f"{r['speedup']:.1f}x" if single else "-"
        print(f"{r['streams']:>7} {r['tokens_per_s']:>9.0f} {ratio:>6} {r['ttft_p50_ms']:>12.0f} "
              f"{r['ttft_p99_ms']:>12.0f}")
    write_json(args.out, {"model": model, "max_tokens": args.max_tokens, "rounds": args.rounds, "rows": rows,
                          "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                          "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
