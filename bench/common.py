"""What the side-by-side benchmarks share: offline settings, the machine's description, peak RSS, the
tiny Qwen2 both sides load, and atomic JSON results. Importing this sets the offline / OpenMP environment,
so import it before torch."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads on a shared machine: 10-100x
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The tiny Qwen2 of bench/engine.py and of the reference measurements (4.1M parameters with vocab 512).
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512)


def start(threads: int) -> None:
    """What every benchmark does first: its thread count for both sides, and transformers kept quiet."""
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def machine() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "avx512_bf16": bool(caps.get("avx512_bf16")), "amx_bf16": bool(caps.get("amx_bf16")),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def describe(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
            f"transformers {info['transformers']}" + (f", trl {info['trl']}" if "trl" in info else "")
            + f", OMP_WAIT_POLICY={info['omp_wait_policy']}")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next reading is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def build_model_folder(folder: Path, seed: int, docs: int = 4000) -> None:
    """A random tiny Qwen2 saved by transformers, with a pocket-r1 tokenizer (BPE on the arithmetic corpus)
    and chat template beside it: a folder both pocket-r1 and transformers/TRL load."""
    import transformers

    from pocketr1.tasks.corpus import build_corpus
    from pocketr1.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer

    corpus = build_corpus(["arithmetic"], docs, 0.3, {}, seed)
    tok = train_tokenizer([d.problem.question + "\n" + d.completion for d in corpus], 384)
    save_tokenizer(tok, folder, MODEL["max_position_embeddings"])
    ids = {name: tok.token_to_id(name) for name in (BOS, EOS, PAD)}
    torch.manual_seed(seed)
    random.seed(seed)
    config = transformers.Qwen2Config(**MODEL, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                                      pad_token_id=ids[PAD])
    model = transformers.Qwen2ForCausalLM(config).float()
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.pad_token_id = ids[PAD]
    model.save_pretrained(folder)


def alternate_steps(worker, specs: dict[str, dict], step_tokens: list[int], rounds: int,
                    steps_per_round: int) -> dict[str, dict[str, list]]:
    """Train each variant in its own spawned process (`worker(conn, spec)` answers "ready", then for each
    step number it receives sends back `(loss, peak_rss_mb)`; `None` ends it), one warm-up step each, then
    `rounds` rounds alternating the order so neither side always runs on a warmer machine.

    Returns per variant the timed steps' seconds, real tokens (`step_tokens[step]`), losses (warm-up
    included) and peak RSS readings."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    variants = list(specs)
    out = {v: {"seconds": [], "tokens": [], "losses": [], "peaks": []} for v in variants}
    conns, procs = {}, []
    for v in variants:
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=worker, args=(child, specs[v]), daemon=True))
        procs[-1].start()
        child.close()  # a worker that dies then reads as EOFError here, not a hang
        conns[v] = parent
    for v in variants:
        assert conns[v].recv() == "ready"

    def step(v: str, s: int) -> None:
        t0 = time.perf_counter()
        conns[v].send(s)
        loss, peak = conns[v].recv()
        out[v]["seconds"].append(time.perf_counter() - t0)
        out[v]["losses"].append(loss)
        out[v]["tokens"].append(step_tokens[s])
        out[v]["peaks"].append(peak)

    for v in variants:  # warm-up (oneDNN primitive caches, allocator): not timed
        step(v, 0)
        out[v]["seconds"].clear()
        out[v]["tokens"].clear()
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            for i in range(steps_per_round):
                step(v, 1 + r * steps_per_round + i)
    for v in variants:
        conns[v].send(None)
    for proc in procs:
        proc.join(timeout=30)
    return out


def training_step_args(p, name: str, rows: int) -> None:
    """The options every training-step benchmark shares (bench/pretrain.py, bench/finetune.py)."""
    p.add_argument("--rows", type=int, default=rows, help=f"packed rows per step (default: {rows})")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row (default: 256)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (default: 4)")
    p.add_argument("--steps-per-round", type=int, default=3, help="steps per variant per round (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 tokens, 1 round of 2 steps")
    p.add_argument("--out", type=Path, help=f"JSON results (default: bench/results/{name}.json, or "
                                            f"{name}-quick.json with --quick)")


def finish_training_step_args(args, name: str) -> None:
    """--quick's sizes and the default output path, once the script has parsed its own options too."""
    if args.quick:
        args.rows, args.seq_len, args.rounds, args.steps_per_round = 4, 128, 1, 2
    args.out = args.out or RESULTS / (f"{name}-quick.json" if args.quick else f"{name}.json")
