"""DeepSeek-V3 (model_type `deepseek_v3`): Multi-head Latent Attention and DeepSeekMoE, with Hugging Face's
parameter names, on the same interface as `Transformer` (whose embeddings, norms, `hidden`, `forward` and
`init_weights` it inherits), so the engine and the trainers run it unchanged.

MLA compresses keys and values into one normalised latent per token (`kv_lora_rank`) plus a small rope key
shared by all heads (`qk_rope_head_dim`): that is all `MLACache` keeps. Prefill and training expand the latent
into per-head keys and values (`kv_b_proj`); decoding one token instead folds the key up-projection into the
query and applies the value up-projection after attention, so the cache is never expanded per head.

DeepSeekMoE: sigmoid affinities choose the top-k routed experts (group-limited), a per-expert bias is added
only for that choice, and the weights come from the unbiased scores. The bias is the auxiliary-loss-free
balancing of DeepSeek-V3: `after_step` nudges it against each expert's load over the last training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketr1.model.config import ModelConfig
from pocketr1.model.transformer import MLP, KVCache, RMSNorm, Transformer, apply_rope, sequence_attention

BALANCE_SPEED = 1e-3  # gamma, the bias update speed (DeepSeek-V3 used 0.001 for most of its training)
LORA_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with their default eps, not rms_norm_eps


class MLACache(KVCache):
    """Per layer and token only the normalised latent and the rotated rope key: [layers, batch, 1, capacity,
    dim] each (one "head", so `reserve`/`expand`/`select` are KVCache's own)."""

    names = ("latent", "k_rope")

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        def shape(dim: int) -> tuple[int, ...]:
            return cfg.num_hidden_layers, batch, 1, 0, dim

        self._allocate(max_len, {"latent": shape(cfg.kv_lora_rank), "k_rope": shape(cfg.qk_rope_head_dim)},
                       dtype, device)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate [batch, time, heads, dim]. Interleaved weights pair dims (0,1), (2,3)...: gathering evens then odds
    turns them into the rotate-half layout, which is also the layout HF rotates and caches them in."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return apply_rope(x, cos, sin)


class MLA(nn.Module):
    absorb = True  # decode through the latent (tests switch it off to compare with the expanded path)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.interleave = layer, cfg.num_attention_heads, cfg.rope_interleave
        self.nope, self.rope, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                                       cfg.kv_lora_rank)
        h, n, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, n * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, n * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, h, bias=False)
        self.scale = qk ** -0.5  # (yarn's mscale would change it: rope scaling is refused in ModelConfig)

    def forward(self, x, cos, sin, mask, cache: MLACache | None):
        b, t, _ = x.shape
        n = self.n_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, t, n, -1).split([self.nope, self.rope], dim=-1)
        q_nope, q_rope = q_nope.transpose(1, 2), rope(q_rope, cos, sin, self.interleave).transpose(1, 2)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [b, 1, t, rank]: one "head" shared by all
        k_rope = rope(k_rope[:, :, None], cos, sin, self.interleave).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.latent[self.layer, :, :, start:start + t] = latent
            cache.k_rope[self.layer, :, :, start:start + t] = k_rope
            length = start + t if mask is None else mask.shape[-1]  # see Attention: the mask hides empty slots
            latent = cache.latent[self.layer, :, :, :length]
            k_rope = cache.k_rope[self.layer, :, :, :length]
            if t == 1 and self.absorb:
                out = self.absorbed(q_nope, q_rope, latent, k_rope, mask)
                return self.o_proj(out.reshape(b, 1, -1))
        kv = self.kv_b_proj(latent[:, 0]).view(b, -1, n, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, n, -1, -1)], dim=-1)
        out = sequence_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """One query per row, attending in latent space: q_nope·W_UK is a query over the latent (so keys are
        never expanded per head) and W_UV is applied once to the attention-weighted latent. [b, 1, n, v]."""
        b, n = q_nope.shape[0], self.n_heads
        w = self.kv_b_proj.weight.view(n, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [n, nope, rank], [n, v, rank]
        q_latent = (q_nope.reshape(b, n, self.nope).transpose(0, 1) @ w_uk).transpose(0, 1)  # [b, n, rank]
        scores = q_latent @ latent[:, 0].transpose(1, 2) + q_rope.reshape(b, n, self.rope) @ k_rope[:, 0].mT
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask.view(b, 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        context = probs @ latent[:, 0]  # [b, n, rank]
        return (context.transpose(0, 1) @ w_uv.transpose(1, 2)).transpose(0, 1)  # [b, n, v]


class Router(nn.Module):
    """HF's `mlp.gate`: the affinity weights and the balancing bias (a buffer: no gradient, saved with the
    weights). `load` counts the tokens each expert received since the last `balance`, in training forwards only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and indices of each token's experts, [tokens, top_k] each."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in float32, as HF keeps them
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()  # the bias steers the choice, not the weights
        if cfg.n_group > 1:  # keep the topk_group groups whose two best experts score highest
            groups = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        index = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, index)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training and torch.is_grad_enabled():  # a training step's forward, not scoring passes
            counts = torch.bincount(index.flatten(), minlength=cfg.n_routed_experts).float()
            self.load = counts if self.load is None else self.load + counts
        return weights * cfg.routed_scaling_factor, index


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.gate(flat)
        out = torch.zeros_like(flat)
        # Each expert runs once, on the tokens routed to it. Training runs idle experts too, on no tokens: their
        # weights then get (zero) gradients, which DDP requires of every parameter in every step.
        for expert in range(len(self.experts)) if self.training else index.unique().tolist():
            rows, slot = (index == expert).nonzero(as_tuple=True)
            y = self.experts[expert](flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.view_as(x) + self.shared_experts(x)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer)
        self.mlp = MLP(cfg) if layer < cfg.first_k_dense_replace else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3(Transformer):
    Layer = Layer

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> MLACache:
        return MLACache(self.config, batch, max_len, dtype, device)

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    @torch.no_grad()
    def balance(self, speed: float) -> None:
        """Auxiliary-loss-free balancing: lower the bias of experts that took more than the mean load since the
        last call, raise it for those below. Only routing sees the bias: the loss and gradients don't."""
        for router in self.routers():
            if router.load is not None:
                load = router.load.to(router.e_score_correction_bias.device)
                router.e_score_correction_bias += speed * torch.sign(load.mean() - load)
                router.load = None

    def after_step(self) -> None:
        """Called by the trainers after each optimizer step."""
        self.balance(BALANCE_SPEED)

    @torch.no_grad()
    def frozen(self, dtype: torch.dtype) -> DeepseekV3:
        """A copy for generation only, in `dtype` (the balancing bias stays float32, as HF keeps it)."""
        with torch.device("meta"):
            twin = DeepseekV3(self.config)
        state = {k: v.to(torch.float32 if k.endswith("e_score_correction_bias") else dtype, copy=True)
                 for k, v in self.state_dict().items()}
        twin.load_state_dict(state, assign=True)
        if self.config.tie_word_embeddings:
            twin.lm_head.weight = twin.model.embed_tokens.weight
        twin.rope_cos, twin.rope_sin = self.rope_cos, self.rope_sin
        return twin.eval().requires_grad_(False)
