"""`pocketr1 diff A B`: what changed between two models of one architecture and tokenizer (a censored model and
its abliterated or fine-tuned copy, a base and its RL model): the relative weight change per layer, the KL
between their next-token distributions along A's own greedy replies, and held-out task accuracy side by side.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from pocketr1.errors import UserError
from pocketr1.model import Transformer
from pocketr1.modify.abliterate import mean_kl, model_replies, read_prompts, reply_logprobs
from pocketr1.tokenizer import ChatTokenizer


def _part(name: str) -> str:
    """The table row a parameter belongs to: the embedding, one block, the final norm or the head."""
    if m := re.match(r"model\.layers\.(\d+)\.", name):
        return f"layer {m.group(1)}"
    return {"model.embed_tokens.weight": "embedding", "model.norm.weight": "final norm",
            "lm_head.weight": "output head"}.get(name, name)


@torch.no_grad()
def weight_changes(a: Transformer, b: Transformer) -> list[dict]:
    """Per part: ||B - A|| / ||A|| over all of its parameters, and its most changed tensor."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise UserError("the two models have different architectures (parameter names or shapes differ).")
    parts: dict[str, dict] = {}
    for name, wa in sa.items():
        wa, wb = wa.float(), sb[name].float()
        delta, norm = (wb - wa).pow(2).sum().item(), wa.pow(2).sum().item()
        row = parts.setdefault(_part(name), {"part": _part(name), "params": 0, "delta2": 0.0, "norm2": 0.0,
                                             "largest": "", "largest_change": -1.0})
        row["params"] += wa.numel()
        row["delta2"] += delta
        row["norm2"] += norm
        change = (delta / max(norm, 1e-30)) ** 0.5
        if change > row["largest_change"]:
            row["largest"], row["largest_change"] = name.removeprefix("model."), change
    return [{"part": r["part"], "params": r["params"], "relative_change": (r["delta2"] / max(r["norm2"], 1e-30)) ** 0.5,
             "largest": r["largest"], "largest_change": r["largest_change"]} for r in parts.values()]


def logit_kl(a: Transformer, b: Transformer, tok: ChatTokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """KL(A || B) of next-token distributions along A's greedy replies, and how often the greedy replies match."""
    replies_a = model_replies(a, tok, prompts, max_new_tokens)
    replies_b = model_replies(b, tok, prompts, max_new_tokens)
    kl = mean_kl(reply_logprobs(a, replies_a, tok.pad_id), reply_logprobs(b, replies_a, tok.pad_id))
    same = sum(x.reply == y.reply for x, y in zip(replies_a, replies_b)) / len(prompts)
    return {"prompts": len(prompts), "kl": kl, "same_greedy_reply": same}


def _same_tokenizer(a_dir: Path, b_dir: Path) -> None:
    ta, tb = (json.loads((d / "tokenizer.json").read_text()) if (d / "tokenizer.json").is_file() else None
              for d in (a_dir, b_dir))
    if ta is None or tb is None or any(ta.get(k) != tb.get(k) for k in ("model", "added_tokens")):
        raise UserError(f"{a_dir} and {b_dir} do not share one tokenizer, so their logits can't be compared.")


def diff_command(args) -> None:
    from pocketr1.chat import resolve_model_dir
    from pocketr1.cli_eval import _run_data, refusal_table
    from pocketr1.config import DataConfig, EvalConfig
    from pocketr1.evaluate import evaluate_family
    from pocketr1.model import load_model
    from pocketr1.report import percent, text_table
    from pocketr1.tasks import get_family
    from pocketr1.tasks.refusal import Alchemy, evaluate_refusals
    from pocketr1.train.common import pick_device

    if min(args.k, args.problems, args.kl_prompts, args.max_tokens) < 1:
        raise UserError("--k, --problems, --kl-prompts and --max-tokens must each be at least 1.")
    a_dir, b_dir = resolve_model_dir(args.a), resolve_model_dir(args.b)
    _same_tokenizer(a_dir, b_dir)
    run_data = _run_data(args.a) or {}
    names = args.task or run_data.get("families") or DataConfig().families  # as `pocketr1 eval` picks
    trained = run_data.get("difficulty") or {}
    plan = [(f, f.difficulty(trained.get(f.name))) for f in map(get_family, dict.fromkeys(names))]
    extra = read_prompts(args.prompts) if args.prompts else None
    device = pick_device(args.device)
    a, b = load_model(a_dir, device=device), load_model(b_dir, device=device)
    tok = ChatTokenizer(a_dir)

    changes = weight_changes(a, b)
    prompt_sets = [(f"{f.name} (held-out)", [p.question for p in f.problems(args.kl_prompts, 1, level, heldout=True)])
                   for f, level in plan]
    if args.refusals:
        prompt_sets.append(("forbidden topic (held-out)",
                            [p.question for p in Alchemy().all_problems(True, forbidden=True)[:args.kl_prompts]]))
    if extra:
        prompt_sets.append((str(args.prompts), extra[:args.kl_prompts]))
    print("comparing next-token distributions...", file=sys.stderr, flush=True)
    kls = [{"prompts_from": label} | logit_kl(a, b, tok, prompts, args.max_tokens) for label, prompts in prompt_sets]

    ec = EvalConfig(problems=args.problems, k=args.k, max_new_tokens=args.max_tokens)
    accuracy = {}
    for name, model in (("A", a), ("B", b)):
        print(f"evaluating {name}...", file=sys.stderr, flush=True)
        rows = [evaluate_family(model, tok, f, level, args.problems, args.k, ec) | {"split": "held-out"}
                for f, level in plan]
        refusals = None
        if args.refusals:
            topic = Alchemy().all_problems(True, forbidden=True)[:args.problems]
            refusals = evaluate_refusals(model, tok, topic, args.k, ec) | {"prompts_from": "forbidden topic"}
        accuracy[name] = {"rows": rows, "refusals": refusals}

    if args.json:
        print(json.dumps({"a": str(a_dir), "b": str(b_dir), "weights": changes, "kl": kls, "eval": accuracy},
                         indent=2))
        return
    print(f"A: {a_dir}\nB: {b_dir}\n\nweights: relative change ||B - A|| / ||A||")
    print(text_table(["part", "params", "change", "most changed", "its change"],
                     [[r["part"], f"{r['params']:,}", f"{r['relative_change']:.2e}", r["largest"],
                       f"{r['largest_change']:.2e}"] for r in changes]))
    print("\nnext-token KL(A || B) along A's greedy replies")
    print(text_table(["prompts", "n", "mean KL", "same greedy reply"],
                     [[r["prompts_from"], str(r["prompts"]), f"{r['kl']:.4f}", percent(r["same_greedy_reply"])]
                      for r in kls]))
    print(f"\nheld-out task accuracy (pass@1 over k={args.k} at T={ec.temperature}; greedy)")
    print(text_table(["task", "problems", "A pass@1", "B pass@1", "change", "A greedy", "B greedy"],
                     [[ra["family"], str(ra["problems"]), percent(ra["pass@1"]), percent(rb["pass@1"]),
                       f"{100 * (rb['pass@1'] - ra['pass@1']):+.1f} pts", percent(ra["greedy"]), percent(rb["greedy"])]
                      for ra, rb in zip(accuracy["A"]["rows"], accuracy["B"]["rows"])]))
    if args.refusals:
        print(refusal_table([accuracy[n]["refusals"] | {"prompts_from": f"{n}: forbidden topic"} for n in "AB"]))
