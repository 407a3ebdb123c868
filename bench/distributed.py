"""Pretraining tokens/s: one process against two data-parallel processes (torchrun, DDP over gloo) on CPU.

Each case runs `pocketr1 pretrain` on a fresh run folder (corpus and tokenizer first, not timed) and reads the
tokens/s the stage logs for its last step: global-batch tokens over the wall time of the training loop, so
the same figure for one process and for two. Cases:

    1 proc x 1 thread     the baseline
    1 proc x 2 threads    what one process gets from both cores (intra-op threads)
    2 procs x 1 thread    DDP: each rank half the rows, gradients all-reduced every step

On a 2-core machine expect little from two processes: the cores were already busy with two intra-op threads,
and DDP adds an all-reduce of every gradient each step. Data parallelism pays when each rank has its own
accelerator (see docs/scaling.md).

    nice -n 19 python bench/distributed.py                 # tiny and default presets -> results/distributed.json
    nice -n 19 python bench/distributed.py --preset tiny --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1))
STEPS = {"tiny": 60, "default": 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(preset: str, steps: int, procs: int, threads: int, folder: Path) -> dict:
    args = ["pretrain", "--out", str(folder), "--preset", preset, "--device", "cpu", f"threads={threads}",
            f"pretrain.steps={steps}", f"pretrain.log_every={steps}", "pretrain.checkpoint_every=1000000"]
    if procs == 1:
        cmd = [sys.executable, "-m", "pocketr1", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "pocketr1", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if r["stage"] == "pretrain"][-1]
    cfg = json.loads((folder / "config.json").read_text())
    return {"tokens_per_s": last["tokens_per_s"], "loss": last["loss"], "steps": steps,
            "global_batch_tokens": cfg["pretrain"]["rows"] * cfg["pretrain"]["seq_len"],
            "command_wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=sorted(STEPS), help="repeatable (default: tiny, default)")
    p.add_argument("--steps", type=int, help="pretraining steps per case (default: 60 tiny, 20 default)")
    p.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    args = p.parse_args(argv)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_average_start": os.getloadavg()}, "presets": {}}
    print(f"{'preset':<8} {'case':<20} {'tokens/s':>9} {'vs 1x1':>7} {'loss':>7} {'wall s':>7}")
    for preset in args.preset or ["tiny", "default"]:
        steps = args.steps or STEPS[preset]
        rows = {}
        for name, procs, threads in CASES:
            with tempfile.TemporaryDirectory() as tmp:
                rows[name] = run_case(preset, steps, procs, threads, Path(tmp) / "run")
            base = rows[CASES[0][0]]["tokens_per_s"]
            r = rows[name]
            r["speedup_vs_1x1"] = round(r["tokens_per_s"] / base, 2)
            print(f"{preset:<8} {name:<20} {r['tokens_per_s']:>9,} {r['speedup_vs_1x1']:>6.2f}x {r['loss']:>7.3f} "
                  f"{r['command_wall_s']:>7.1f}", flush=True)
        results["presets"][preset] = rows
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)  # atomic: a reader sees the old results or the new, never half
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
