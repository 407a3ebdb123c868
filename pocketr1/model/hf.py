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
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} must hold a JSON object, not {type(config).__name__}.")
    return ModelConfig.from_hf(config)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} is not a shard index (it needs a weight_map of tensor name -> file name).")
        names = sorted(set(weight_map.values()))
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


MAX_POSITIONS = 1 << 22  # rope tables cover every position up front: 4M positions at head_dim 128 is 4 GiB
MIN_BYTES_PER_PARAM = 0.5  # no weight file pocket-r1 reads stores less (int8 is 1 byte; slack for the count)
WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names; I8 too in a quantized folder


def validate_folder(folder: Path) -> ModelConfig:
    """The folder's config, once nothing in it can make loading allocate from hostile numbers: the sizes
    it describes must fit the weight files on disk, the context must be sane, rope settings numeric, every
    weight a float (int8 only where the config says the folder is quantized). Reads headers, no data."""
    cfg = read_config(folder)
    if cfg.max_position_embeddings > MAX_POSITIONS:
        raise UserError(f"{folder / 'config.json'}: max_position_embeddings {cfg.max_position_embeddings:,} is "
                        f"more positions than pocket-r1 accepts ({MAX_POSITIONS:,}).")
    for name in ("rope_theta", "rms_norm_eps"):
        value = getattr(cfg, name)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise UserError(f"{folder / 'config.json'}: {name} must be a positive number, not {value!r}.")
    files = _weight_files(folder)
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing.")
    allowed = WEIGHT_DTYPES | ({"I8"} if "quantization_config" in read_json(folder / "config.json") else set())
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if (dtype := f.get_slice(name).get_dtype()) not in allowed:
                        raise UserError(f"{path.name}: '{name}' is stored as {dtype}; weights must be "
                                        f"floating point ({', '.join(sorted(allowed))}).")
                    # The embedding alone tells a config that does not describe these weights, before the
                    # model is built from it.
                    shape = tuple(f.get_slice(name).get_shape())
                    if name == "model.embed_tokens.weight" and shape != (cfg.vocab_size, cfg.hidden_size):
                        raise UserError(f"{path.name}: '{name}' has shape {shape}, config expects "
                                        f"{(cfg.vocab_size, cfg.hidden_size)}.")
        except SafetensorError as e:
            raise UserError(f"{path} is not a valid safetensors file ({e}).") from None
    on_disk = sum(path.stat().st_size for path in files)
    if cfg.num_params() * MIN_BYTES_PER_PARAM > on_disk:
        raise UserError(f"{folder / 'config.json'} describes {cfg.num_params():,} parameters, but the weight files "
                        f"hold only {on_disk:,} bytes.")
    return cfg


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


def stored_quantization(folder: Path) -> dict | None:
    """The `quantization_config` of a folder `pocketr1 quantize` wrote, None for a float checkpoint."""
    from pocketr1.modify.quantize import METHOD

    quant = read_json(folder / "config.json").get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if method != METHOD:
        raise UserError(f"{folder} is quantized with '{method}', which pocket-r1 cannot read (only {METHOD}).")
    return quant


def refuse_quantized(folder: Path, doing: str) -> None:
    """Changing weights needs the float checkpoint: int8 rows and their scales are not trainable parameters."""
    if stored_quantization(folder):
        raise UserError(f"{folder} holds int8 weights, which cannot be used for {doing}; use the float model it "
                        "was quantized from (and quantize the result afterwards).")


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               int8: bool = False) -> Transformer:
    """Load a model folder, memory-mapped: tensors already in `dtype` stay views of the file, read only
    when used. `int8`: quantize the projections while loading (see modify/quantize.py); folders written
    by `pocketr1 quantize` load quantized either way. Quantized models run on the CPU."""
    from pocketr1.modify.quantize import drop_pages, install_int8, scale_names

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    cfg = validate_folder(folder)  # hostile folders are refused here, before anything is built
    stored = stored_quantization(folder)
    if (stored or int8) and torch.device(device).type != "cpu":
        raise UserError(f"int8 models run on the CPU only; load {folder} with --device cpu.")
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if stored:
        expected |= scale_names(model)
    state = load_state(folder, expected)
    if "lm_head.weight" not in state and not cfg.tie_word_embeddings:
        raise UserError(f"{folder} has an untied head but no lm_head.weight.")
    if stored or int8:
        install_int8(model, state, stored=stored is not None)
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    # The meta-device model has no storage: its parameters become the loaded (memory-mapped) tensors. A
    # tensor that must change dtype is copied, and the file's pages it was read from are released at once,
    # so loading never holds both copies of the whole model.
    loaded = {}
    for name in list(state):
        source = state.pop(name)
        loaded[name] = source.to(torch.float32 if name.endswith(KEEP_FLOAT32) else dtype)
        if loaded[name].data_ptr() != source.data_ptr():
            drop_pages(source)
    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings and not (stored or int8):
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
    if model.quantization:  # an int8 model (modify/quantize.py): its state holds int8 weights + scales
        config["quantization_config"] = model.quantization

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())

    write_dir(folder, fill)
