"""The Qwen2/Llama family in one compact file: RMSNorm, RoPE, grouped-query attention with optional qkv
bias, SwiGLU MLP, tied or untied embeddings. Parameter names match Hugging Face's, so a `state_dict`
round-trips through `model.safetensors` unchanged.

Attention takes an explicit boolean mask (True = may attend) built by `attention_mask`, so the same
forward serves training (left-padded GRPO batches) and cached generation (one new token per row).

Batched generation runs on `Transformer.frozen()`, a parameter-free copy whose q/k/v and gate/up projections
are each fused into one prepacked matmul; the model itself keeps HF's parameters for training and saving.
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
        return xf.to(x.dtype) if self.weight is None else self.weight * xf.to(x.dtype)  # None: folded (`frozen`)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, in the non-interleaved (rotate-half) layout HF uses, over the rotated
    dimensions: the whole head, or DeepSeek's decoupled rope part."""
    dim = cfg.qk_rope_head_dim if cfg.model_type == "deepseek_v3" else cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class PackedLinear(nn.Module):
    """A frozen linear layer for generation, its weight prepacked for oneDNN on CPU. Unpacked, oneDNN
    re-lays the weight out on every bf16 call, and float32 `F.linear` goes to MKL, which runs at a fraction
    of AVX-512 speed on AMD CPUs: packed is 10-30% faster in bf16 and about 2x in float32 from 4 rows up."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None):
        super().__init__()
        self.weight = torch.cat(weights)  # several layers stacked: one matmul for all of them
        self.bias = torch.cat(biases) if biases else None
        self.packed = None
        if self.weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:  # private ops (what Inductor's CPU freezing uses): fall back to F.linear if they fail
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
                self(self.weight.new_zeros(1, self.weight.shape[1]))  # e.g. bf16 on a CPU oneDNN can't run it
                self.weight = None
            except (AttributeError, RuntimeError):
                self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class KVCache:
    """Keys and values for every layer: [layers, batch, kv_heads, capacity, head_dim].

    The capacity grows in steps of `CHUNK` slots up to `max_len`. Decoding attends over the whole capacity
    (the empty slots masked), because a full-capacity slice is contiguous: oneDNN's bf16 matmul copies a
    strided operand on every call, and a cache preallocated at `max_len` would waste work on empty slots.
    Subclasses cache other tensors (`names`), all with positions on axis 3 (see deepseek.MLACache).
    """

    CHUNK = 32
    names: tuple[str, ...] = ("k", "v")

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        self._allocate(max_len, {"k": shape, "v": shape}, dtype, device)

    def _allocate(self, max_len: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device) -> None:
        self.max_len = max_len
        for name, shape in shapes.items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self.length = 0  # positions filled so far (the same for every row: prompts are left-padded)

    @property
    def capacity(self) -> int:
        return getattr(self, self.names[0]).shape[3]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions (copying the filled part into a larger buffer if needed)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {length}.")
        capacity = min(self.max_len, -(-length // self.CHUNK) * self.CHUNK)
        for name in self.names:
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            # Only the empty tail needs zeros (masked scores still multiply it: garbage could be NaN).
            new[:, :, :, self.length:].zero_()
            setattr(self, name, new)

    def expand(self, repeats: int) -> None:
        """Give each row `repeats` copies, for the G samples of a group sharing one prefilled prompt."""
        for name in self.names:
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=1))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished sequences leave the batch)."""
        for name in self.names:
            setattr(self, name, getattr(self, name)[:, rows])


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
        self.scale = self.head_dim ** -0.5  # 1 in a frozen copy, whose query projection carries it

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        if hasattr(self, "qkv_proj"):  # a frozen copy: one fused matmul
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.view(b, t, h + 2 * kv, self.head_dim)
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
        out = decode_attention(q, k, v, mask, self.scale) if t == 1 else sequence_attention(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# Up to this many scores per head (queries x keys), attention that runs in bf16 on CPU is written out as
# matmuls (`_small_attention`): GRPO's 128-slot rows, pretraining's 256-token ones, short fine-tuning rows.
# The scores are materialised ([batch, heads, queries, keys]), so longer rows keep the fused kernel.
SMALL_ATTENTION = 512 * 512


def sequence_attention(q, k, v, mask, scale: float | None = None):
    """SDPA over many queries (causal when `mask` is None).

    On CPU, masked attention in bf16 (bf16 inputs or autocast) of at most `SMALL_ATTENTION` scores per head
    runs as plain matmuls and a bf16 softmax: the fused kernel computes every masked-out score as well, and
    its bf16 backward is slow, so this is 1.5-2.5x faster forward and backward (packed pretraining and SFT
    rows, GRPO's update and its reference forward, prefills). Its scores are rounded to bf16, as the cached
    decode's are. Otherwise (longer rows, plain causal batches) a forward that will be backpropagated runs
    in float32 even under bf16 autocast (which would cast the inputs back): the fused kernel's bf16 backward
    takes about twice as long as its float32 one. Its output goes on in float32; the next projection casts it."""
    cpu, low = q.device.type == "cpu", q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
    if cpu and low and mask is not None and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION:
        return _small_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
    if cpu and low and q.requires_grad and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                                 is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1])
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _small_attention(q, k, v, mask, scale: float):
    """Masked attention as two bf16 matmuls per KV head (its query heads stacked, the shared heads never
    copied), the mask added as a 0/-inf bias, softmax accumulated in float32 and rounded to bf16."""
    b, h, t, d = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    if scale != 1.0:  # (a frozen copy's queries come scaled)
        q = q * scale
    bias = torch.zeros(mask.shape, dtype=torch.bfloat16, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = q.reshape(b, n_kv, h // n_kv * t, d) @ k.transpose(-1, -2)
    scores = scores.view(b, n_kv, h // n_kv, t, length) + bias.view(bias.shape[0], 1, 1, t, length)
    probs = torch.softmax(scores, dim=-1).view(b, n_kv, h // n_kv * t, length)
    return (probs @ v).view(b, h, t, v.shape[-1])


def decode_attention(q, k, v, mask, scale: float | None = None):
    """One query per row: two small batched matmuls with the query heads grouped per KV head.

    On CPU this beats the fused SDPA kernels for a single query (and by 7x in bf16), and it never copies
    the shared KV heads.
    """
    b, h, _, d = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    scores = q.reshape(b, n_kv, h // n_kv, d) @ k.transpose(-1, -2)
    if scale != 1.0:  # (a frozen copy's queries come scaled)
        scores = scores * (d ** -0.5 if scale is None else scale)
    if mask is not None:  # None: every key is visible (a lone first token, or a cache filled to `length`)
        scores = scores.masked_fill_(~mask.view(b, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs @ v).view(b, h, 1, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, size: int = 0):
        super().__init__()
        size = size or cfg.intermediate_size  # (DeepSeek's experts are narrower)
        self.gate_proj = nn.Linear(cfg.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # a frozen copy: one fused matmul
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
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

    def __init__(self, cfg: ModelConfig, layer: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    Layer: type[nn.Module] = Block  # a decoder layer; other families (deepseek.py) subclass with their own
    quantization: dict | None = None  # set on int8 models (modify/quantize.py): already packed for generation

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, self.Layer)
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

    @torch.no_grad()
    def frozen(self, dtype: torch.dtype) -> Transformer:
        """A copy for generation only, with weights in `dtype`: every projection a `PackedLinear`, q/k/v and
        gate/up each fused into one, and the RMSNorm weights and the attention scale folded into the
        projections after them (fewer ops per decode step, where a small model's time goes). It shares
        nothing with `self`, so training `self` leaves it stale."""
        if self.quantization:  # int8 projections are fused and packed already, and run in any dtype
            return self
        with torch.device("meta"):
            twin = Transformer(self.config)
        twin.load_state_dict(self.state_dict(), assign=True)  # shared for now: everything below makes new tensors

        def take(weight: torch.Tensor, norm: RMSNorm | None = None, scale: float = 1.0) -> torch.Tensor:
            """`weight` in `dtype`, times the norm's weight over its inputs and `scale` (folded in float32)."""
            w = weight.float() * scale
            return (w if norm is None else w * norm.weight.float()).to(dtype)

        for block in twin.model.layers:
            a, m, pre, post = block.self_attn, block.mlp, block.input_layernorm, block.post_attention_layernorm
            q, k, v = a.q_proj, a.k_proj, a.v_proj
            biases = None if q.bias is None else [take(q.bias, scale=a.scale), take(k.bias), take(v.bias)]
            a.qkv_proj = PackedLinear([take(q.weight, pre, a.scale), take(k.weight, pre), take(v.weight, pre)], biases)
            a.o_proj = PackedLinear([take(a.o_proj.weight)])
            m.gate_up_proj = PackedLinear([take(m.gate_proj.weight, post), take(m.up_proj.weight, post)])
            m.down_proj = PackedLinear([take(m.down_proj.weight)])
            del a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj
            a.scale, pre.weight, post.weight = 1.0, None, None
        head = twin.model.embed_tokens if self.config.tie_word_embeddings else twin.lm_head
        twin.lm_head = PackedLinear([take(head.weight, twin.model.norm)])
        twin.model.norm.weight = None
        twin.model.embed_tokens.weight = nn.Parameter(take(twin.model.embed_tokens.weight), requires_grad=False)
        twin.rope_cos, twin.rope_sin = self.rope_cos, self.rope_sin  # float32, as HF keeps them
        return twin.eval().requires_grad_(False)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        """An empty cache for generating with this model (each family caches its own tensors)."""
        return KVCache(self.config, batch, max_len, dtype, device)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [batch, time, hidden] (a frozen copy leaves the norm weight to its head).
        `positions` are per row (left padding); `mask` None means plain causal attention (right-padded
        training batches)."""
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


def left_padded(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [batch, longest] with each sequence's tokens at the end of its row, and each row's pads."""
    longest = max(len(s) for s in seqs)
    pad_left = torch.tensor([longest - len(s) for s in seqs], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(s)) + s for s in seqs], device=device)
    return ids, pad_left


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
    """Position ids [batch, length] for slots start..start+length, counted from each row's first real
    token."""
    slots = torch.arange(start, start + length, device=pad_left.device)
    return (slots[None, :] - pad_left[:, None]).clamp(min=0)
