"""LoRA fine-tuning throughput: pocket-r1's `sft` step (peft's LoRA injected into pocket-r1's Transformer,
examples packed end to end) against the plain transformers + peft loop a user would write, same model, same
examples, same adapter, same optimiser.

One random tiny Qwen2 (hidden 256, 4 layers, vocab 512; bench/common.py) is built with transformers and saved
with a pocket-r1 tokenizer; both sides load it and add a LoRA adapter (rank 16, alpha 32, every q/k/v/o and
gate/up/down projection) through peft: `get_peft_model` on `Qwen2ForCausalLM` for the peer,
`pocketr1.modify.lora.add_lora` for pocket-r1. The examples are chat conversations made from the task
corpus (arithmetic + countdown questions; assistant turns with and without worked reasoning), encoded once by
`pocketr1.train.sft.encode_chat` (loss on the assistant tokens only). Every step takes the examples
pocket-r1's epoch schedule packs into `--rows` x `--seq-len`; the peer gets exactly those examples as one
right-padded batch, labels -100 outside the assistant tokens. Both: AdamW (lr 2e-4, betas 0.9/0.95) over the
adapter, gradient clipping at 1.0, batch building inside the timed step. Tokens/s counts real (non-pad)
tokens for both, never padding.

Variants: the peer in float32 and under `torch.autocast("cpu", bfloat16)`; pocket-r1 in float32 and at its
default `dtype=auto` (bf16 autocast where the CPU multiplies bf16 natively). Each variant in its own worker
process (peak RSS is per variant); rounds alternate the order; medians of the timed steps.

    python bench/finetune.py            # 8 x 256 tokens a step, 1 warm-up + 4 rounds x 3 steps per variant
    python bench/finetune.py --quick    # smoke run -> results/finetune-quick.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / OpenMP environment before torch)
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from pretrain import collate  # noqa: E402  (the peer's right-padded batch, as bench/pretrain.py builds it)

from pocketr1.config import SFTConfig, build  # noqa: E402
from pocketr1.model import load_model  # noqa: E402
from pocketr1.modify import lora  # noqa: E402
from pocketr1.tasks.corpus import build_corpus  # noqa: E402
from pocketr1.tokenizer import ChatTokenizer  # noqa: E402
from pocketr1.train.common import autocast, bf16_is_fast, make_optimizer  # noqa: E402
from pocketr1.train.pretrain import pack_rows, token_loss  # noqa: E402
from pocketr1.train.sft import encode_chat, schedule  # noqa: E402

VARIANTS = ("transformers+peft fp32", "transformers+peft bf16", "pocketr1 fp32", "pocketr1 auto")
LR, RANK, ALPHA = 2e-4, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.training_step_args(p, "finetune", rows=8)
    p.add_argument("--examples", type=int, default=2000, help="chat examples (default: 2000)")
    args = p.parse_args(argv)
    if args.quick:
        args.examples = 300
    common.finish_training_step_args(args, "finetune")
    return args


def chat_examples(n: int, seed: int) -> list[list[dict]]:
    """Task problems as conversations: half with the worked reasoning as `reasoning_content`, half inline."""
    cfg = build("default")
    rng = random.Random(seed)
    out = []
    for doc in build_corpus(cfg.data.families, n, 0.6, {}, seed):
        thinking, _, answer = doc.completion.partition("</think>")
        reply = {"role": "assistant", "content": answer.strip(), "reasoning_content": thinking.strip()} \
            if rng.random() < 0.5 else {"role": "assistant", "content": doc.completion}
        out.append([{"role": "user", "content": doc.problem.question}, reply])
    return out


def worker(conn, spec: dict) -> None:
    """One variant in its own process (so its peak RSS is its own): a step per message, until None."""
    common.start(spec["threads"])
    name, cpu, pad_id = spec["variant"], torch.device("cpu"), spec["pad_id"]
    torch.manual_seed(spec["seed"])
    if name.startswith("transformers"):
        base = transformers.Qwen2ForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                task_type="CAUSAL_LM")).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        model = load_model(spec["folder"], dtype=torch.float32)
        lora.add_lora(model, lora.lora_config(model, RANK, ALPHA, targets=TARGETS), spec["seed"]).train()
        opt = make_optimizer(model, LR, 0.0)
        trainable = [p for p in model.parameters() if p.requires_grad]
    conn.send("ready")
    while (s := conn.recv()) is not None:
        common.reset_peak_rss()
        layout = spec["layouts"][s]
        if name.startswith("transformers"):
            docs = [(ids[:spec["seq_len"] + 1], mask[1:spec["seq_len"] + 1])
                    for ids, mask in (spec["encoded"][i] for row in layout for i in row)]
            batch = collate(docs, pad_id)
            batch = {k: v[:, :-1] for k, v in batch.items()}  # the last position predicts nothing
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("bf16")):
                loss = model(**batch).loss
        else:
            batch = pack_rows(spec["encoded"], layout, spec["seq_len"], pad_id, False, cpu)
            with autocast(cpu, "float32" if name.endswith("fp32") else "auto"):
                loss = token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        conn.send((float(loss.detach()), common.peak_rss_mb()))


def main(argv=None) -> None:
    args = parse_args(argv)
    common.start(args.threads)
    info = common.machine()
    print(common.describe(info))
    n_steps = 1 + args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as folder:
        common.build_model_folder(Path(folder), args.seed)
        tok = ChatTokenizer(folder)
        encoded = [encode_chat(tok, e) for e in chat_examples(args.examples, args.seed)]
        lengths = [len(ids) for ids, _ in encoded]
        plan = schedule(lengths, SFTConfig(steps=n_steps, rows=args.rows), args.seq_len, args.seed)
        layouts = [layout for _, layout in plan]
        real = [sum(min(lengths[i] - 1, args.seq_len) for row in layout for i in row) for layout in layouts]
        padded = [sum(map(len, layout)) * max(min(lengths[i] - 1, args.seq_len) for row in layout for i in row)
                  for layout in layouts]  # the peer's positions: every example padded to the step's longest
        specs = {v: {"variant": v, "folder": folder, "pad_id": tok.pad_id, "threads": args.threads,
                     "seed": args.seed, "seq_len": args.seq_len, "encoded": encoded, "layouts": layouts}
                 for v in VARIANTS}
        runs = common.alternate_steps(worker, specs, real, args.rounds, args.steps_per_round)

    rows = {}
    for v, x in runs.items():
        rates = [n / t for n, t in zip(x["tokens"], x["seconds"])]
        rows[v] = {"tokens_per_s": round(common.median(rates), 1),
                   "seconds_per_step": round(common.median(x["seconds"]), 4),
                   "first_loss": round(x["losses"][0], 4), "loss_after": round(x["losses"][-1], 4),
                   "peak_rss_mb": max(p or 0 for p in x["peaks"]) or None,
                   "seconds": [round(t, 4) for t in x["seconds"]]}
    peer = rows["transformers+peft fp32"]["tokens_per_s"]
    ratio_fp32 = rows["pocketr1 fp32"]["tokens_per_s"] / peer
    ratio_default = rows["pocketr1 auto"]["tokens_per_s"] / peer
    ratio_bf16 = rows["pocketr1 auto"]["tokens_per_s"] / rows["transformers+peft bf16"]["tokens_per_s"]
    auto = "bf16" if bf16_is_fast(torch.device("cpu")) else "fp32"
    waste = 1 - sum(real) / sum(padded)

    print(f"\nLoRA rank {RANK} on {len(TARGETS)} projections; {args.rows} x {args.seq_len} packed tokens a step "
          f"(median {common.median(real):.0f} real tokens); the peer pads them to the longest: {waste:.0%} of its "
          f"positions are padding. {n_steps} steps per variant "
          f"({args.rounds} rounds x {args.steps_per_round} timed + 1 warm-up).")
    print(f"{'variant':<26} {'tokens/s':>9} {'s/step':>7} {'first loss':>10} {'loss after':>10} {'peak RSS MB':>11}")
    for v in VARIANTS:
        x = rows[v]
        label = f"{v} ({auto})" if v == "pocketr1 auto" else v
        print(f"{label:<26} {x['tokens_per_s']:>9.0f} {x['seconds_per_step']:>7.3f} {x['first_loss']:>10.3f} "
              f"{x['loss_after']:>10.3f} {x['peak_rss_mb'] or 0:>11.0f}")
    print(f"\npocket-r1 / transformers+peft real tokens/s, medians: fp32 vs fp32 {ratio_fp32:.2f}x, default ({auto}) "
          f"vs plain fp32 loop {ratio_default:.2f}x, default vs bf16-autocast loop {ratio_bf16:.2f}x")
    print("The first losses agree when both sides score the same tokens of the same examples (same base weights).")

    info["load_average_end"] = common.os.getloadavg()
    result = {"benchmark": "finetune", "machine": info, "model": common.MODEL,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
              | {"lr": LR, "lora_rank": RANK, "lora_alpha": ALPHA, "targets": TARGETS, "pocketr1_auto_dtype": auto},
              "padding_share_of_peer_positions": round(waste, 4), "rows": rows,
              "speedup": {"fp32_vs_fp32": round(ratio_fp32, 2), "default_vs_fp32": round(ratio_default, 2),
                          "default_vs_bf16_autocast": round(ratio_bf16, 2)}}
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
