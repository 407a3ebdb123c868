"""LoRA adapters through `peft`, on pocket-r1's own Transformer, saved in peft's own format.

Our modules carry Hugging Face's names (`model.layers.0.self_attn.q_proj`, ...), so `peft` injects its
LoRA layers where it would inject them into `transformers`' Qwen2/Llama, and the saved adapter has the keys
`PeftModel.save_pretrained` writes (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`):

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), ADAPTER)   # elsewhere

`merge` folds the adapter in (W + scale * B @ A, by peft's own `merge`) and leaves a plain model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pocketr1.errors import UserError
from pocketr1.fsutil import write_dir

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's own parameter names


def target_modules(model: nn.Module) -> list[str]:
    """The names of every linear layer inside the decoder blocks (q/k/v/o and gate/up/down for Qwen2 and
    Llama; MLA's projections and the experts' for DeepSeek): never the embeddings or the head."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
                   if isinstance(m, nn.Linear)})


def lora_config(model: nn.Module, rank: int = 16, alpha: float = 32, dropout: float = 0.0,
                targets: list[str] | None = None, base: str | None = None) -> LoraConfig:
    """A peft `LoraConfig` for `model` (all block linears unless `targets`), as a causal-LM adapter."""
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, not {rank}.")
    targets = targets or target_modules(model)
    unknown = set(targets) - set(target_modules(model))
    if unknown:
        raise UserError(f"this model has no linear layers named {', '.join(sorted(unknown))} "
                        f"(it has {', '.join(target_modules(model))}).")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets),
                      task_type="CAUSAL_LM", base_model_name_or_path=base)


def add_lora(model: nn.Module, config: LoraConfig, seed: int = 0) -> nn.Module:
    """Inject LoRA layers into `model` in place (peft's `inject_adapter_in_model`) and freeze everything
    else. The adapter weights are float32 whatever the base's dtype, and their random start depends on
    `seed` alone (not on what drew from torch's RNG before: every process and every rerun starts alike).
    Returns the same model."""
    if is_lora(model):
        raise UserError("this model already carries a LoRA adapter; merge it first.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
        if p.requires_grad:
            p.data = p.data.float()
    return model


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft saves them with."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # drops the adapter name ("default")
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, extra_files: dict[str, Path] | None = None) -> None:
    """Write `folder` atomically as a peft adapter: adapter_config.json + adapter_model.safetensors
    (`extra_files`, name -> source, are copied in beside them)."""
    config: LoraConfig = model.peft_config["default"]
    state = adapter_state(model)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())

    write_dir(folder, fill)


def read_config(folder: str | Path) -> LoraConfig:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder (no {CONFIG_FILE}).")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / CONFIG_FILE} is not a usable LoRA config ({e}).") from None
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise UserError(f"{folder} holds a {config.peft_type} adapter; only LoRA is supported.")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the LoRA adapter saved in `folder` (by pocket-r1 or by peft for the same architecture) into
    `model` and fill its weights. Returns the same model, its adapter frozen like the rest."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read {folder / WEIGHTS_FILE} ({e}).") from None
    try:
        add_lora(model, config)
    except ValueError as e:  # peft: none of the target modules exist in this model
        raise UserError(f"the adapter in {folder} does not fit this model ({e}).") from None
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(state) != expected:
        extra = sorted(set(state) - expected) or sorted(expected - set(state))
        raise UserError(f"the adapter in {folder} does not fit this model (e.g. '{extra[0]}').")
    try:
        set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # shapes: an adapter trained for another model size
        raise UserError(f"the adapter in {folder} does not fit this model ({str(e).splitlines()[0]}).") from None
    return model.requires_grad_(False)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (peft's `merge`) and put the plain layer back: the model
    computes what it did with the adapter on, with no adapter left. Returns the same model."""
    parents = dict(model.named_modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(parents[parent] if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
