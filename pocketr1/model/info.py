"""`pocketr1 info MODEL`: a model folder at a glance, read from `config.json` and the safetensors headers
(no weights are loaded), with what a KV cache costs per token: the figure that bounds batch size and context.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

from safetensors import SafetensorError, safe_open

from pocketr1.errors import UserError
from pocketr1.model.config import ModelConfig
from pocketr1.model.hf import _weight_files, read_config

BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def kv_values_per_layer(cfg: ModelConfig, kv_heads: int = 0) -> int:
    """Values cached per token and layer: MLA's latent + rope key, or a key and a value per KV head (for
    deepseek_v3 with `kv_heads` > 0: what a GQA model of the same width would cache)."""
    if cfg.model_type == "deepseek_v3" and not kv_heads:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * (kv_heads or cfg.num_key_value_heads) * cfg.head_dim


def _tensors(folder: Path) -> tuple[int, str]:
    """Parameter count and the dtype most of them are stored in."""
    count, dtypes = 0, Counter()
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    n = prod(piece.get_shape())
                    count += n
                    dtypes[piece.get_dtype()] += n
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
    return count, dtypes.most_common(1)[0][0] if dtypes else "F32"


def describe(folder: str | Path) -> str:
    folder = Path(folder)
    cfg = read_config(folder)
    params, dtype = _tensors(folder)
    size, layers = BYTES.get(dtype, 4), cfg.num_hidden_layers

    def kv(values: int) -> str:
        return f"{values * size * layers:,} B per token ({layers} layers), {values * size:,} B per layer"

    rows = [("model", cfg.model_type), ("parameters", f"{params:,} ({params / 1e6:.2f} M)"),
            ("dtype", NAMES.get(dtype, dtype.lower())), ("layers", str(layers)),
            ("hidden size", f"{cfg.hidden_size} ({cfg.num_attention_heads} heads)"),
            ("context", f"{cfg.max_position_embeddings:,} tokens")]
    if cfg.model_type == "deepseek_v3":
        routed = f"{cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok})"
        rows.append(("experts", f"{routed} + {cfg.n_shared_experts} shared, first {cfg.first_k_dense_replace} "
                                "layers dense"))
        rows.append(("KV cache bytes per token", f"MLA (latent {cfg.kv_lora_rank} + rope key "
                                                 f"{cfg.qk_rope_head_dim}): {kv(kv_values_per_layer(cfg))}"))
        # The same width as a Qwen2/Llama model: every head its own K and V (MHA), or pocket-r1's 2 KV heads.
        for label, heads in (("MHA", cfg.num_attention_heads), ("GQA", min(2, cfg.num_attention_heads))):
            rows.append(("", f"vs {label} of the same width ({heads} KV heads x {cfg.head_dim}): "
                             f"{kv(kv_values_per_layer(cfg, heads))}"))
    else:
        rows.append(("KV cache bytes per token", f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim}: "
                                                 f"{kv(kv_values_per_layer(cfg))}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
