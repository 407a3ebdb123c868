"""A model of DeepSeek-R1-Distill-Qwen-1.5B's shape (random bf16 weights): chat latency, decode speed and peak
memory in bf16, bf16 quantized at load time (`--int8`), and from a saved int8 folder (`pocketr1 quantize`).

    python bench/bigmodel.py                 # builds bench/cache/ the first time (3.5 GB + 1.9 GB on disk)
    python bench/bigmodel.py --tokens 32 --threads 2
    python bench/bigmodel.py --quick         # a smoke run on a narrow 2-layer model with the same vocabulary

Two parts, all in one run so the ratios compare like with like on a loaded machine:
- `pocketr1 ask FOLDER ... --stats` in a fresh process per variant, as a user runs it: first-token latency,
  ms per token, tokens/s and the process's peak RSS (what the issue's 2.5 GB target is about);
- decode steps at batch 1 in this process: the int8 matmuls against our bf16 paths (the model as loaded,
  which generation uses for one row, and the prepacked `frozen()` copy it uses for batches).
Weights are random, so the text is noise and only the numbers mean anything.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (sets the offline / OpenMP environment before torch starts)
import torch  # noqa: E402
from common import RESULTS, describe, machine, median, start, write_result  # noqa: E402

CACHE = Path(__file__).resolve().parent / "cache"
# R1-Distill-Qwen-1.5B's config.json (shared/REFERENCE.md). Its 131072 positions cost 128 MB of float32 rope
# tables in every variant: part of the peak RSS figures below.
SHAPE = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=False, max_position_embeddings=131072, torch_dtype="bfloat16")
QUICK = SHAPE | dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)  # --quick
QUESTION = "What is 17 * 23? Think step by step."


def build_bf16(folder: Path, shape: dict, seed: int = 0) -> None:
    """Random weights (normal 0.02, norms 1, biases 0) of the 1.5B shape, with a small pocket-r1 tokenizer:
    its ids sit at the start of the 151936-row table, the rows past it are simply never used."""
    from pocketr1.model import ModelConfig, save_model
    from pocketr1.model.hf import build_model
    from pocketr1.tasks.corpus import build_corpus
    from pocketr1.tokenizer import BOS, EOS, save_tokenizer, train_tokenizer

    print(f"building {folder} (random weights) ...", flush=True)
    corpus = build_corpus(["arithmetic"], 2000, 0.3, {}, seed)
    tok = train_tokenizer([d.problem.question + "\n" + d.completion for d in corpus], 512)
    tmp_tok = CACHE / "tokenizer"
    save_tokenizer(tok, tmp_tok, 16384)
    cfg = ModelConfig(**shape, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    with torch.device("meta"):
        model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        elif name.endswith("bias"):
            state[name] = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(p.shape, generator=gen) * 0.02).bfloat16()
    model.load_state_dict(state, assign=True)
    del state
    save_model(model, folder, {n: tmp_tok / n for n in ("tokenizer.json", "tokenizer_config.json")})


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_ask(folder: Path, tokens: int, threads: int, extra: list[str]) -> dict:
    """`pocketr1 ask` in a fresh process, greedy; its --stats line parsed."""
    cmd = [sys.executable, "-m", "pocketr1", "ask", str(folder), QUESTION, "--stats", "--temperature", "0",
           "--max-tokens", str(tokens), "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # (common.py set the offline / OpenMP variables)
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    stats = re.search(r"first token (\d+) ms, ([\d.]+) ms/token over (\d+) tokens.*?peak RSS (\d+) MB", done.stderr)
    if not stats:
        raise SystemExit(f"no stats line in:\n{done.stderr[-2000:]}")
    first, per_token, count, rss = float(stats[1]), float(stats[2]), int(stats[3]), float(stats[4])
    return {"first_token_ms": first, "ms_per_token": per_token, "tokens": count,
            "tokens_per_s": round(1000 / per_token, 2) if per_token else None, "peak_rss_mb": rss,
            "process_wall_s": round(wall, 1)}


@torch.inference_mode()
def decode_ms(model, steps: int) -> float:
    """Median ms of one decode step at batch 1 after a 16-token prefill (the cache grows as in chat)."""
    from pocketr1.model.transformer import attention_mask, positions_for

    pad = torch.zeros(1, dtype=torch.long)
    dtype = model.model.embed_tokens.weight.dtype
    cache = model.new_cache(1, 16 + steps + 1, dtype, "cpu")
    ids = torch.arange(1, 17)[None]
    model(ids, positions_for(pad, 0, 16), attention_mask(pad, 16, 16), cache)
    times = []
    token = torch.tensor([[5]])
    for _ in range(steps):
        began = time.perf_counter()
        cache.reserve(cache.length + 1)
        k_idx = torch.arange(cache.capacity)
        mask = (k_idx <= cache.length)[None, None, None]
        model(token, torch.tensor([[cache.length]]), mask, cache)
        times.append((time.perf_counter() - began) * 1000)
    return median(times[1:])


def in_process(bf16: Path, int8: Path, steps: int) -> dict:
    from pocketr1.model import load_model

    out = {}
    model = load_model(bf16)
    out["bf16_as_loaded"] = decode_ms(model, steps)
    frozen = model.frozen(torch.bfloat16)
    out["bf16_prepacked"] = decode_ms(frozen, steps)
    del model, frozen
    out["int8"] = decode_ms(load_model(int8), steps)
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per `ask`")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed in-process per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a narrow 2-layer model (same vocab)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    start(args.threads)
    shape, name = (QUICK, "quick") if args.quick else (SHAPE, "r1-distill-qwen-1.5b-shape")
    if args.quick:
        args.tokens, args.steps = min(args.tokens, 4), min(args.steps, 2)
    bf16, int8 = CACHE / name, CACHE / f"{name}-int8"
    if not (bf16 / "model.safetensors").is_file():
        build_bf16(bf16, shape)
    if not (int8 / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "pocketr1", "quantize", str(bf16), str(int8), "--prompts", "2",
                        "--tokens", "8"], check=True, cwd=Path(__file__).parent.parent)
    info = machine()
    print(describe(info))
    rows = {"bf16": run_ask(bf16, args.tokens, args.threads, []),
            "bf16 --int8 (quantized on load)": run_ask(bf16, args.tokens, args.threads, ["--int8"]),
            "int8 folder": run_ask(int8, args.tokens, args.threads, [])}
    print(f"\n`pocketr1 ask --stats`, {args.tokens} tokens, greedy, {args.threads} threads")
    print(f"{'variant':34} {'first token ms':>14} {'ms/token':>9} {'tokens/s':>9} {'peak RSS MB':>12}")
    for variant, r in rows.items():
        print(f"{variant:34} {r['first_token_ms']:>14.0f} {r['ms_per_token']:>9.1f} {r['tokens_per_s']:>9.2f} "
              f"{r['peak_rss_mb']:>12.0f}")
    steps = in_process(bf16, int8, args.steps)
    print(f"\ndecode step at batch 1, in-process median ms: {steps}")
    ratios = {"int8_vs_bf16_as_loaded": round(steps["bf16_as_loaded"] / steps["int8"], 2),
              "int8_vs_bf16_prepacked": round(steps["bf16_prepacked"] / steps["int8"], 2)}
    print(f"int8 speed-up: {ratios}")
    out = args.out or RESULTS / ("bigmodel-quick.json" if args.quick else "bigmodel.json")
    write_result(out, {"machine": info, "shape": shape, "threads": args.threads, "tokens": args.tokens,
                       "disk_bytes": {"bf16": folder_bytes(bf16), "int8": folder_bytes(int8)},
                       "ask": rows, "decode_step_ms": steps, "speedup": ratios,
                       "load_average_end": list(os.getloadavg())})


if __name__ == "__main__":
    main()
