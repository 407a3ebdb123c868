"""Pretraining throughput: pocket-r1's packed training step against the plain transformers loop a user
would write, same model, same documents, same optimiser.

One random tiny Qwen2 (hidden 256, 4 layers, vocab 512) is built with transformers and saved with a
pocket-r1 tokenizer; both sides load it. The corpus is the default preset's (arithmetic + countdown, 30%
worked solutions, rendered with the chat template). Every step, pocket-r1's `pack_batch` packs random
documents end to end into `--rows` x `--seq-len` (each document masked to itself, positions restarting);
the peer gets exactly those documents as one right-padded batch (attention_mask on the padding) and runs
`Qwen2ForCausalLM(input_ids, attention_mask, labels)` with the prompt and padding labelled -100, so both
learn the same completion tokens. Both: AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices),
gradient clipping at 1.0, batch building inside the timed step. Tokens/s counts real (non-pad) input
tokens for both, never padding.

Variants: the peer in float32 (what the plain loop does) and under `torch.autocast("cpu", bfloat16)`;
pocket-r1 in float32 and at its default `dtype=auto` (bf16 autocast where the CPU multiplies bf16 natively).
Each variant lives in its own worker process (spawned by this one), so peak RSS is per variant; rounds
alternate the order; medians of the timed steps.

    python bench/pretrain.py            # 16 x 256 tokens a step, 1 warm-up + 4 rounds x 3 steps per variant
    python bench/pretrain.py --quick    # smoke run -> results/pretrain-quick.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline / OpenMP environment before torch)
import torch  # noqa: E402
import transformers  # noqa: E402

from pocketr1.config import build  # noqa: E402
from pocketr1.model import load_model  # noqa: E402
from pocketr1.tasks.corpus import build_corpus  # noqa: E402
from pocketr1.tokenizer import ChatTokenizer  # noqa: E402
from pocketr1.train.common import autocast, bf16_is_fast, make_optimizer  # noqa: E402
from pocketr1.train.pretrain import encode_corpus, pack_batch, token_loss  # noqa: E402

VARIANTS = ("transformers fp32", "transformers bf16", "pocketr1 fp32", "pocketr1 auto")
LR = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.training_step_args(p, "pretrain", rows=16)
    p.add_argument("--docs", type=int, default=8000, help="corpus documents (default: 8000)")
    args = p.parse_args(argv)
    if args.quick:
        args.docs = 1000
    common.finish_training_step_args(args, "pretrain")
    return args


def unpack(batch, pad_id: int) -> list[tuple[list[int], list[float]]]:
    """The documents of a packed batch: (tokens, loss weight of predicting each token after the first).
    A document starts where positions restart at 0; padding (never inside a document) ends a row."""
    docs = []
    inputs, targets, weights, positions = (t.tolist() for t in (batch.inputs, batch.targets, batch.weights,
                                                                batch.positions))
    for row in range(len(inputs)):
        c, width = 0, len(inputs[row])
        while c < width and inputs[row][c] != pad_id:
            start, c = c, c + 1
            while c < width and inputs[row][c] != pad_id and positions[row][c] != 0:
                c += 1
            docs.append((inputs[row][start:c] + [targets[row][c - 1]], weights[row][start:c]))
    return docs


def collate(docs: list[tuple[list[int], list[float]]], pad_id: int) -> dict[str, torch.Tensor]:
    """What a plain loop feeds transformers: right-padded ids, attention mask, labels (-100: no loss)."""
    longest = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), longest), dtype=torch.long)
    labels = torch.full((len(docs), longest), -100, dtype=torch.long)
    for i, (tokens, weights) in enumerate(docs):
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
        w = torch.tensor(weights)  # w[j]: the loss counts on predicting tokens[j + 1]
        labels[i, 1:len(tokens)] = torch.where(w > 0, torch.tensor(tokens[1:]), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def worker(conn, spec: dict) -> None:
    """One variant in its own process (so its peak RSS is its own): a step per message, until None."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    name, cpu, pad_id = spec["variant"], torch.device("cpu"), spec["pad_id"]
    if name.startswith("transformers"):
        model = transformers.Qwen2ForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).train()
        decay = [p for p in model.parameters() if p.dim() >= 2]  # what a plain loop writes: decay on matrices
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=LR, betas=(0.9, 0.95))
    else:
        model = load_model(spec["folder"], dtype=torch.float32).train()
        opt = make_optimizer(model, LR, 0.1)
    conn.send("ready")
    while (s := conn.recv()) is not None:
        common.reset_peak_rss()
        if name.startswith("transformers"):
            batch = collate(spec["peer_docs"][s], pad_id)
            batch = {k: v[:, :-1] for k, v in batch.items()}  # the last position predicts nothing
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("bf16")):
                loss = model(**batch).loss
        else:
            gen = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + s)
            batch = pack_batch(spec["encoded"], gen, spec["rows"], spec["seq_len"], pad_id, False, cpu)
            with autocast(cpu, "float32" if name.endswith("fp32") else "auto"):
                loss = token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        conn.send((float(loss.detach()), common.peak_rss_mb()))


def main(argv=None) -> None:
    args = parse_args(argv)
    common.start(args.threads)
    info = common.machine()
    print(common.describe(info))
    cpu = torch.device("cpu")
    cfg = build("default")
    n_steps = 1 + args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as folder:
        common.build_model_folder(Path(folder), args.seed)
        tok = ChatTokenizer(folder)
        docs = build_corpus(cfg.data.families, args.docs, cfg.data.worked_fraction, {}, args.seed)
        encoded = encode_corpus(docs, tok)
        peer_docs, real_tokens, padded_tokens = [], [], []
        for s in range(n_steps):  # the documents of every step, as pocket-r1 packs them
            batch = pack_batch(encoded, torch.Generator().manual_seed(args.seed * 1_000_003 + s), args.rows,
                               args.seq_len, tok.pad_id, False, cpu)
            unpacked = unpack(batch, tok.pad_id)
            peer_docs.append(unpacked)
            real_tokens.append(sum(len(ids) - 1 for ids, _ in unpacked))
            assert real_tokens[-1] == int((batch.inputs != tok.pad_id).sum()), "unpacking lost tokens"
            padded_tokens.append(len(unpacked) * max(len(ids) - 1 for ids, _ in unpacked))
        specs = {}
        for v in VARIANTS:
            specs[v] = {"variant": v, "folder": folder, "pad_id": tok.pad_id, "threads": args.threads,
                        "seed": args.seed, "rows": args.rows, "seq_len": args.seq_len}
            specs[v] |= {"peer_docs": peer_docs} if v.startswith("transformers") else {"encoded": encoded}
        runs = common.alternate_steps(worker, specs, real_tokens, args.rounds, args.steps_per_round)

    rows = {}
    for v, x in runs.items():
        rates = [n / t for n, t in zip(x["tokens"], x["seconds"])]
        rows[v] = {"tokens_per_s": round(common.median(rates), 1),
                   "seconds_per_step": round(common.median(x["seconds"]), 4),
                   "loss_after": round(x["losses"][-1], 4), "peak_rss_mb": max(p or 0 for p in x["peaks"]) or None,
                   "seconds": [round(t, 4) for t in x["seconds"]]}
    waste = 1 - sum(real_tokens) / sum(padded_tokens)
    ratio_fp32 = rows["pocketr1 fp32"]["tokens_per_s"] / rows["transformers fp32"]["tokens_per_s"]
    ratio_default = rows["pocketr1 auto"]["tokens_per_s"] / rows["transformers fp32"]["tokens_per_s"]
    ratio_bf16 = rows["pocketr1 auto"]["tokens_per_s"] / rows["transformers bf16"]["tokens_per_s"]
    auto = "bf16" if bf16_is_fast(cpu) else "fp32"

    print(f"\n{args.rows} x {args.seq_len} packed tokens a step (median {common.median(real_tokens[1:]):.0f} real "
          f"tokens, {common.median([len(d) for d in peer_docs]):.0f} documents); the peer pads them to the "
          f"longest: {waste:.0%} of its positions are padding. {n_steps} steps per variant "
          f"({args.rounds} rounds x {args.steps_per_round} timed + 1 warm-up).")
    print(f"{'variant':<20} {'tokens/s':>9} {'s/step':>7} {'loss after':>10} {'peak RSS MB':>11}")
    for v in VARIANTS:
        x = rows[v]
        label = f"{v} ({auto})" if v == "pocketr1 auto" else v
        print(f"{label:<20} {x['tokens_per_s']:>9.0f} {x['seconds_per_step']:>7.3f} {x['loss_after']:>10.3f} "
              f"{x['peak_rss_mb'] or 0:>11.0f}")
    print(f"\npocket-r1 / transformers real tokens/s, medians: fp32 vs fp32 {ratio_fp32:.2f}x, "
          f"default ({auto}) vs plain fp32 loop {ratio_default:.2f}x, default vs bf16-autocast loop "
          f"{ratio_bf16:.2f}x (target >= 1.3x: {'met' if ratio_default >= 1.3 else 'missed'})")
    print("Peak RSS: each variant's own worker process (model, optimiser, activations) during its steps.")

    info["load_average_end"] = common.os.getloadavg()
    result = {"benchmark": "pretrain", "machine": info, "model": common.MODEL,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
              | {"lr": LR, "corpus": "default preset families, 30% worked", "pocketr1_auto_dtype": auto},
              "padding_share_of_peer_positions": round(waste, 4), "rows": rows,
              "speedup": {"fp32_vs_fp32": round(ratio_fp32, 2), "default_vs_fp32": round(ratio_default, 2),
                          "default_vs_bf16_autocast": round(ratio_bf16, 2)}}
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
