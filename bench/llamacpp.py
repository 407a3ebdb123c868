"""Single-stream decoding: pocket-r1 against llama.cpp (llama-cpp-python) on the same weights, at batch 1.

The model is DeepSeek-R1-Distill-Qwen-1.5B's shape with random bf16 weights (built once by bench/bigmodel.py
into the gitignored bench/cache/), exported with `pocketr1 export` to GGUF F16 and Q8_0. Pairs at matching
precision:
- llama.cpp F16 against pocket-r1's bf16 model as loaded (what `generate` runs for one row today) and against
  its prepacked copy (`model.frozen(bf16)`, what `generate` runs for batches of 4 rows and more);
- llama.cpp Q8_0 against pocket-r1's int8 path (`load_model(..., int8=True)`, per-channel int8 weights whose
  matmul rounds activations to 8 bits, as Q8_0's does), when modify/quantize.py is there.
Each measurement prefills 16 tokens, then times single-token decode steps (logits over the whole vocabulary
included) and takes the median step. Rounds alternate the engines (who goes first flips every round); the
table shows medians over rounds and pocket-r1 / llama.cpp.

The bandwidth bound: decoding one token reads every weight once (the embedding table only one row), so
tokens/s can't exceed memory bandwidth / weight bytes per token. Bandwidth is measured here, read-only, with
`torch.sum` over a 1 GiB tensor on the same threads, once per round; the bound uses the best round.

    python bench/llamacpp.py                    # 2 threads, 16 steps, 5 rounds -> results/llamacpp.json
    python bench/llamacpp.py --quick            # 1 round of 8 steps -> results/llamacpp-quick.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (sets the offline / OpenMP environment before torch starts)
import torch  # noqa: E402
from bigmodel import CACHE, SHAPE, build_bf16, decode_ms  # noqa: E402

BF16 = CACHE / "r1-distill-qwen-1.5b-shape"  # the folder bench/bigmodel.py builds
from common import RESULTS, describe, machine, median, start, write_result  # noqa: E402

PREFILL = 16
PEER = {"bf16": "f16", "bf16 packed": "f16", "int8": "q8_0"}  # pocket-r1's weights -> llama.cpp's at that precision


def gguf_path(kind: str) -> Path:
    return CACHE / f"{BF16.name}-{kind}.gguf"


def ensure_gguf(kind: str) -> Path:
    """The exported file, re-exported when the model folder is newer than it."""
    from pocketr1.modify.export import export_gguf

    path = gguf_path(kind)
    source = BF16 / "model.safetensors"
    if not path.is_file() or path.stat().st_mtime < source.stat().st_mtime:
        began = time.perf_counter()
        export_gguf(BF16, path, kind)
        print(f"exported {path.name} in {time.perf_counter() - began:.0f} s", flush=True)
    return path


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step reads from the GGUF file: all but the embedding table."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def torch_bytes_per_token(model: torch.nn.Module) -> int:
    """The same for a pocket-r1 model: parameters and buffers but the embeddings, and the int8 matrices
    that quantize.Int8Linear keeps in an opaque packed form (with their float32 biases)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name or "rope_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for module in model.modules():
        if hasattr(module, "int8_weight"):
            bias = getattr(module, "bias", None)
            total += module.out_features * module.in_features + (bias.numel() * 4 if bias is not None else 0)
    return total


def read_bandwidth_gbs(x: torch.Tensor, repeats: int = 5) -> float:
    """GB/s reading `x` once (`torch.sum`), the best of `repeats`: a bound should be the best case."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - began)
    return x.numel() * x.element_size() / min(times) / 1e9


def llama_decode_ms(llm, steps: int) -> float:
    """Median ms of one llama.cpp decode step at batch 1 after a 16-token prefill, as bigmodel.decode_ms."""
    llm.reset()
    llm.eval(list(range(1, PREFILL + 1)))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        llm.eval([5])
        times.append((time.perf_counter() - began) * 1000)
    return median(times[1:])


def open_llama(path: Path, threads: int, steps: int):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=PREFILL + steps + 16, n_batch=PREFILL, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating repetitions, medians (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 1 round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 8, 1
    args.out = args.out or RESULTS / ("llamacpp-quick.json" if args.quick else "llamacpp.json")
    start(args.threads)
    if not (BF16 / "model.safetensors").is_file():
        build_bf16(BF16, SHAPE)
    from pocketr1.model import load_model

    paths = {kind: ensure_gguf(kind) for kind in ("f16", "q8_0")}
    info = machine()
    print(describe(info))
    ours = {"bf16": load_model(BF16)}
    ours["bf16 packed"] = ours["bf16"].frozen(torch.bfloat16)
    ours["int8"] = load_model(BF16, int8=True)
    theirs = {"f16": open_llama(paths["f16"], args.threads, args.steps),
              "q8_0": open_llama(paths["q8_0"], args.threads, args.steps)}
    keys = [("llama.cpp", "f16"), ("pocket-r1", "bf16"), ("pocket-r1", "bf16 packed"), ("llama.cpp", "q8_0"),
            ("pocket-r1", "int8")]
    for engine, name in keys:  # warm-up: weights paged in, kernels chosen
        run_one(engine, name, ours, theirs, 4)
    times = {key: [] for key in keys}
    probe, bandwidths = torch.ones(2**28), []  # 1 GiB of float32, far beyond any cache
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(run_one(*key, ours, theirs, args.steps))
        bandwidths.append(read_bandwidth_gbs(probe))  # in every round: the machine's load changes
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{e} {n} {times[e, n][-1]:.1f} ms" for e, n in keys)
              + f", read bandwidth {bandwidths[-1]:.1f} GB/s", flush=True)

    bandwidth = max(bandwidths)
    weight_bytes = {("llama.cpp", kind): gguf_bytes_per_token(p) for kind, p in paths.items()}
    weight_bytes |= {("pocket-r1", name): torch_bytes_per_token(m) for name, m in ours.items()}
    weight_bytes["pocket-r1", "bf16 packed"] = weight_bytes["pocket-r1", "bf16"]  # the same bf16 weights, re-laid
    rows = []
    for engine, name in keys:
        ms = median(times[engine, name])
        nbytes = weight_bytes[engine, name]
        bound = bandwidth * 1e9 / nbytes
        rows.append({"engine": engine, "weights": name, "ms_per_token": round(ms, 2),
                     "tokens_per_s": round(1000 / ms, 2), "weight_bytes_per_token": nbytes,
                     "bandwidth_bound_tokens_per_s": round(bound, 2),
                     "share_of_bound": round(1000 / ms / bound, 3), "ms_per_round": [round(t, 2) for t in
                                                                                     times[engine, name]]})
    ratios = {f"{name} vs {PEER[name]}": round(median(times["llama.cpp", PEER[name]]) / median(times[engine, name]),
                                               2) for engine, name in keys if engine == "pocket-r1"}

    print(f"\ndecode at batch 1, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps "
          f"(random weights, R1-Distill-Qwen-1.5B shape)")
    print(f"{'engine':<10} {'weights':<11} {'ms/token':>9} {'tokens/s':>9} {'MB/token':>9} {'bound tok/s':>11} "
          f"{'of bound':>8}")
    for row in rows:
        print(f"{row['engine']:<10} {row['weights']:<11} {row['ms_per_token']:>9.1f} {row['tokens_per_s']:>9.2f} "
              f"{row['weight_bytes_per_token'] / 1e6:>9.0f} {row['bandwidth_bound_tokens_per_s']:>11.1f} "
              f"{row['share_of_bound']:>8.0%}")
    print(f"read bandwidth: {bandwidth:.1f} GB/s, the best of {args.rounds} rounds (torch.sum over 1 GiB, "
          f"{args.threads} threads; median {median(bandwidths):.1f})")
    print("pocket-r1 / llama.cpp tokens/s: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_result(args.out, {"benchmark": "llamacpp", "machine": info, "shape": SHAPE,
                            "settings": {"steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                                         "prefill_tokens": PREFILL, "quick": args.quick},
                            "read_bandwidth_gb_s": round(bandwidth, 2),
                            "read_bandwidth_per_round_gb_s": [round(b, 2) for b in bandwidths],
                            "rows": rows, "ratios": ratios})
    for llm in theirs.values():
        llm.close()
    gc.collect()


def run_one(engine: str, name: str, ours: dict, theirs: dict, steps: int) -> float:
    if engine == "llama.cpp":
        return llama_decode_ms(theirs[name], steps)
    return decode_ms(ours[name], steps)


if __name__ == "__main__":
    main()
