"""Generation throughput: pocket-r1's engine against `transformers`' `generate()`, on the same weights.

A random Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 512, tied embeddings) is built with
transformers, saved with `save_pretrained` and loaded back with `pocketr1.model.load_model`. Both then
sample the same left-padded prompts (~20 tokens) at temperature 1 with no top-k / top-p and no stop token,
so every row generates exactly `--new-tokens` tokens. The runs alternate and repeat; the table shows medians.

Both are measured in float32 and in bfloat16, and pocket-r1 at its default (`dtype="auto"`) against
transformers at its default (float32). Offline: nothing is downloaded.

    python bench/engine.py            # batch 64 and 1, 128 new tokens, 3 rounds -> bench/results/engine.json
    python bench/engine.py --quick    # smoke run -> bench/results/engine-quick.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402

from pocketr1.engine import SamplingParams, generate  # noqa: E402
from pocketr1.engine.generate import resolve_dtype  # noqa: E402
from pocketr1.model import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)
PAD = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1], help="batch sizes (default: 64 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    p.add_argument("--rounds", type=int, default=3, help="alternating repetitions; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights, prompts and sampling")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 8 and 1, 16 tokens, 1 round")
    p.add_argument("--out", type=Path, help="JSON output (default: bench/results/engine.json, or "
                                            "engine-quick.json with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.rounds = [8, 1], 16, 1
    args.out = args.out or RESULTS / ("engine-quick.json" if args.quick else "engine.json")
    return args


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": bool(caps.get("avx512_bf16")), "amx_bf16": bool(caps.get("amx_bf16")),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next reading is this run's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def make_prompts(batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + batch)
    lengths = torch.randint(16, 25, (batch,), generator=gen).tolist()
    return [torch.randint(1, MODEL["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def run_ours(model, prompts: list[list[int]], new: int, dtype, seed: int) -> int:
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new, seed=seed)
    out = generate(model, prompts, params, stop_ids=[], pad_id=PAD, dtype=dtype)
    assert all(len(c.ids) == new for c in out)
    return sum(len(c.ids) for c in out)


def run_hf(model, prompts: list[list[int]], new: int, seed: int) -> int:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                             pad_token_id=PAD)
    assert out.shape == (len(prompts), longest + new)
    return len(prompts) * new


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    hf32 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL)).float().eval()
    with tempfile.TemporaryDirectory() as folder:
        hf32.save_pretrained(folder)
        ours = load_model(folder, dtype=torch.float32)
    hf = {"fp32": hf32, "bf16": copy.deepcopy(hf32).to(torch.bfloat16)}
    default = {b: {v: k for k, v in DTYPES.items()}[resolve_dtype(ours, b)] for b in args.batches}
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
          f"transformers {info['transformers']}; pocket-r1's default dtype per batch: {default}")

    runners = {(impl, name): (lambda p, s, impl=impl, name=name: run_ours(ours, p, args.new_tokens, DTYPES[name], s)
                              if impl == "pocketr1" else run_hf(hf[name], p, args.new_tokens, s))
               for name in DTYPES for impl in ("transformers", "pocketr1")}
    times: dict = {(b, key): [] for b in args.batches for key in runners}
    rss: dict = {(b, key): [] for b in args.batches for key in runners}
    for batch in args.batches:  # warm-up (and pocket-r1's bf16 copy of the weights, built once)
        for run in runners.values():
            run(make_prompts(batch, args.seed)[:2], args.seed)
    for r in range(args.rounds):
        for batch in args.batches:
            prompts = make_prompts(batch, args.seed)
            keys = list(runners) if r % 2 == 0 else list(reversed(runners))  # alternate who goes first
            for key in keys:
                reset_peak_rss()
                t0 = time.perf_counter()
                tokens = runners[key](prompts, args.seed + r)
                times[batch, key].append((time.perf_counter() - t0, tokens))
                rss[batch, key].append(peak_rss_mb())

    rows, ratios = [], {}
    for batch in args.batches:
        med = {}
        for impl, name in runners:
            samples = times[batch, (impl, name)]
            secs = statistics.median(t for t, _ in samples)
            tokens = samples[0][1]
            peak = [m for m in rss[batch, (impl, name)] if m is not None]
            med[impl, name] = tokens / secs
            rows.append({"batch": batch, "impl": impl, "dtype": name, "default": name == (
                default[batch] if impl == "pocketr1" else "fp32"), "tokens_per_s": round(tokens / secs, 1),
                "ms_per_step": round(secs / args.new_tokens * 1e3, 3),
                "peak_rss_mb": round(max(peak), 1) if peak else None,
                "seconds": [round(t, 4) for t, _ in samples]})
        ratios[str(batch)] = {
            "fp32": round(med["pocketr1", "fp32"] / med["transformers", "fp32"], 2),
            "bf16": round(med["pocketr1", "bf16"] / med["transformers", "bf16"], 2),
            "default": round(med["pocketr1", default[batch]] / med["transformers", "fp32"], 2)}

    print(f"\n{'batch':>5}  {'engine':<12} {'dtype':<5} {'tokens/s':>9} {'ms/step':>8} {'peak RSS MB':>11}")
    for row in rows:
        mark = "*" if row["default"] else " "
        print(f"{row['batch']:>5}  {row['impl']:<12} {row['dtype']:<5}{mark}{row['tokens_per_s']:>9.0f} "
              f"{row['ms_per_step']:>8.2f} {row['peak_rss_mb'] or float('nan'):>11.0f}")
    print("* = the engine's default dtype.  Peak RSS is the whole process's (both models loaded) during the run.")
    print(f"\nspeed-up of pocket-r1 over transformers (median of {args.rounds} rounds):")
    for batch, r in zip(args.batches, ratios.values()):
        print(f"  batch {batch:>3}: fp32 vs fp32 {r['fp32']:.2f}x   bf16 vs bf16 {r['bf16']:.2f}x   "
              f"default ({default[batch]}) vs default (fp32) {r['default']:.2f}x")

    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"benchmark": "engine", "machine": info, "model": MODEL,
              "settings": {"new_tokens": args.new_tokens, "rounds": args.rounds, "prompt_tokens": "16-24",
                           "sampling": "temperature 1, top_p 1, top_k 0, no stop tokens", "quick": args.quick,
                           "pocketr1_default_dtype": {str(b): d for b, d in default.items()}, "transformers_default_dtype": "fp32"},
               "rows": rows, "speedup": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
