"""Architecture config, read from and written as a Hugging Face `config.json` (qwen2 / llama)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pocketr1.errors import UserError

SUPPORTED = ("qwen2", "llama")
MAX_PARAMS = 200e9  # a config claiming more is refused before anything is allocated
MAX_LAYERS = 1024  # each layer is built (on the meta device) before weights load: a million would hang
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")


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
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("num_attention_heads must be a multiple of num_key_value_heads.")
        if self.num_params() > MAX_PARAMS:
            raise UserError(f"config describes {self.num_params():.3g} parameters, "
                            "more than pocket-r1 accepts.")

    def num_params(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + embed + h

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Build from a `config.json` dict; keys we don't model are ignored, as transformers does."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if d.get("model_type") == "qwen2":
            kwargs["attention_bias"] = True
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
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
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        d.update(architectures=[arch], hidden_act="silu", use_cache=True, initializer_range=0.02,
                 attention_dropout=0.0)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            d["mlp_bias"] = False
        return d
