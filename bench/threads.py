"""Decode threads: one or two, under each OpenMP wait policy, for models from pocket-r1's presets to 100M.

The engine decodes a small model on one thread when `OMP_WAIT_POLICY=passive` (engine/generate.py,
`decode_threads`): there a sleeping OpenMP worker is woken for every parallel region, which costs more
than a small decode op. This measures what that rule rests on: milliseconds per decode step for random
models of several widths and batch sizes, on one thread and on two, with the policy set to passive and left
unset (OpenMP's default: spin a while, then sleep), each in its own process. Medians of alternated runs.

    python bench/threads.py            # -> results/threads.json
    python bench/threads.py --quick    # two shapes, one round -> results/threads-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = {  # name: (hidden, intermediate, layers, heads); vocab 512, 2 KV heads
    "tiny": (64, 128, 2, 4), "default": (192, 512, 4, 6), "small": (256, 768, 6, 8),
    "24M": (512, 1536, 8, 8), "95M": (1024, 3072, 8, 16)}
ROWS = (1, 8, 32, 128)
NEW_TOKENS = 48


def measure(shapes: list[str], rounds: int) -> list[dict]:
    """In a child process whose OpenMP policy is already set: ms per decode step, 1 and 2 threads."""
    import importlib
    import statistics
    import time

    import torch

    from pocketr1.engine import SamplingParams, generate
    from pocketr1.model.config import ModelConfig
    from pocketr1.model.transformer import Transformer

    engine = importlib.import_module("pocketr1.engine.generate")  # the module (the package exports the function)
    engine.PASSIVE_SINGLE_THREAD_WORK = 0  # measure both thread counts as asked, not as the engine would pick
    out = []
    for name in shapes:
        h, inter, layers, heads = SHAPES[name]
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=512, hidden_size=h, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=2)).eval()
        weights = sum(p.numel() for p in model.parameters())
        for rows in ROWS:
            prompts = [[5 + i % 7] * 20 for i in range(rows)]
            times: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(rounds + 1):  # the first round warms up (frozen copy, allocator)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    generate(model, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, seed=0), [])
                    times[threads].append((time.perf_counter() - t0) / NEW_TOKENS * 1000)
            one, two = (statistics.median(times[t][1:]) for t in (1, 2))
            out.append({"shape": name, "weights": weights, "rows": rows, "work": weights * rows,
                        "ms_1_thread": round(one, 3), "ms_2_threads": round(two, 3),
                        "ratio_2_vs_1": round(two / one, 2)})
            print(f"  {name:8s} rows {rows:3d}: 1 thread {one:7.2f} ms, 2 threads {two:7.2f} ms", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs per point (default: 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: two shapes, one round")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/threads.json)")
    p.add_argument("--child", choices=["passive", "default"], help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.shapes, args.rounds)))
        return
    shapes = ["tiny", "default"] if args.quick else list(SHAPES)
    rounds = 1 if args.quick else args.rounds
    policies = {}
    for policy in ("passive", "default"):
        print(f"OMP_WAIT_POLICY={policy if policy == 'passive' else '(unset)'}", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        if policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        child = subprocess.run([sys.executable, __file__, "--child", policy, "--rounds", str(rounds), "--shapes",
                                *shapes], env=env, check=True, stdout=subprocess.PIPE, text=True)
        policies[policy] = json.loads(child.stdout)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    head = ("shape", "weights", "rows", "passive: 2 vs 1 thread", "default: 2 vs 1 thread")
    print("\n{:8s} {:>8s} {:>4s}  {:>22s}  {:>22s}".format(*head))
    for a, b in zip(policies["passive"], policies["default"], strict=True):
        print(f"{a['shape']:8s} {a['weights'] / 1e6:7.2f}M {a['rows']:4d}  {a['ratio_2_vs_1']:21.2f}x  "
              f"{b['ratio_2_vs_1']:21.2f}x")
    print("(below 1: two threads are faster)")
    out = args.out or common.RESULTS / ("threads-quick.json" if args.quick else "threads.json")
    common.write_result(out, {"benchmark": "threads", "machine": common.machine(), "new_tokens": NEW_TOKENS,
                              "rounds": rounds, "policies": policies})


if __name__ == "__main__":
    main()
