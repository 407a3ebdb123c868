"""Architecture config, read from and written as a Hugging Face `config.json` (qwen2 / llama / deepseek_v3).

One dataclass for every family, so `model.model_type=deepseek_v3` is a plain run override: the DeepSeek fields
are ignored by qwen2/llama and left out of their `config.json`. A DeepSeek size left at 0 is derived from the
width (as `head_dim` is), so presets that only set hidden size and heads also size MLA and the experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pocketr1.errors import UserError

SUPPORTED = ("qwen2", "llama", "deepseek_v3")
MAX_PARAMS = 200e9  # a config claiming more is refused before anything is allocated
MAX_LAYERS = 1024  # each layer is built (on the meta device) before weights load: a million would hang
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
# DeepSeek fields: HF names. Sizes at 0 are derived from the width (see `_derive_deepseek`).
DEEPSEEK = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
            "topk_group", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "rope_interleave")
DERIVED = ("head_dim", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "moe_intermediate_size")  # re-derived by `config.build` when the width changes


@dataclass(slots=True)
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True  # Qwen2 always has q/k/v biases; Llama usually none
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "float32"
    # DeepSeek-V3 (model_type deepseek_v3): MLA and DeepSeekMoE.
    q_lora_rank: int = 0  # 0: a plain q_proj (HF's None); else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 0  # the cached latent per token and layer (0: 2 * head_dim)
    qk_nope_head_dim: int = 0  # 0: head_dim
    qk_rope_head_dim: int = 0  # the decoupled rope key, also cached (0: head_dim // 2)
    v_head_dim: int = 0  # 0: head_dim
    moe_intermediate_size: int = 0  # per expert (0: intermediate_size // 4)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1  # group-limited routing: experts in n_group groups, tokens go to topk_group of them
    topk_group: int = 1
    first_k_dense_replace: int = 1  # the first k layers keep a dense MLP
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rope_interleave: bool = True  # rope dims stored as interleaved pairs (HF's default for DeepSeek)

    def __post_init__(self):
        if self.model_type not in SUPPORTED:
            raise UserError(f"model_type '{self.model_type}' is not supported "
                            f"(supported: {', '.join(SUPPORTED)}).")
        for name in POSITIVE:
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, not {value!r}.")
        if type(self.head_dim) is not int or self.head_dim < 0:
            raise UserError(f"model config: head_dim must be a non-negative integer, not {self.head_dim!r}.")
        if self.num_hidden_layers > MAX_LAYERS:
            raise UserError(f"config describes {self.num_hidden_layers} layers, more than pocket-r1 accepts "
                            f"({MAX_LAYERS}).")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim == 0:
                raise UserError(f"model config: hidden_size {self.hidden_size} is smaller than "
                                f"num_attention_heads {self.num_attention_heads}.")
        if self.model_type == "deepseek_v3":
            self._derive_deepseek()
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("num_attention_heads must be a multiple of num_key_value_heads.")
        if self.num_params() > MAX_PARAMS:
            raise UserError(f"config describes {self.num_params():.3g} parameters, "
                            "more than pocket-r1 accepts.")

    def _derive_deepseek(self) -> None:
        hd = self.head_dim
        self.num_key_value_heads = self.num_attention_heads  # MLA has no KV heads: each head reads the latent
        self.attention_bias = False  # (HF's DeepSeek biases are refused in `from_hf`)
        for name, value in (("kv_lora_rank", 2 * hd), ("qk_nope_head_dim", hd), ("qk_rope_head_dim", hd // 2),
                            ("v_head_dim", hd), ("moe_intermediate_size", self.intermediate_size // 4)):
            if getattr(self, name) == 0:
                setattr(self, name, max(2, value - value % 2))
        for name in DEEPSEEK:
            value = getattr(self, name)
            kind = "boolean" if name in ("norm_topk_prob", "rope_interleave") else \
                "number" if name == "routed_scaling_factor" else "integer"
            ok = type(value) is bool if kind == "boolean" else \
                type(value) in {"number": (int, float), "integer": (int,)}[kind] and value >= 0
            if not ok:
                want = "true or false" if kind == "boolean" else f"a non-negative {kind}"
                raise UserError(f"model config: {name} must be {want}, not {value!r}.")
        if self.qk_rope_head_dim % 2:
            raise UserError("model config: qk_rope_head_dim must be even (rope rotates pairs).")
        for name in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            if getattr(self, name) == 0:
                raise UserError(f"model config: {name} must be positive.")
        if self.n_routed_experts % self.n_group or self.n_routed_experts // self.n_group < 2:
            raise UserError(f"model config: {self.n_routed_experts} routed experts cannot form {self.n_group} "
                            "groups of at least 2 (each group is scored by its two best experts).")
        if self.topk_group > self.n_group:
            raise UserError(f"model config: topk_group {self.topk_group} exceeds n_group {self.n_group}.")
        if self.num_experts_per_tok > self.topk_group * self.n_routed_experts // self.n_group:
            raise UserError(f"model config: num_experts_per_tok {self.num_experts_per_tok} exceeds the experts "
                            f"in {self.topk_group} of {self.n_group} groups.")

    def num_params(self) -> int:
        if self.model_type == "deepseek_v3":
            return self._deepseek_params()
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + embed + h

    def _deepseek_params(self) -> int:
        h, n = self.hidden_size, self.num_attention_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * n * qk if not self.q_lora_rank else self.q_lora_rank * (h + 1 + n * qk)
        attn = q + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * (
            1 + n * (self.qk_nope_head_dim + self.v_head_dim)) + n * self.v_head_dim * h
        dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        moe = 3 * h * self.moe_intermediate_size * (self.n_routed_experts + self.n_shared_experts) + \
            self.n_routed_experts * (h + 1)
        mlps = dense * 3 * h * self.intermediate_size + (self.num_hidden_layers - dense) * moe
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + 2 * h) + mlps + embed + h

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Build from a `config.json` dict; keys we don't model are ignored, as transformers does."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("model_type") == "qwen2":
            kwargs["attention_bias"] = True
        if d.get("model_type") == "deepseek_v3":
            kwargs.pop("head_dim", None)  # HF writes qk_rope_head_dim here; ours is the width's head size
            if d.get("attention_bias"):
                raise UserError("deepseek_v3 with attention_bias is not supported.")
            if d.get("hidden_act", "silu") != "silu":
                raise UserError(f"hidden_act '{d.get('hidden_act')}' is not supported.")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]  # transformers >= 5 writes `dtype` instead of `torch_dtype`
        if d.get("rope_scaling"):
            raise UserError("rope_scaling is not supported yet.")
        rope = d.get("rope_parameters")  # transformers >= 5 writes rope_theta inside this dict
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                raise UserError(f"rope_type '{rope.get('rope_type')}' is not supported yet.")
            if rope.get("rope_theta") is not None:
                kwargs["rope_theta"] = rope["rope_theta"]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise UserError(f"config.json has a field of the wrong type ({e}).") from None

    def to_hf(self) -> dict:
        d = asdict(self)
        if self.model_type == "deepseek_v3":
            d.pop("head_dim")  # HF derives it (as qk_rope_head_dim)
            d.update(architectures=["DeepseekV3ForCausalLM"], hidden_act="silu", use_cache=True,
                     initializer_range=0.02, attention_dropout=0.0, attention_bias=False,
                     q_lora_rank=self.q_lora_rank or None, num_nextn_predict_layers=0)
            return d
        for name in DEEPSEEK:
            d.pop(name)
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        d.update(architectures=[arch], hidden_act="silu", use_cache=True, initializer_range=0.02,
                 attention_dropout=0.0)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            d["mlp_bias"] = False
        return d
