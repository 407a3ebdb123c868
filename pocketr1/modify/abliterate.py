"""`pocketr1 abliterate MODEL --harmful FILE --harmless FILE`: remove a refusal by projecting one direction out
of every weight that writes into the residual stream (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction").

1. Candidates: for each layer l (the residual stream after l blocks) and each post-instruction position (the
   tokens of the generation prompt, `<｜Assistant｜><think>\\n`), the difference of the mean activation over
   the harmful prompts and over the harmless ones, normalised.
2. Score each candidate by ablating it (subtracting the direction from the embedding, every attention output
   and every MLP/expert output, which is exactly what orthogonalised weights do) on prompts held back from
   step 1: the refusal score is the log-likelihood of the model's own refusals on the harmful ones (lower:
   refusing became less likely); the guard is the KL divergence from the original model's next-token
   distributions along its own replies to the harmless ones.
3. Whitened variants of the `rerank` strongest candidates (lowest refusal scores, whatever their KL): the
   direction r = (C + λI)^-1 d for a few ridges λ, where C is the covariance of the residual streams along
   the replies that must not change. In a small model the difference of means d shares the subspace the
   tasks use most (measured: 70% of its energy in the guard tasks' top 32 of 256 principal directions), and
   ablating it costs tasks as ablating a random direction does; the whitened direction moves what the tasks
   use least, for the same separation of harmful from harmless (Fisher's discriminant, regularised).
4. Try directions for real (greedy and sampled replies, weights orthogonalised): for each of those candidates, its
   variants from the most whitened to the plain difference of means, stopping one step past the first that
   leaves at most `max_refusal_rate` refusals; keep the one with the least KL among those (candidates in the
   last `skip_last` share of layers, where a direction tends to suppress the refusal's tokens rather than the
   concept, or over `max_kl`, are not tried). Orthogonalise W <- W - r r^T W for the embedding, o_proj and
   down_proj weights, and save a new model folder.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pocketr1.engine import SamplingParams, generate
from pocketr1.errors import UserError
from pocketr1.model import Transformer
from pocketr1.modify.directions import (
    ablated,
    batches,
    logits_of,
    mean_residuals,
    orthogonalise,
    ridge_unit,
    stream_covariance,
    whitened,
)
from pocketr1.tasks.refusal import is_refusal
from pocketr1.tokenizer import ChatTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- inputs --------------------------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str]:
    """One prompt per line; a `.jsonl` file holds objects with `prompt` (or `question`, or `messages`, whose
    last user message is the prompt)."""
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
            text = record.get("prompt") or record.get("question") or \
                [m["content"] for m in record.get("messages", []) if m.get("role") == "user"][-1]
        except (json.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with 'prompt', 'question' or user "
                            "'messages'.") from None
        prompts.append(str(text))
    return prompts


def post_instruction_length(tok: ChatTokenizer) -> int:
    """How many tokens the generation prompt adds after the user's message."""
    messages = [{"role": "user", "content": "Hello."}]
    bare, full = tok.chat_ids(messages, add_generation_prompt=False), tok.chat_ids(messages)
    if len(full) <= len(bare) or full[:len(bare)] != bare:
        raise UserError("the chat template adds no separate generation prompt after the user's message, so there "
                        "are no post-instruction positions to read a refusal direction from.")
    return len(full) - len(bare)


# --- scoring -------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Reply:
    prompt: list[int]
    reply: list[int]  # the model's reply, with its stop token when it stopped
    text: str


GREEDY = SamplingParams(0.0, 1.0, 0)
# How a direction is tried for real: greedy replies, and one sampled at the usual evaluation settings (`pocketr1
# eval`'s T=0.6, top-p 0.95), since a refusal just under the greedy choice still comes up in samples.
TRIAL_SAMPLING = SamplingParams(0.6, 0.95, 0, seed=20250122)


def model_replies(model: Transformer, tok: ChatTokenizer, prompts: list[str], max_new_tokens: int,
                  batch_size: int = 16, sampling: SamplingParams = GREEDY) -> list[Reply]:
    """The model's replies to `prompts`: greedy, or drawn with `sampling` (up to `max_new_tokens` either way)."""
    params = replace(sampling, max_new_tokens=max_new_tokens)
    out = []
    for batch in batches(prompts, batch_size):
        ids = [tok.prompt_ids(p) for p in batch]
        done = generate(model, ids, params, tok.stop_ids, pad_id=tok.pad_id, dtype=torch.float32)
        out += [Reply(p, c.ids + ([tok.eos_id] if c.finished else []), tok.decode(c.ids)) for p, c in zip(ids, done)]
    return out


@torch.no_grad()
def reply_logprobs(model: Transformer, replies: list[Reply], pad_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Log-softmax [reply length, vocab] at the positions that predict each reply's tokens."""
    out = []
    for batch in batches(replies, batch_size):
        logits = logits_of(model, [r.prompt + r.reply for r in batch], pad_id).float()
        for row, r in enumerate(batch):
            n = len(r.reply)
            out.append(F.log_softmax(logits[row, -n - 1:-1], dim=-1).cpu())
    return out


def sequence_loglik(logprobs: list[torch.Tensor], replies: list[Reply]) -> float:
    """Mean over replies of the summed log-probability of each reply's tokens."""
    sums = [lp.gather(1, torch.tensor(r.reply)[:, None]).sum().item() for lp, r in zip(logprobs, replies)]
    return sum(sums) / len(sums)


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """KL(reference || other) of next-token distributions, averaged over every position of every reply."""
    kls = [F.kl_div(o, p, log_target=True, reduction="none").sum(-1) for p, o in zip(reference, other)]
    return torch.cat(kls).mean().item()


@dataclass(slots=True)
class Candidate:
    layer: int  # residual stream after this many blocks
    position: int  # negative index among the post-instruction tokens
    refusal_loglik: float = float("nan")  # of the model's own refusals, with this direction ablated
    kl: float = float("nan")  # harmless replies' next-token KL from the original model
    refusal_rate: float | None = None  # refusals on the held-back harmful prompts (greedy and sampled), orthogonalised
    ridge: float | None = None  # None: the difference of means itself; else whitened with this ridge (`whitened`)

    def allowed(self, max_kl: float) -> bool:
        return self.kl <= max_kl


def _split(prompts: list[str], what: str, flag: str) -> tuple[list[str], list[str]]:
    """(directions, scoring): a quarter (up to 32) held back to score candidates on prompts the mean never saw."""
    if len(prompts) < 4:
        raise UserError(f"{flag} gives {len(prompts)} {what} prompts; at least 4 are needed (64-256 work well).")
    n_val = max(1, min(32, len(prompts) // 4))
    return prompts[:-n_val], prompts[-n_val:]


def least_harmful(tried: list[Candidate], max_refusal_rate: float) -> Candidate:
    """The tried direction with the lowest KL among those leaving at most `max_refusal_rate` refusals (or, when
    none does, as few as any): one more refusal in a few dozen prompts is noise, a larger KL is lost skill."""
    enough = max(max_refusal_rate, min(c.refusal_rate for c in tried))
    return min((c for c in tried if c.refusal_rate <= enough), key=lambda c: (c.kl, c.refusal_rate))


# Ridges for the whitened variants, in units of the variance along the kept replies' (hidden/16)-th principal
# direction (`ridge_unit`); from the most whitened to the least. The 256-wide censored demo model needs 0.3-1.
RIDGES = (0.1, 0.2, 0.3, 0.5, 1.0, 3.0)


def score_candidates(model: Transformer, direction_of, candidates: list[Candidate], refusals: list[Reply],
                     kept: list[list[Reply]], references: list[list[torch.Tensor]], pad_id: int) -> None:
    """Fill each candidate's refusal log-likelihood and KL with its direction ablated: the largest mean KL over
    the sets of replies to keep (the harmless ones, the guard's; `references`, their original log-probs), so
    a small set is not averaged away."""
    for c in tqdm(candidates, desc="score directions", unit="dir", dynamic_ncols=True, leave=False):
        with ablated(model, direction_of(c)):
            c.refusal_loglik = sequence_loglik(reply_logprobs(model, refusals, pad_id), refusals)
            c.kl = max(mean_kl(ref, reply_logprobs(model, replies, pad_id)) for ref, replies in zip(references, kept))


def abliterate(model: Transformer, tok: ChatTokenizer, harmful: list[str], harmless: list[str], *,
               max_kl: float = 0.1, skip_last: float = 0.2, max_new_tokens: int = 48, batch_size: int = 16,
               rerank: int = 8, guard: list[str] | None = None, max_refusal_rate: float = 0.05) -> dict:
    """Find the refusal direction and orthogonalise `model`'s weights against it, in place. Returns the note:
    what was chosen, every candidate's scores, and refusal rates before and after on the held-back prompts.
    `guard`: more prompts whose replies must not change (the KL guard also covers them), e.g. the tasks the
    model should keep solving when the harmless prompts are the topic's allowed neighbours.
    `max_refusal_rate`: of the directions tried that leave at most this share of refusals, the least harmful wins."""
    if model.config.model_type not in ("qwen2", "llama", "deepseek_v3"):
        raise UserError(f"abliteration supports qwen2, llama and deepseek_v3 models, not {model.config.model_type}.")
    harmful_fit, harmful_val = _split(harmful, "harmful", "--harmful")
    harmless_fit, harmless_val = _split(harmless, "harmless", "--harmless")
    n_post = post_instruction_length(tok)

    before = model_replies(model, tok, harmful_val, max_new_tokens, batch_size)
    refusals = [r for r in before if is_refusal(r.text)]
    if not refusals:
        raise UserError(f"the model refuses none of the {len(before)} held-back harmful prompts (e.g. it answers "
                        f"{before[0].text[:60]!r}), so there is no refusal to remove.")
    kept = harmless_val + (guard or [])[:64]
    harmless_before = model_replies(model, tok, kept, max_new_tokens, batch_size)

    mean = lambda prompts, desc: mean_residuals(  # noqa: E731
        model, [tok.prompt_ids(p) for p in prompts], n_post, tok.pad_id, batch_size, desc)
    directions = F.normalize(mean(harmful_fit, "harmful activations") - mean(harmless_fit, "harmless activations"),
                             dim=-1)
    n_layers = model.config.num_hidden_layers
    last = n_layers - int(skip_last * n_layers)  # layers after this one are not candidates
    n_val = len(harmless_val)
    kept_sets = [replies for replies in (harmless_before[:n_val], harmless_before[n_val:]) if replies]
    references = [reply_logprobs(model, replies, tok.pad_id) for replies in kept_sets]
    covariance = stream_covariance(model, [r.prompt + r.reply for r in harmless_before], tok.pad_id, batch_size)
    unit = ridge_unit(covariance)

    def direction_of(c: Candidate) -> torch.Tensor:
        d = directions[c.layer, c.position]
        return d if c.ridge is None else whitened(d, covariance, c.ridge)

    plain = [Candidate(layer, pos) for layer in range(1, last + 1) for pos in range(-n_post, 0)]
    score_candidates(model, direction_of, plain, refusals, kept_sets, references, tok.pad_id)
    # The strongest directions by refusal score, whatever their KL (whitening is what lowers it), and their
    # whitened variants, most whitened first.
    strongest = sorted(plain, key=lambda c: c.refusal_loglik)[:rerank]
    variants = {id(c): [Candidate(c.layer, c.position, ridge=r * unit) for r in RIDGES] for c in strongest}
    score_candidates(model, direction_of, [v for vs in variants.values() for v in vs], refusals, kept_sets,
                     references, tok.pad_id)
    candidates = plain + [v for vs in variants.values() for v in vs]
    baseline = sequence_loglik(reply_logprobs(model, refusals, tok.pad_id), refusals)
    # Tried for real: a lower likelihood of the refusal does not always stop the greedy reply from refusing.
    rate = lambda replies: sum(is_refusal(r.text) for r in replies) / len(replies)  # noqa: E731

    def trial_rate(v: Candidate) -> float:
        trial = copy.deepcopy(model)
        orthogonalise(trial, direction_of(v))
        return rate(model_replies(trial, tok, harmful_val, max_new_tokens, batch_size) +
                    model_replies(trial, tok, harmful_val, max_new_tokens, batch_size, TRIAL_SAMPLING))

    tried, picks = [], []
    for c in tqdm(strongest, desc="try directions", unit="dir", dynamic_ncols=True):
        ladder = [v for v in variants[id(c)] + [c] if v.allowed(max_kl)]  # most whitened first
        for step, v in enumerate(ladder):
            v.refusal_rate = trial_rate(v)
            tried.append(v)
            if v.refusal_rate <= max_refusal_rate:
                # One step further when the guard allows: prompts the direction was not fitted on (other
                # wordings) refuse more often than the held-back ones. Stronger still would only cost more.
                if step + 1 < len(ladder):
                    ladder[step + 1].refusal_rate = trial_rate(ladder[step + 1])
                    tried.append(ladder[step + 1])
                    v = ladder[step + 1] if ladder[step + 1].refusal_rate <= v.refusal_rate else v
                picks.append(v)
                break
    if not tried:
        least = min(c.kl for c in candidates)
        raise UserError(f"every candidate direction changes harmless replies by more than --max-kl {max_kl} "
                        f"(the least: KL {least:.3f}); raise --max-kl or give more prompts.")
    best = min(picks, key=lambda c: c.kl) if picks else least_harmful(tried, max_refusal_rate)

    orthogonalise(model, direction_of(best))
    after = model_replies(model, tok, harmful_val, max_new_tokens, batch_size)
    harmless_after = model_replies(model, tok, kept, max_new_tokens, batch_size)
    return {
        "method": "refusal direction (difference of means, whitened against the kept replies' residual streams "
                  "where that harms less), weights orthogonalised (Arditi et al. 2024)",
        "layer": best.layer, "position": best.position,
        "ridge": None if best.ridge is None else round(best.ridge / unit, 3),  # in units of `ridge_unit`
        "position_token": tok.decode(tok.prompt_ids("x")[best.position:][:1], skip_special=False),
        "refusal_loglik_before": round(baseline, 4), "refusal_loglik_after": round(best.refusal_loglik, 4),
        "harmless_kl": round(best.kl, 5), "max_kl": max_kl, "max_refusal_rate": max_refusal_rate,
        "prompts": {"harmful": len(harmful_fit), "harmless": len(harmless_fit),
                    "harmful_held_back": len(harmful_val), "harmless_held_back": len(harmless_val),
                    "guard": len(kept) - len(harmless_val)},
        "held_back_refusal_rate": {"before": rate(before), "after": rate(after)},
        "held_back_harmless_replies_changed": sum(a.reply != b.reply for a, b in zip(harmless_before, harmless_after))
        / len(kept),
        "layers": n_layers, "candidates": [asdict(c) for c in candidates],
    }


def abliterate_command(args) -> None:
    from pocketr1.chat import resolve_model_dir
    from pocketr1.fsutil import check_writable
    from pocketr1.model import load_model, save_model
    from pocketr1.model.hf import refuse_quantized
    from pocketr1.train.common import pick_device

    if args.max_kl <= 0 or not 0 <= args.skip_last < 1 or args.max_tokens < 1:
        raise UserError("--max-kl must be above 0, --skip-last in [0, 1) and --max-tokens at least 1.")
    harmful, harmless = read_prompts(args.harmful), read_prompts(args.harmless)
    guard = read_prompts(args.guard) if args.guard else None
    model_dir = resolve_model_dir(args.model)
    out = args.out or model_dir.with_name(model_dir.name + "-abliterated")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out.")
    check_writable(out.parent)
    refuse_quantized(model_dir, "abliteration")
    tok = ChatTokenizer(model_dir)
    model = load_model(model_dir, device=pick_device(args.device))
    note = abliterate(model, tok, harmful, harmless, max_kl=args.max_kl, skip_last=args.skip_last,
                      max_new_tokens=args.max_tokens, guard=guard)
    note["source"] = str(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        note_path = Path(tmp) / "abliteration.json"
        note_path.write_text(json.dumps(note, indent=2) + "\n")
        files = {name: model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()}
        save_model(model, out, files | {"abliteration.json": note_path})
    rates = note["held_back_refusal_rate"]
    print(f"direction: layer {note['layer']} (the residual stream after {note['layer']} blocks), post-instruction "
          f"position {note['position']} "
          f"({note['position_token']!r})"
          f"{'' if note['ridge'] is None else ', whitened (ridge ' + format(note['ridge'], 'g') + ')'}; "
          f"harmless KL {note['harmless_kl']:.4f}")
    print(f"refusals on {note['prompts']['harmful_held_back']} held-back harmful prompts: "
          f"{rates['before']:.0%} -> {rates['after']:.0%}")
    print(f"saved {out} (note: {out / 'abliteration.json'})")
