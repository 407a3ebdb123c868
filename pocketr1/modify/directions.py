"""Directions in the residual stream: reading them from activations (mean residuals at chosen positions, the
covariance along whole sequences), whitening one against a covariance, and removing one from everything
written into the stream, by hooks (for scoring) or by orthogonalised weights (for good). `abliterate.py`
searches for the refusal direction with these."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pocketr1.model import Transformer
from pocketr1.model.transformer import attention_mask, left_padded, positions_for

WRITERS = ("o_proj", "down_proj")  # the linear layers whose outputs are added to the residual stream


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def logits_of(model: Transformer, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Logits [batch, time, vocab] of left-padded sequences (each row's real tokens at the end)."""
    ids, pad_left = left_padded(seqs, pad_id, model.lm_head.weight.device)
    t = ids.shape[1]
    return model(ids, positions_for(pad_left, 0, t), attention_mask(pad_left, t, t))


@torch.no_grad()
def mean_residuals(model: Transformer, prompts: list[list[int]], n_post: int, pad_id: int, batch_size: int = 16,
                   desc: str = "activations") -> torch.Tensor:
    """Mean residual stream [layers + 1, n_post, hidden] at the last `n_post` positions of each prompt: index 0
    is the embedding output, index l the stream after l blocks."""
    captured: list[torch.Tensor] = []
    hook = lambda module, args, out: captured.append(out[:, -n_post:].float())  # noqa: E731
    modules = [model.model.embed_tokens, *model.model.layers]
    handles = [m.register_forward_hook(hook) for m in modules]
    total = torch.zeros(len(modules), n_post, model.config.hidden_size)
    try:
        for batch in tqdm(list(batches(prompts, batch_size)), desc=desc, unit="batch", dynamic_ncols=True,
                          leave=False):
            captured.clear()  # hooks fire in module order: the embedding, then each block
            run_hidden(model, batch, pad_id)
            total += torch.stack([c.sum(0).cpu() for c in captured])
    finally:
        for h in handles:
            h.remove()
    return total / len(prompts)


def run_hidden(model: Transformer, seqs: list[list[int]], pad_id: int) -> None:
    ids, pad_left = left_padded(seqs, pad_id, model.lm_head.weight.device)
    t = ids.shape[1]
    model.hidden(ids, positions_for(pad_left, 0, t), attention_mask(pad_left, t, t))


@torch.no_grad()
def stream_covariance(model: Transformer, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Covariance [hidden, hidden] of the residual stream after every block, at every real position of `seqs`
    (each layer centred on its own mean, then pooled): the directions these sequences use, and how much."""
    h = model.config.hidden_size
    sums = torch.zeros(model.config.num_hidden_layers, h, dtype=torch.float64)
    outer = torch.zeros(h, h, dtype=torch.float64)
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
               for m in model.model.layers]
    count = 0
    try:
        for batch in batches(seqs, batch_size):
            captured.clear()
            run_hidden(model, batch, pad_id)
            longest = max(len(s) for s in batch)
            real = torch.tensor([[col >= longest - len(s) for col in range(longest)] for s in batch])
            for layer, out in enumerate(captured):
                x = out[real.to(out.device)].double().cpu()
                sums[layer] += x.sum(0)
                outer += x.T @ x
            count += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    means = sums / count
    return ((outer - count * means.T @ means) / (count * len(means))).float()


def whitened(direction: torch.Tensor, covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge I)^-1 d, normalised: the direction leaning away from what C's sequences use most."""
    eye = torch.eye(len(covariance), dtype=covariance.dtype)
    return F.normalize(torch.linalg.solve(covariance + ridge * eye, direction.float().cpu()), dim=0)


def writers(model: Transformer) -> list[nn.Linear]:
    """Every linear layer that writes into the residual stream: attention outputs, MLP and expert outputs."""
    return [m for name, m in model.model.layers.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in WRITERS]


def _project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x without its component along the unit vector r (over the last axis)."""
    rf = r.to(x.dtype)
    return x - (x @ rf)[..., None] * rf


@contextmanager
def ablated(model: Transformer, direction: torch.Tensor) -> Iterator[None]:
    """Run `model` with `direction` removed from everything written into the residual stream (by hooks; the
    weights are untouched)."""
    r = F.normalize(direction.float(), dim=0).to(model.lm_head.weight.device)
    hook = lambda module, args, out: _project_out(out, r)  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in [model.model.embed_tokens, *writers(model)]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def orthogonalise(model: Transformer, direction: torch.Tensor) -> None:
    """W <- W - r r^T W for every weight that writes into the residual stream (in float32, then cast back), so
    no activation ever has a component along r. A tied output head is untied first: the head reads the
    stream and keeps its weights."""
    r = F.normalize(direction.float(), dim=0).to(model.lm_head.weight.device)
    embed = model.model.embed_tokens
    if model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    embed.weight.copy_(_project_out(embed.weight.float(), r).to(embed.weight.dtype))  # rows: residual vectors
    for linear in writers(model):
        w = linear.weight.float()  # [hidden, in]: columns are residual vectors
        linear.weight.copy_((w - torch.outer(r, r @ w)).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(_project_out(linear.bias.float(), r).to(linear.bias.dtype))


def ridge_unit(covariance: torch.Tensor) -> float:
    """The variance along the covariance's (hidden/16)-th principal direction: a width-free unit for ridges."""
    values = torch.linalg.eigvalsh(covariance).flip(0)  # descending
    return float(values[len(values) // 16].clamp(min=1e-12))
