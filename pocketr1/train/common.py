"""What every training stage shares: device choice, optimiser, LR schedule, metrics log, and resumable
checkpoints (model + optimiser + progress) written as safetensors and JSON, never pickle."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketr1.engine.generate import native_bf16
from pocketr1.errors import UserError
from pocketr1.fsutil import read_json, recover_dir, write_dir, write_text
from pocketr1.model import ModelConfig, Transformer, build_model, load_model
from pocketr1.model.hf import state_for_saving
from pocketr1.train import distributed


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (try auto, cpu, cuda, mps).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available.")
    return device


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matmuls pay on CUDA and on CPUs with AVX512-BF16 or AMX (about 2-4x fp32 here)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_bf16(device)  # the same CPU check generation uses


def autocast(device: torch.device, dtype: str):
    """Mixed precision for a training forward: weights and optimiser stay fp32, matmuls run in bf16."""
    enabled = dtype == "bfloat16" or (dtype == "auto" and bf16_is_fast(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not norms, biases)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Metrics:
    """Appends one JSON object per line to `metrics.jsonl`; on resume drops lines past the checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, stage: str, step: int, **values) -> None:
        if not distributed.is_main():  # one writer under torchrun
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")

    def truncate(self, stage: str, after_step: int) -> None:
        """Forget `stage` records beyond `after_step`: a resumed stage logs them again, with no duplicates."""
        if not distributed.is_main() or not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not _beyond(line, stage, after_step)]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def read(self, stage: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if stage is None or row.get("stage") == stage:
                rows.append(row)
        return rows


def _beyond(line: str, stage: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return True
    return row.get("stage") == stage and row.get("step", 0) > step


def save_checkpoint(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer, progress: dict,
                    extra: dict[str, Transformer] | None = None) -> None:
    """Model, optimiser state and `progress` (step, RNG, anything JSON) as one atomically swapped folder.
    `extra` models (e.g. GRPO's reference) are saved beside it as `<name>.safetensors`.
    Under torchrun every rank calls this (FSDP gathers the full state) and rank 0 alone writes."""
    weights = distributed.full_state(model)  # a collective under FSDP: every rank takes part
    opt_state = distributed.full_optim_state(model, optimizer)
    if not distributed.is_main():
        return
    model = distributed.unwrap(model)
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    weights = {k: v.contiguous() for k, v in weights.items()}
    flat, layout = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, state in opt_state["state"].items():
        layout["state"][str(idx)] = sorted(state)
        for key, value in state.items():
            flat[f"{idx}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                else torch.tensor(value)
    rng = {"torch": torch.get_rng_state()}

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
        save_file(flat, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({**progress, "optimizer": layout}, indent=2))
        for name, other in (extra or {}).items():
            save_file(state_for_saving(other), str(tmp / f"{name}.safetensors"))

    write_dir(folder, fill)


def load_checkpoint(folder: Path, optimizer_factory, device: torch.device
                    ) -> tuple[Transformer, torch.optim.Optimizer, dict] | None:
    """The model, optimiser and progress saved in `folder`, or None if there is no checkpoint."""
    folder = recover_dir(folder)
    if not (folder / "progress.json").is_file():
        return None
    model = load_model(folder, device=device, dtype=torch.float32).train()
    optimizer = optimizer_factory(model)
    progress = read_json(folder / "progress.json")
    layout = progress.pop("optimizer")
    try:
        flat = load_file(str(folder / "optimizer.safetensors"), device=str(device))
        torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"checkpoint {folder} is damaged ({e}); delete it to restart that stage.") from None
    state = {int(idx): {k: flat[f"{idx}.{k}"] for k in keys} for idx, keys in layout["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
    return model, optimizer, progress


def load_extra(folder: str | Path, name: str, into: Transformer) -> None:
    """Weights saved by `save_checkpoint(extra={name: ...})`, loaded into `into`."""
    path = Path(folder) / f"{name}.safetensors"
    try:
        into.load_state_dict(load_file(str(path), device=str(into.lm_head.weight.device)), strict=False)
    except Exception as e:  # missing or damaged file
        raise UserError(f"checkpoint {folder} has no usable {name} weights ({e}).") from None


def new_model(cfg: ModelConfig, seed: int, device: torch.device) -> Transformer:
    model = build_model(cfg)  # the family named by cfg.model_type
    model.init_weights(seed)
    return model.to(device).train()
