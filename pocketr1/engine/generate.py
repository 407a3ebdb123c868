"""Batched generation with a KV cache.

Prompts are left-padded so every row writes the cache at the same slot; each prompt is prefilled once and
its cache copied to the `n` samples of its group; finished rows leave the batch (whenever it can drop to the
next of a few sizes, `batch_size`) so the rest run faster.

On CPU a batch of at least `BATCH_ROWS` rows runs on `model.frozen(dtype)`: fused, prepacked projections,
and under `dtype="auto"` bfloat16 weights when the CPU multiplies bf16 natively (avx512_bf16 / AMX), where
its matmuls run 2-3x faster than float32. The copy is kept until the model's weights change (a GRPO policy
gets a new one per rollout). Smaller batches, and other devices, run on the model itself in its own dtype
unless another is asked for: for a single row MKL's float32 matrix-vector products beat both. Pass a dtype
explicitly for outputs that don't depend on the batch size through this choice.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pocketr1.engine.sampling import sample_next
from pocketr1.errors import UserError
from pocketr1.model.transformer import Transformer, attention_mask, left_padded, positions_for


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (then bf16 beats float32 for generation)."""
    if device.type != "cpu" or not hasattr(torch.cpu, "get_capabilities"):
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


BATCH_ROWS = 4  # measured on a Zen 5 CPU: from 3-4 rows bf16 and prepacked matmuls overtake MKL's float32


def resolve_dtype(model: Transformer, rows: int, dtype: torch.dtype | str = "auto") -> torch.dtype:
    """The dtype `generate` runs `model` in for a batch of `rows`: `dtype` itself, or what "auto" picks."""
    if dtype != "auto":
        return dtype
    weight = model.model.embed_tokens.weight
    if weight.dtype == torch.float32 and rows >= BATCH_ROWS and native_bf16(weight.device):
        return torch.bfloat16
    return weight.dtype


_frozen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights stamp, frozen copy)


def weights_stamp(model: Transformer) -> tuple:
    """Changes whenever a weight does: in-place updates (optimizer steps, `load_state_dict`) bump `_version`,
    `.to()` swaps the storage, `assign=True` loads bring new tensors (kept here so ids can't be reused)."""
    params = tuple(model.parameters())
    return tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in params), params


def runner(model: Transformer, rows: int, dtype: torch.dtype | str = "auto") -> Transformer:
    """What generates a batch of `rows` for `model`: itself, or its frozen copy (see the module docstring)."""
    dtype = resolve_dtype(model, rows, dtype)
    weight = model.model.embed_tokens.weight
    if dtype == weight.dtype and (rows < BATCH_ROWS or weight.device.type != "cpu"):
        return model
    stamp = weights_stamp(model)
    cached = _frozen.get(model)
    if cached is None or cached[0][0] != stamp[0] or cached[1].model.embed_tokens.weight.dtype != dtype:
        cached = _frozen[model] = (stamp, model.frozen(dtype))
    return cached[1]


def batch_size(live: int) -> int:
    """The rows a shrinking decode batch keeps for `live` unfinished sequences: the smallest of 1, 2, 3, 4, 6, 8,
    12, 16 that holds them, above 16 the next multiple of 8. Finished rows leave only when the batch can drop to
    a smaller size, so a batch runs in a bounded set of shapes rather than one per row count: oneDNN builds
    (and keeps) its kernels per shape, and a GRPO run's memory grew by tens of MB a step as new counts came up;
    the cache is copied less often too. Steps of 8 rather than powers of 1.5 above 16: less work on finished
    rows (a GRPO rollout 3% faster)."""
    if live > 16:
        return -(-live // 8) * 8
    power = 1 << max(0, (live - 1).bit_length() - 1)  # the largest power of two below `live` (1 for 1)
    return next(size for size in (power, 3 * power // 2, 2 * power) if size >= live)


# With OMP_WAIT_POLICY=passive, OpenMP's workers sleep between parallel regions and every region pays a
# wake-up (70-80 us on a 2-core VM), more than a small model's decode op takes: below this much work per
# decode step (weights x rows) one thread decodes faster there (`python bench/threads.py`). Without the
# setting, workers spin a while before sleeping and two threads pay off from far less work.
PASSIVE_SINGLE_THREAD_WORK = 1e9


def weight_count(model: Transformer) -> int:
    """The model's weights (what a decode step reads once per row; a frozen copy's packed ones don't count)."""
    return sum(t.numel() for t in model.state_dict().values())


def decode_threads(weights: int, rows: int) -> contextlib.AbstractContextManager:
    """One thread for decoding `rows` rows of a model of `weights` weights when waking a second would cost
    more (see PASSIVE_SINGLE_THREAD_WORK); the setting is the calling thread's."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"
    if not passive or torch.get_num_threads() == 1:
        return contextlib.nullcontext()
    return _threads(1) if weights * rows < PASSIVE_SINGLE_THREAD_WORK else contextlib.nullcontext()


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
             n: int = 1, pad_id: int = 0, on_token: StreamCallback | None = None, *,
             dtype: torch.dtype | str = "auto", prompt_seeds: list[int] | None = None) -> list[Completion]:
    """`n` completions for each prompt, in order: prompt 0's samples first. Stop tokens are not returned.
    `dtype`: what to compute in ("auto": see the module docstring); float32 reproduces `transformers`'
    float32 greedy outputs. `prompt_seeds` (instead of `params.seed`): one random stream per sample, seeded
    from its prompt's seed, so a prompt's samples are the same whatever other prompts share the batch
    (data-parallel GRPO splits a step's prompts over processes and must sample what one process would)."""
    if not prompts:
        return []
    with decode_threads(weight_count(model), len(prompts) * n):
        return _generate(model, prompts, params, stop_ids, n, pad_id, on_token, dtype, prompt_seeds)


def _generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int], n: int,
              pad_id: int, on_token: StreamCallback | None, dtype: torch.dtype | str,
              prompt_seeds: list[int] | None) -> list[Completion]:
    model = runner(model, len(prompts) * n, dtype)
    weight = model.model.embed_tokens.weight  # (a frozen copy's projections have no plain weights)
    device = weight.device
    longest = max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, model.config.max_position_embeddings - longest)
    if max_new <= 0 or any(len(p) == 0 for p in prompts):
        raise UserError(f"a prompt of {longest} tokens leaves no room in the model's context of "
                        f"{model.config.max_position_embeddings} tokens.")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    draws = None  # [sequences, max_new]: each sequence's uniforms, from its own seeded stream, drawn ahead
    if prompt_seeds is not None and params.temperature > 0:
        draws = torch.stack([torch.rand(max_new, generator=torch.Generator().manual_seed((s * 65_537 + j) % 2**63))
                             for s in prompt_seeds for j in range(n)]).to(device)

    ids, pad_left = left_padded(prompts, pad_id, device)
    cache = model.new_cache(len(prompts), longest + max_new, weight.dtype, device)
    hidden = model.hidden(ids, positions_for(pad_left, 0, longest),
                          attention_mask(pad_left, longest, longest), cache)
    logits = model.lm_head(hidden[:, -1])
    if n > 1:
        cache.expand(n)
        pad_left = pad_left.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)

    total = len(prompts) * n
    outputs: list[list[int]] = [[] for _ in range(total)]
    finished = [False] * total
    rows = list(range(total))  # which sequence each batch row holds (finished ones wait for the next shrink)
    stops = set(stop_ids or ())
    for step in range(max_new):
        tokens = sample_next(logits, params.temperature, params.top_p, params.top_k, generator,
                             None if draws is None else draws[rows, step])
        for seq, tok in zip(rows, tokens.tolist(), strict=True):
            if finished[seq]:
                continue
            if tok in stops:
                finished[seq] = True
                continue
            outputs[seq].append(tok)
            if on_token is not None:
                on_token(seq, tok)
        live = [row for row, seq in enumerate(rows) if not finished[seq]]
        if step == max_new - 1 or not live:
            break
        size = batch_size(len(live))
        if size < len(rows):  # shrink to the next size: finished rows leave, as many as that drops
            done = [row for row, seq in enumerate(rows) if finished[seq]]
            index = torch.tensor(sorted(live + done[:size - len(live)]), device=device)
            rows, tokens, pad_left = [rows[i] for i in index.tolist()], tokens[index], pad_left[index]
            cache.select(index)
        slot = cache.length
        # The decode mask spans the cache's whole capacity (see KVCache): the row's real tokens up to `slot`.
        cache.reserve(slot + 1)
        k_idx = torch.arange(cache.capacity, device=device)
        mask = ((k_idx >= pad_left[:, None]) & (k_idx <= slot))[:, None, None]
        logits = model(tokens[:, None], (slot - pad_left)[:, None], mask, cache)[:, -1]
    return [Completion(out, done) for out, done in zip(outputs, finished, strict=True)]
