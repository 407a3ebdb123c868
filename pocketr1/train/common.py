"""What every training stage shares: device choice, optimiser, LR schedule, metrics log, and resumable
checkpoints (model + optimiser + progress) written as safetensors and JSON, never pickle."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
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
    """AdamW with decay on matrices only (not norms, biases), over the trainable parameters (e.g. LoRA's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass: on CPU 3.5x faster than the per-op (foreach) path on
    # one thread, 4.6x on two. Plain tensors on CPU/CUDA only (not FSDP's sharded DTensors, not MPS).
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in trainable)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    if fused:  # it writes the weights without bumping their version counters, by which the engine's frozen
        # copy (engine/generate.py `weights_stamp`) notices that a policy has changed
        optimizer.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(trainable))
    return optimizer


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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        except OSError as e:  # a full disk: one sentence, not a traceback (a torn line is dropped on resume)
            raise UserError(f"cannot append to {self.path}: {e.strerror or e}.") from None

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



class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training loop after it saved a checkpoint; the message says where (the CLI prints it
    and exits 130)."""


class StopOnInterrupt:
    """Ctrl-C during a training loop finishes the step and saves instead of dying in the middle of it.

        stop = StopOnInterrupt()
        for step in stop.steps(bar):        # while the loop runs, SIGINT only sets a flag
            ...one optimiser step...
            stopping = stop.requested()     # once per step (under torchrun every rank agrees)
            if stopping or <checkpoint due>:
                save_checkpoint(...)
            if stopping:
                stop.exit(f"pretrain step {step + 1}")   # raises Interrupted

    A second Ctrl-C raises KeyboardInterrupt at once (the last checkpoint stays whole: writes are atomic).
    Outside the main thread no handler can be installed and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.flag = False

    def _handler(self, _signum, _frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if distributed.is_main():
            print("\npocketr1: Ctrl-C: saving a checkpoint after this step (press again to stop at once).",
                  file=sys.stderr, flush=True)

    def steps(self, iterable: Iterable) -> Iterator:
        """`iterable`, with the handler installed until the loop ends, however it ends."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._handler) if main else None
        try:
            yield from iterable
        finally:
            if main:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def requested(self) -> bool:
        if distributed.world() > 1:  # a collective: every rank calls this at the same point of each step
            return distributed.sum_all(float(self.flag))[0] > 0
        return self.flag

    def exit(self, where: str) -> None:
        raise Interrupted(f"stopped by Ctrl-C at {where}, after saving a checkpoint; --resume continues from there.")

def _beyond(line: str, stage: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return True
    return row.get("stage") == stage and row.get("step", 0) > step


def save_checkpoint(folder: Path, model: Transformer, optimizer: torch.optim.Optimizer, progress: dict,
                    extra: dict[str, Transformer] | None = None, trainable_only: bool = False) -> None:
    """Model, optimiser state and `progress` (step, RNG, anything JSON) as one atomically swapped folder.
    `extra` models (e.g. GRPO's reference) are saved beside it as `<name>.safetensors`.
    `trainable_only`: only the parameters that train (a LoRA adapter) go in, as `trainable.safetensors`;
    the frozen rest comes from wherever the caller loaded it (see `load_checkpoint(into=...)`).
    Under torchrun every rank calls this (FSDP gathers the full state) and rank 0 alone writes."""
    weights = distributed.full_state(model)  # a collective under FSDP: every rank takes part
    opt_state = distributed.full_optim_state(model, optimizer)
    if not distributed.is_main():
        return
    model = distributed.unwrap(model)
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in keep}
    elif model.config.tie_word_embeddings:
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
        if trainable_only:
            save_file(weights, str(tmp / "trainable.safetensors"))
        else:
            save_file(weights, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
        save_file(flat, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({**progress, "optimizer": layout}, indent=2))
        for name, other in (extra or {}).items():
            save_file(state_for_saving(other), str(tmp / f"{name}.safetensors"))

    write_dir(folder, fill)


def load_checkpoint(folder: Path, optimizer_factory, device: torch.device, into: Transformer | None = None
                    ) -> tuple[Transformer, torch.optim.Optimizer, dict] | None:
    """The model, optimiser and progress saved in `folder`, or None if there is no checkpoint.
    `into`: a checkpoint written with `trainable_only` fills that model's trainable parameters."""
    folder = recover_dir(folder)
    if not (folder / "progress.json").is_file():
        return None
    model = load_model(folder, device=device, dtype=torch.float32).train() if into is None else \
        _load_trainable(folder, into)
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


def _load_trainable(folder: Path, into: Transformer) -> Transformer:
    want = {n for n, p in into.named_parameters() if p.requires_grad}
    try:
        state = load_file(str(folder / "trainable.safetensors"), device=str(into.lm_head.weight.device))
    except Exception as e:  # missing or damaged file
        raise UserError(f"checkpoint {folder} has no usable trainable weights ({e}); delete it to restart.") from None
    if set(state) != want:
        raise UserError(f"checkpoint {folder} was written for other trainable parameters (e.g. another LoRA "
                        "rank or target list); delete it or resume with the same settings.")
    into.load_state_dict(state, strict=False)
    return into.train()


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
