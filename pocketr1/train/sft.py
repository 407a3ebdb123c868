"""Supervised fine-tuning on chat examples: R1's cold start (a few readable long reasoning traces), the
SFT round on rejection-sampled traces, distillation into a smaller student, and `pocketr1 finetune`.

An example is a list of messages (`role` system/user/assistant, `content`); an assistant message may carry
its thinking as `reasoning_content` (the DeepSeek API's name) or inline as `<think>...</think>answer`.
`encode_chat` renders it with the model's one chat template and marks the tokens the loss counts on: every
assistant turn. The final assistant turn follows the generation prompt exactly as the model will see it at
inference (`...<｜Assistant｜><think>\\n`) and is trained whole: reasoning, `</think>`, answer, end token.
Earlier assistant turns appear as the template renders history (thinking stripped, as R1's template does)
and are trained too. Examples are packed by `pretrain.pack_rows` (the one packer), each seen once per epoch.

    model = sft(model, tok, examples, cfg.sft, run_dir / "sft" / "checkpoint", metrics, device, cfg.seed)
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from array import array
from pathlib import Path

import torch
from tqdm import tqdm

from pocketr1.config import SFTConfig
from pocketr1.errors import UserError
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train import distributed
from pocketr1.train.common import (
    Metrics,
    StopOnInterrupt,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
)
from pocketr1.train.pretrain import pack_rows, train_step

ROLES = ("system", "user", "assistant")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --- examples ---------------------------------------------------------------------------------------------

def check_messages(messages, where: str) -> list[dict]:
    """`messages` if it is a usable example (roles, text fields, at least one assistant turn), else UserError
    naming `where` (e.g. 'data.jsonl line 7')."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} needs a role of {', '.join(ROLES)}.")
        for key in ("content", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise UserError(f"{where}: message {i} has a non-text '{key}'.")
        if m.get("content") is None and not (m["role"] == "assistant" and m.get("reasoning_content")):
            raise UserError(f"{where}: message {i} has no 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to learn.")
    return messages


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Examples from a JSONL file of `{"messages": [...]}` rows (blank lines skipped). A malformed row is a
    UserError naming the file and line; so is a file without any example."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}).") from None
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise UserError(f"{where}: expected an object with a 'messages' list.")
        examples.append(check_messages(row["messages"], where))
    if not examples:
        raise UserError(f"{path} holds no examples (expected JSONL rows like "
                        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}).')
    return examples


def completion_text(generation_prompt: str, message: dict) -> str:
    """What the model should write after `generation_prompt` for an assistant message, up to (not
    including) the end token, in R1's readable format `reasoning\\n</think>\\n\\nanswer`. Inline thinking is
    kept verbatim (a model's own samples keep its own layout); no thinking at all gives R1's empty block."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        body = f"{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.lstrip()}"
    elif THINK_CLOSE in content:
        body = content.lstrip().removeprefix(THINK_OPEN).removeprefix("\n")  # the text after `<think>\n`
    else:
        body = f"\n{THINK_CLOSE}\n\n{content}"
    if generation_prompt.endswith(THINK_OPEN + "\n"):
        return body
    if generation_prompt.endswith(THINK_OPEN):
        return "\n" + body
    return f"{THINK_OPEN}\n{body}"  # a template whose prompt does not open the block (older R1-Distill)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _history_spans(tok: ChatTokenizer, history: list[dict]) -> list[tuple[int, int]]:
    """Character spans of the earlier assistant turns in the rendered history, from after the role header
    (what the generation prompt and the turn share, e.g. `<｜Assistant｜>`) through the end token."""
    spans = []
    for k, m in enumerate(history):
        if m["role"] != "assistant":
            continue
        before = tok.render(history[:k], add_generation_prompt=False)
        header = tok.render(history[:k], add_generation_prompt=True)[len(before):]
        after = tok.render(history[:k + 1], add_generation_prompt=False)
        if after.startswith(before):  # templates that re-render earlier turns differently are left unmarked
            turn = after[len(before):]
            spans.append((len(before) + _common_prefix(header, turn), len(after)))
    return spans


def encode_chat(tok: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one example; mask[i] = 1 where predicting ids[i] counts: the tokens of every
    assistant turn (thinking, answer and end token), never the system/user text or the role markers.

    The prompt is tokenized as inference tokenizes it (one string through the chat template, ending in the
    generation prompt) and the final assistant turn as the model emits it (its own tokens, then the end
    token). Messages after the last assistant turn carry no loss and are dropped."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    history = [{"role": m["role"], "content": m.get("content") or ""} for m in messages[:last]]
    prompt = tok.render(history, add_generation_prompt=True)
    enc = tok.tok.encode(prompt, add_special_tokens=False)
    ids, mask = list(enc.ids), [0] * len(enc.ids)
    for start, end in _history_spans(tok, history):
        for i, (a, _) in enumerate(enc.offsets):
            if start <= a < end:
                mask[i] = 1
    completion = tok.encode(completion_text(prompt, messages[last])) + [tok.eos_id]
    return ids + completion, mask + [1] * len(completion)


# --- the order examples are seen in -----------------------------------------------------------------------

def epoch_layouts(lengths: list[int], rows: int, seq_len: int, gen: torch.Generator) -> list[list[list[int]]]:
    """One epoch as global batches: a seeded permutation of the examples (by their token counts), packed in
    that order into rows of `seq_len` tokens, `rows` rows a batch (the last one padded with empty rows).
    Every example lands in exactly one row of one batch."""
    packed: list[list[int]] = [[]]
    col = 0
    for i in torch.randperm(len(lengths), generator=gen).tolist():
        n = min(lengths[i] - 1, seq_len)
        if col + n > seq_len:
            packed.append([])
            col = 0
        packed[-1].append(i)
        col += n
    batches = [packed[j:j + rows] for j in range(0, len(packed), rows)]
    batches[-1] += [[] for _ in range(rows - len(batches[-1]))]
    return batches


def schedule(lengths: list[int], cfg: SFTConfig, seq_len: int, seed: int) -> list[tuple[int, list[list[int]]]]:
    """(epoch, layout) for every optimizer step: `cfg.epochs` epochs, or exactly `cfg.steps` steps when set.
    A function of the data and the seed alone, so a resumed run (or another rank) sees the same batches."""
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise UserError("sft needs sft.epochs >= 1 or sft.steps >= 1.")
    plan, epoch = [], 0
    while (len(plan) < cfg.steps) if cfg.steps > 0 else (epoch < cfg.epochs):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        plan += [(epoch, layout) for layout in epoch_layouts(lengths, cfg.rows, seq_len, gen)]
        epoch += 1
    return plan[:cfg.steps] if cfg.steps > 0 else plan


def encode_examples(tok: ChatTokenizer, examples: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    encoded = []
    for n, messages in enumerate(examples):
        ids, mask = encode_chat(tok, check_messages(messages, f"example {n}"))
        encoded.append((ids, mask))
    if not encoded:
        raise UserError("sft was given no examples.")
    return encoded


def fingerprint(encoded: list[tuple[list[int], list[int]]]) -> str:
    """A digest of the encoded data: a resume on different data would silently mix two runs."""
    h = hashlib.sha1()
    for ids, mask in encoded:
        h.update(array("i", ids).tobytes() + b"|" + bytes(mask) + b";")
    return h.hexdigest()


# --- training ---------------------------------------------------------------------------------------------

def sft(model, tok: ChatTokenizer, examples: list[list[dict]], cfg: SFTConfig, ckpt_dir: Path, metrics: Metrics,
        device: torch.device, seed: int, dtype: str = "auto", fsdp: bool = False, stage: str = "sft"):
    """Fine-tune `model` on chat `examples` (see `encode_chat`) and return it in eval mode.

    - Full fine-tuning when every parameter trains (weights become float32 masters; autocast as `dtype`);
      a model with frozen parameters (a LoRA adapter injected by `pocketr1.modify.lora`) trains only the
      rest, and its checkpoint holds only those.
    - Resumable: a checkpoint in `ckpt_dir` every `cfg.checkpoint_every` steps (and on Ctrl-C); calling
      again with the same data and seed continues from it with the same batches. Metrics go to `metrics`
      under `stage` (loss over the assistant tokens, lr, tokens/s, epoch, examples per step).
    - Under torchrun every rank passes the same model and examples; each packs its rows of the same global
      batch (DDP, or FSDP2 with `fsdp`), so each example is trained once per epoch on exactly one rank and
      the loss is that of one process with the same global batch. Call it on every rank; save on rank 0.
    """
    world = distributed.world()
    if cfg.rows < world:
        raise UserError(f"sft.rows={cfg.rows} cannot be split over {world} processes; use at least {world}.")
    seq_len = min(cfg.seq_len, model.config.max_position_embeddings)
    encoded = encode_examples(tok, examples)
    lengths = [len(ids) for ids, _ in encoded]
    long = sum(n - 1 > seq_len for n in lengths)
    if long and distributed.is_main():
        tqdm.write(f"pocketr1: {long} of {len(encoded)} examples are longer than {seq_len} tokens and are cut "
                   "there (raise sft.seq_len, up to the model's max_position_embeddings).")
    loss_tokens = [sum(mask[1:min(n, seq_len + 1)]) for (_, mask), n in zip(encoded, lengths)]
    real_tokens = [min(n - 1, seq_len) for n in lengths]
    plan = schedule(lengths, cfg, seq_len, seed)
    digest = fingerprint(encoded)

    partial = not all(p.requires_grad for p in model.parameters())  # e.g. LoRA: the base stays frozen
    factory = lambda m: make_optimizer(m, cfg.lr, cfg.weight_decay)  # noqa: E731
    loaded = load_checkpoint(ckpt_dir, factory, device, into=model.to(device) if partial else None)
    if loaded:
        model, optimizer, progress = loaded
        start = progress["step"]
        if progress.get("data") != digest:
            raise UserError(f"the checkpoint in {ckpt_dir} was trained on other examples; resume with the same "
                            "data, or delete it to start over.")
    else:
        model = model.to(device).train()
        if not partial:
            model = model.float()  # float32 master weights (a bf16 folder trains under autocast)
        optimizer, start = factory(model), 0
    like = copy.deepcopy(model) if fsdp and world > 1 else None  # what FSDP's weights are gathered into
    plain = model
    model, optimizer = distributed.prepare(model, optimizer, factory, fsdp)
    my_rows = distributed.shard(cfg.rows)
    metrics.truncate(stage, start)
    model.train()
    bar = tqdm(range(start, len(plan)), initial=start, total=len(plan), desc=stage, unit="step",
               dynamic_ncols=True, disable=not distributed.is_main())
    tokens, t0 = 0, time.perf_counter()
    stop = StopOnInterrupt()
    for step in stop.steps(bar):
        epoch, layout = plan[step]
        docs = [i for row in layout for i in row]
        batch = pack_rows(encoded, layout[my_rows.start:my_rows.stop], seq_len, tok.pad_id, False, device)
        # The mean over every loss token of the global batch; under DDP/FSDP gradients are averaged over
        # ranks, so each rank's sum is divided by (global count / world).
        denominator = torch.tensor(max(1, sum(loss_tokens[i] for i in docs)) / world, device=device)
        loss = train_step(model, optimizer, batch, denominator, lr_at(step, len(plan), cfg.lr, cfg.warmup), dtype)
        if hasattr(plain, "after_step"):  # e.g. DeepSeek-V3's expert balancing
            plain.after_step()
        tokens += sum(real_tokens[i] for i in docs)
        if (step + 1) % cfg.log_every == 0 or step + 1 == len(plan):
            total = distributed.sum_all(loss.item())[0] / world if world > 1 else loss.item()
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:,.0f}")
            metrics.log(stage, step + 1, loss=round(total, 4), lr=optimizer.param_groups[0]["lr"],
                        tokens_per_s=round(rate), epoch=epoch + 1, examples=len(docs))
        stopping = stop.requested()
        if stopping or (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(plan):
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step + 1, "data": digest}, trainable_only=partial)
        if stopping:
            stop.exit(f"{stage} step {step + 1}")
    bar.close()
    if world > 1:  # every rank takes part in the gather; the caller saves on rank 0
        return distributed.plain_copy(model, like if like is not None else plain).eval()
    return model.eval()
