"""Batched generation with a preallocated KV cache.

Prompts are left-padded so every row writes the cache at the same slot; each prompt is prefilled once and
its cache copied to the `n` samples of its group; finished rows leave the batch so the rest run faster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pocketr1.engine.sampling import sample_next
from pocketr1.errors import UserError
from pocketr1.model.transformer import KVCache, Transformer, attention_mask, positions_for


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int | None = None


@dataclass(slots=True)
class Completion:
    ids: list[int]
    finished: bool  # stopped on a stop token (False: ran out of max_new_tokens)


StreamCallback = Callable[[int, int], None]  # (sequence index, token id)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
             n: int = 1, pad_id: int = 0, on_token: StreamCallback | None = None) -> list[Completion]:
    """`n` completions for each prompt, in order: prompt 0's samples first. Stop tokens are not returned."""
    if not prompts:
        return []
    device = model.lm_head.weight.device
    longest = max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, model.config.max_position_embeddings - longest)
    if max_new <= 0 or any(len(p) == 0 for p in prompts):
        raise UserError(f"a prompt of {longest} tokens leaves no room in the model's context of "
                        f"{model.config.max_position_embeddings} tokens.")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    pad_left = torch.tensor([longest - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    dtype = model.lm_head.weight.dtype
    cache = KVCache(model.config, len(prompts), longest + max_new, dtype, device)
    hidden = model.hidden(ids, positions_for(pad_left, 0, longest), attention_mask(pad_left, longest, longest),
                          cache)
    logits = model.lm_head(hidden[:, -1])
    if n > 1:
        cache.expand(n)
        pad_left = pad_left.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)

    total = len(prompts) * n
    outputs: list[list[int]] = [[] for _ in range(total)]
    finished = [False] * total
    rows = torch.arange(total, device=device)  # which sequence each batch row holds
    stops = torch.tensor(stop_ids or [-1], device=device)
    for step in range(max_new):
        tokens = sample_next(logits, params.temperature, params.top_p, params.top_k, generator)
        is_stop = torch.isin(tokens, stops)
        for seq, tok, stop in zip(rows.tolist(), tokens.tolist(), is_stop.tolist()):
            if stop:
                finished[seq] = True
            else:
                outputs[seq].append(tok)
                if on_token is not None:
                    on_token(seq, tok)
        if step == max_new - 1:
            break
        keep = ~is_stop
        if not keep.any():
            break
        if not keep.all():  # finished rows leave the batch
            rows, tokens, pad_left = rows[keep], tokens[keep], pad_left[keep]
            cache.select(keep.nonzero().squeeze(-1))
        slot = cache.length
        mask = attention_mask(pad_left, 1, slot + 1)
        logits = model(tokens[:, None], positions_for(pad_left, slot, 1), mask, cache)[:, -1]
    return [Completion(out, done) for out, done in zip(outputs, finished)]
