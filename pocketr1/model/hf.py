"""Hugging Face folders: `config.json` + `model.safetensors` (or sharded with an index) + tokenizer files.

Loading is memory-mapped through safetensors, validated before anything large is allocated, and never
unpickles (`.bin` checkpoints are refused). Saving writes the folder under a temp name, then renames it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pocketr1.errors import UserError
from pocketr1.fsutil import read_json, write_dir
from pocketr1.model.config import ModelConfig
from pocketr1.model.deepseek import DeepseekV3
from pocketr1.model.transformer import Transformer, rope_tables

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES: dict[str, type[Transformer]] = {"qwen2": Transformer, "llama": Transformer, "deepseek_v3": DeepseekV3}
KEEP_FLOAT32 = ("e_score_correction_bias",)  # nudged by ~1e-3 steps: bf16 would swallow them


def build_model(cfg: ModelConfig) -> Transformer:
    """An uninitialised model of `cfg`'s family (call under `torch.device("meta")` to allocate nothing)."""
    return FAMILIES[cfg.model_type](cfg)


def read_config(folder: Path) -> ModelConfig:
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json).")
    return ModelConfig.from_hf(read_json(folder / "config.json"))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = []
        for name in names:
            path = (folder / name).resolve()
            if path.parent != folder.resolve():
                raise UserError(f"{index} points outside its folder ({name}).")
            files.append(path)
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder} holds only pickle checkpoints (.bin/.pt); pocket-r1 reads safetensors only.")
    raise UserError(f"{folder} has no model.safetensors.")


def load_state(folder: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Read tensors by name, checking names and shapes against the model before reading any data."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise UserError(f"{path} is missing.")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name not in expected:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise UserError(f"{path.name} holds a tensor '{name}' this architecture does not have.")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise UserError(f"{path.name}: '{name}' has shape {shape}, config expects "
                                        f"{tuple(expected[name])}.")
                    state[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{path} is not a valid safetensors file ({e}).") from None
    missing = [n for n in expected if n not in state and not n.startswith("lm_head")]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} tensors, e.g. '{missing[0]}'.")
    return state


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> Transformer:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    cfg = read_config(folder)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state = load_state(folder, expected)
    if "lm_head.weight" not in state and not cfg.tie_word_embeddings:
        raise UserError(f"{folder} has an untied head but no lm_head.weight.")
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    # The meta-device model has no storage: its parameters become the loaded (memory-mapped) tensors.
    model.load_state_dict({k: v.to(torch.float32 if k.endswith(KEEP_FLOAT32) else dtype)
                           for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg)
    return model.to(device).eval()


def state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict as HF stores it: contiguous CPU tensors, no duplicate for a tied head."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: Transformer, folder: str | Path, extra_files: dict[str, Path] | None = None) -> None:
    """Write a complete HF folder atomically. `extra_files` (name -> source) are copied in, e.g. tokenizer."""
    folder = Path(folder)
    cfg = model.config
    state = state_for_saving(model)
    dtype = next(iter(state.values())).dtype
    config = cfg.to_hf() | {"torch_dtype": {v: k for k, v in DTYPES.items()}[dtype]}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())

    write_dir(folder, fill)
