"""The bf16 matmul attention (`_small_attention`) that CPU masked batches take, against float32 SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketr1.model.transformer import SMALL_ATTENTION, sequence_attention


def inputs(seed: int, v_dim: int = 16) -> tuple[torch.Tensor, ...]:
    """bf16 q [2, 6, 40, 16], k [2, 2, 40, 16] (grouped-query), v [2, 2, 40, v_dim], and a mask with blocks a
    query may not see besides the future, as a tree-packed GRPO row has."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 6, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    v = torch.randn(2, 2, 40, v_dim, generator=gen)
    branch = torch.randint(0, 3, (2, 40), generator=gen)
    branch[:, :8] = 0  # a shared prefix, then branches that see it and themselves only
    slot = torch.arange(40)
    mask = (slot[None, :] <= slot[:, None]) & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
    return (*(x.bfloat16().requires_grad_() for x in (q, k, v)), mask[:, None])


@pytest.mark.parametrize("v_dim", [16, 24])  # 24: DeepSeek's MLA has value heads of another width
def test_small_attention_matches_float32_sdpa(v_dim):
    q, k, v, mask = inputs(0, v_dim)
    assert q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION  # (the path under test)
    out = sequence_attention(q, k, v, mask, scale=0.3)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 6, 40, v_dim)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out.float(), want, atol=0.03, rtol=0.03)

    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.bfloat16())
    want.backward(grad)
    for ours, theirs in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert ours is not None
        torch.testing.assert_close(ours.float(), theirs, atol=0.05, rtol=0.05)


def test_small_attention_under_autocast_keeps_masked_keys_out():
    """float32 inputs under bf16 autocast take the same path; a key the mask hides changes nothing."""
    q, k, v, mask = inputs(2)
    q, k, v = (x.detach().float() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_attention(q, k, v, mask)
        v_hidden = v.clone()
        v_hidden[:, :, -1] += 100.0  # the last slot: only the last query (and those of its branch) may see it
        moved = sequence_attention(q, k, v_hidden, mask)
    seen_by = mask[:, 0, :, -1]  # [batch, query]: which queries may attend to the last key
    changed = (moved - out).abs().amax(dim=(1, 3)) > 0  # [batch, query]
    assert torch.equal(changed, seen_by)
