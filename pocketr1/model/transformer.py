"""The Qwen2/Llama family in one compact file: RMSNorm, RoPE, grouped-query attention with optional qkv
bias, SwiGLU MLP, tied or untied embeddings. Parameter names match Hugging Face's, so a `state_dict`
round-trips through `model.safetensors` unchanged.

Attention takes an explicit boolean mask (True = may attend) built by `attention_mask`, so the same
forward serves training (left-padded GRPO batches) and cached generation (one new token per row).

Under `torch.inference_mode()` the q/k/v and gate/up projections each run as one matmul on a fused copy of
their weights, cached on the module and rebuilt whenever a weight changes; the parameters themselves (and so
`state_dict`) keep HF's names and layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketr1.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference, then cast back: bf16 weights keep fp32 statistics.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, in the non-interleaved (rotate-half) layout HF uses."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
                                        / cfg.head_dim))
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def weights_stamp(tensors) -> tuple:
    """What identifies the current contents of `tensors`: in-place updates (optimizer steps,
    `load_state_dict`) bump `_version`, `.to()` swaps the storage, `assign=True` loads bring new objects.
    The tensors themselves ride along so their ids can't be reused while the stamp is kept."""
    tensors = tuple(tensors)
    return tuple((id(t), t._version, t.data_ptr(), t.dtype) for t in tensors), tensors


def fused_weights(owner: nn.Module, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linears` stacked into one weight (and bias), cached on `owner` until any of their parameters changes."""
    stamp = weights_stamp(p for lin in linears for p in (lin.weight, lin.bias) if p is not None)
    cached = owner.__dict__.get("_fused")
    if cached is None or cached[0][0] != stamp[0]:
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        cached = owner.__dict__["_fused"] = (stamp, torch.cat([lin.weight for lin in linears]), bias)
    return cached[1], cached[2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values for every layer: [layers, batch, kv_heads, capacity, head_dim].

    The capacity grows in steps of `CHUNK` slots up to `max_len`. Decoding attends over the whole capacity
    (the empty slots masked), because a full-capacity slice is contiguous: oneDNN's bf16 matmul copies a
    strided operand on every call, and a cache preallocated at `max_len` would waste work on empty slots.
    """

    CHUNK = 32

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        self.max_len = max_len
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (the same for every row: prompts are left-padded)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions (copying the filled part into a larger buffer if needed)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {length}.")
        capacity = min(self.max_len, -(-length // self.CHUNK) * self.CHUNK)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            setattr(self, name, new)

    def expand(self, repeats: int) -> None:
        """Give each row `repeats` copies, for the G samples of a group sharing one prefilled prompt."""
        self.k = self.k.repeat_interleave(repeats, dim=1)
        self.v = self.v.repeat_interleave(repeats, dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished sequences leave the batch)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_attention_heads, \
            cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side: [..., (heads + 2 * kv_heads) * head_dim]."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if torch.is_inference_mode_enabled():
            return F.linear(x, *fused_weights(self, projections))
        return torch.cat([proj(x) for proj in projections], dim=-1)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        qkv = self.qkv(x).view(b, t, h + 2 * kv, self.head_dim)
        # q and k share their positions: rotate both in one go, before splitting heads off.
        q, k = apply_rope(qkv[:, :, :h + kv], cos, sin).transpose(1, 2).split([h, kv], dim=1)
        v = qkv[:, :, h + kv:].transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :, :, start:start + t] = k
            cache.v[self.layer, :, :, start:start + t] = v
            # Keys up to the mask's width: with the whole capacity (what generation passes) the slice is
            # contiguous; the slots past `start + t` are empty and the mask must hide them.
            length = start + t if mask is None else mask.shape[-1]
            k = cache.k[self.layer, :, :, :length]
            v = cache.v[self.layer, :, :, :length]
        out = decode_attention(q, k, v, mask) if t == 1 else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def decode_attention(q, k, v, mask):
    """One query per row: two small batched matmuls with the query heads grouped per KV head.

    On CPU this beats the fused SDPA kernels for a single query (and by 7x in bf16), and it never copies
    the shared KV heads.
    """
    b, h, _, d = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    scores = (q.reshape(b, n_kv, h // n_kv, d) @ k.transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill_(~mask.view(b, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs @ v).view(b, h, 1, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if torch.is_inference_mode_enabled():
            gate, up = F.linear(x, fused_weights(self, [self.gate_proj, self.up_proj])[0]).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF naming: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        """Random initialisation for training from scratch (normal 0.02, norms at 1, biases at 0)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [batch, time, hidden]. `positions` are per row (left padding);
        `mask` None means plain causal attention (right-padded training batches)."""
        x = self.model.embed_tokens(input_ids)
        # [batch, time, 1, head_dim]: broadcast over the heads of [batch, time, heads, head_dim].
        cos = self.rope_cos[positions].unsqueeze(2).to(x.dtype)
        sin = self.rope_sin[positions].unsqueeze(2).to(x.dtype)
        if cache is not None:
            cache.reserve(cache.length + input_ids.shape[1])
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def forward(self, input_ids, positions, mask, cache=None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, positions, mask, cache))


def attention_mask(pad_left: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Boolean [batch, 1, q_len, k_len]: causal, and blind to each row's `pad_left` leading pads.

    The queries are the last `q_len` of `k_len` positions (prefill: q_len == k_len; decode: q_len == 1).
    """
    device = pad_left.device
    k_idx = torch.arange(k_len, device=device)
    q_idx = torch.arange(k_len - q_len, k_len, device=device)
    causal = k_idx[None, :] <= q_idx[:, None]
    not_pad = k_idx[None, :] >= pad_left[:, None]
    # A pad query sees only itself: a row with nothing to attend to would give NaNs that leak into values.
    itself = k_idx[None, :] == q_idx[:, None]
    return ((causal[None] & not_pad[:, None, :]) | itself[None])[:, None]


def positions_for(pad_left: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Position ids [batch, length] for slots start..start+length, counting from each row's first real token."""
    slots = torch.arange(start, start + length, device=pad_left.device)
    return (slots[None, :] - pad_left[:, None]).clamp(min=0)
