"""The Qwen2/Llama family in one compact file: RMSNorm, RoPE, grouped-query attention with optional qkv
bias, SwiGLU MLP, tied or untied embeddings. Parameter names match Hugging Face's, so a `state_dict`
round-trips through `model.safetensors` unchanged.

Attention takes an explicit boolean mask (True = may attend) built by `attention_mask`, so the same
forward serves training (left-padded GRPO batches) and cached generation (one new token per row).
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (the same for every row: prompts are left-padded)

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

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :, :, start:start + t] = k
            cache.v[self.layer, :, :, start:start + t] = v
            k = cache.k[self.layer, :, :, :start + t]
            v = cache.v[self.layer, :, :, :start + t]
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
    scores = (q.view(b, n_kv, h // n_kv, d) @ k.transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs @ v).view(b, h, 1, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
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
