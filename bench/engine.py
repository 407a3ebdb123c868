"""Generation throughput: pocket-r1's engine against `transformers`' `generate()`, on the same weights.

A random Qwen2 (hidden 256, intermediate 768, 4 layers, 4 heads / 2 KV heads, vocab 512, tied embeddings)
is built with transformers from a config, saved with `save_pretrained` and loaded back with
`pocketr1.model.load_model`. Both engines then sample the same left-padded prompts (16-24 tokens) at
temperature 1 with no top-k / top-p and no stop token, so every row generates exactly `--new-tokens`
tokens. Runs alternate between the engines and repeat; the table shows medians.

Both engines are measured in float32 and in bfloat16 (transformers on a bf16 copy of the model, pocket-r1
with `dtype=torch.bfloat16`), and the summary also compares each at its default: pocket-r1's
`dtype="auto"` (see `pocketr1.engine.generate`) against transformers' float32. pocket-r1 runs batches on a
frozen copy of the weights that it caches; the time to build it is reported separately.

Offline: nothing is downloaded. OpenMP threads are set to wait passively unless OMP_WAIT_POLICY is set:
on a shared machine, spinning threads that lose their core slow every parallel op down by 10-100x.

    python bench/engine.py              # batches 64 and 1, 128 new tokens, 3 rounds -> results/engine.json
    python bench/engine.py --threads 1  # steadier figures on a busy machine
    python bench/engine.py --quick      # smoke run -> results/engine-quick.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (sets the offline / OpenMP environment before torch starts)
import torch  # noqa: E402
import transformers  # noqa: E402
from common import MODEL, RESULTS, machine, peak_rss_mb, reset_peak_rss, start, write_result  # noqa: E402

from pocketr1.engine import SamplingParams, generate  # noqa: E402
from pocketr1.engine.generate import resolve_dtype  # noqa: E402
from pocketr1.model import load_model  # noqa: E402

PAD = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINES = ("transformers", "pocketr1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1], help="batch sizes (default: 64 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    p.add_argument("--rounds", type=int, default=3, help="alternating repetitions, medians (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both engines (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights, prompts and sampling")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 8 and 1, 16 tokens, 1 round")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/engine.json, or "
                                            "engine-quick.json with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.rounds = [8, 1], 16, 1
    args.out = args.out or RESULTS / ("engine-quick.json" if args.quick else "engine.json")
    return args


def make_prompts(batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + batch)
    lengths = torch.randint(16, 25, (batch,), generator=gen).tolist()
    return [torch.randint(1, MODEL["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def run_pocketr1(model, prompts: list[list[int]], new: int, dtype: torch.dtype, seed: int) -> None:
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new, seed=seed)
    out = generate(model, prompts, params, stop_ids=[], pad_id=PAD, dtype=dtype)
    assert all(len(c.ids) == new for c in out)


def run_transformers(model, prompts: list[list[int]], new: int, seed: int) -> None:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                             pad_token_id=PAD)
    assert out.shape == (len(prompts), longest + new)


def main(argv=None) -> None:
    args = parse_args(argv)
    start(args.threads)
    torch.manual_seed(args.seed)
    hf32 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL)).float().eval()
    with tempfile.TemporaryDirectory() as folder:
        hf32.save_pretrained(folder)
        ours = load_model(folder, dtype=torch.float32)
    hf = {"fp32": hf32, "bf16": copy.deepcopy(hf32).to(torch.bfloat16)}
    name_of = {v: k for k, v in DTYPES.items()}
    default = {b: name_of[resolve_dtype(ours, b)] for b in args.batches}
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
          f"torch {info['torch']}, transformers {info['transformers']}, "
          f"OMP_WAIT_POLICY={info['omp_wait_policy']}")

    def run(engine: str, name: str, prompts: list[list[int]], seed: int) -> None:
        if engine == "pocketr1":
            run_pocketr1(ours, prompts, args.new_tokens, DTYPES[name], seed)
        else:
            run_transformers(hf[name], prompts, args.new_tokens, seed)

    keys = [(engine, name) for name in DTYPES for engine in ENGINES]
    build_ms = {}
    for name, dtype in DTYPES.items():  # what the first batched call of a new model (or GRPO step) pays
        t0 = time.perf_counter()
        ours.frozen(dtype)
        build_ms[name] = round((time.perf_counter() - t0) * 1e3, 1)
    for batch in args.batches:  # warm-up, and pocket-r1's frozen copies (cached from here on)
        for key in keys:
            run(*key, make_prompts(batch, args.seed), args.seed)
    times = {(b, key): [] for b in args.batches for key in keys}
    peaks = {(b, key): [] for b in args.batches for key in keys}
    for r in range(args.rounds):
        for batch in args.batches:
            prompts = make_prompts(batch, args.seed)
            for key in keys if r % 2 == 0 else keys[::-1]:  # alternate who goes first
                reset_peak_rss()
                t0 = time.perf_counter()
                run(*key, prompts, args.seed + r)
                times[batch, key].append(time.perf_counter() - t0)
                peaks[batch, key].append(peak_rss_mb())

    rows, speedup = [], {}
    for batch in args.batches:
        rate = {}
        for engine, name in keys:
            secs = statistics.median(times[batch, (engine, name)])
            peak = [m for m in peaks[batch, (engine, name)] if m is not None]
            rate[engine, name] = batch * args.new_tokens / secs
            rows.append({"batch": batch, "engine": engine, "dtype": name,
                         "default": name == (default[batch] if engine == "pocketr1" else "fp32"),
                         "tokens_per_s": round(rate[engine, name], 1),
                         "ms_per_step": round(secs / args.new_tokens * 1e3, 3),
                         "peak_rss_mb": round(max(peak), 1) if peak else None,
                         "seconds": [round(t, 4) for t in times[batch, (engine, name)]]})
        speedup[str(batch)] = {
            "fp32": round(rate["pocketr1", "fp32"] / rate["transformers", "fp32"], 2),
            "bf16": round(rate["pocketr1", "bf16"] / rate["transformers", "bf16"], 2),
            "default": round(rate["pocketr1", default[batch]] / rate["transformers", "fp32"], 2),
            "pocketr1_default_dtype": default[batch]}

    print(f"\n{'batch':>5}  {'engine':<12} {'dtype':<6} {'tokens/s':>9} {'ms/step':>8} {'peak RSS MB':>11}")
    for row in rows:
        dtype = row["dtype"] + ("*" if row["default"] else "")
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        print(f"{row['batch']:>5}  {row['engine']:<12} {dtype:<6} {row['tokens_per_s']:>9.0f} "
              f"{row['ms_per_step']:>8.2f} {rss:>11}")
    print("* each engine's default dtype. Peak RSS: the whole process (both engines' models) during the run.")
    print(f"pocket-r1's frozen copy, built once per weights version: {build_ms['fp32']} ms fp32, "
          f"{build_ms['bf16']} ms bf16 (not in the timings)")
    print(f"\npocket-r1 / transformers tokens/s, medians of {args.rounds} rounds:")
    for batch in args.batches:
        s = speedup[str(batch)]
        print(f"  batch {batch:>3}: fp32 vs fp32 {s['fp32']:.2f}x   bf16 vs bf16 {s['bf16']:.2f}x   "
              f"defaults ({default[batch]} vs fp32) {s['default']:.2f}x")

    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"benchmark": "engine", "machine": info, "model": MODEL,
              "settings": {"batches": args.batches, "new_tokens": args.new_tokens, "rounds": args.rounds,
                           "prompt_tokens": "16-24, left-padded", "quick": args.quick,
                           "sampling": "temperature 1, top_p 1, top_k 0, no stop tokens"},
              "frozen_copy_build_ms": build_ms, "rows": rows, "speedup": speedup}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
