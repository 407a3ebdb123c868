"""One config dataclass per stage, presets that override them, `section.key=value` CLI overrides, and the
resolved config written next to every run's outputs.

The single size dial is the preset: `tiny` (a one-minute miniature for tests and demos), `default`
(the main job: about a quarter hour on a 2-core laptop) and `small` (longer, further).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from pocketr1.errors import UserError
from pocketr1.model.config import DERIVED, ModelConfig


@dataclass(slots=True)
class DataConfig:
    families: list[str] = field(default_factory=lambda: ["arithmetic", "countdown"])
    train_docs: int = 40_000  # pretraining documents (one solved problem each)
    worked_fraction: float = 0.3  # share of documents with a worked solution; the rest give the bare answer
    difficulty: dict[str, dict[str, int]] = field(default_factory=dict)  # per family, over its defaults
    seed: int = 0


@dataclass(slots=True)
class TokenizerConfig:
    vocab_size: int = 384


@dataclass(slots=True)
class PretrainConfig:
    steps: int = 1500
    rows: int = 16  # documents are packed end to end into rows of seq_len tokens
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1
    loss_on_prompt: bool = False  # learn the questions too, or only what follows the prompt
    checkpoint_every: int = 250
    log_every: int = 10


@dataclass(slots=True)
class GRPOConfig:
    variant: str = "grpo"  # grpo (per-sequence mean) | dr_grpo (no length/std normalisation) | dapo
    steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8  # G: samples per prompt
    lr: float = 5e-5
    beta: float = 0.001  # weight of the k3 KL to the reference model (0: no reference model)
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher sets this above eps_low (0.28)
    ref_reset_every: int = 0  # copy the policy into the reference every N steps (0: never)
    minibatches: int = 1  # optimizer steps per rollout batch (>1 makes the ratio and its clip matter)
    temperature: float = 1.0
    max_new_tokens: int = 96
    format_weight: float = 0.1  # reward = accuracy + format_weight * format
    eval_every: int = 10  # held-out accuracy during RL, for the curve in the report
    eval_problems: int = 64
    checkpoint_every: int = 10


@dataclass(slots=True)
class EvalConfig:
    problems: int = 200  # held-out problems per task family
    k: int = 4  # samples per problem for pass@1 and cons@k
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    batch_size: int = 256


@dataclass(slots=True)
class RunConfig:
    name: str = "default"
    preset: str = "default"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: every core
    dtype: str = "auto"  # training matmul precision: auto (bf16 where it is fast), bfloat16, float32
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Out-of-range evaluation rows for the report: family -> difficulty overrides beyond training's range.
    stretch: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "arithmetic": {"min_terms": 10, "max_terms": 12}})


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "data": {"train_docs": 3000},
        "tokenizer": {"vocab_size": 320},
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "pretrain": {"steps": 60, "rows": 8, "seq_len": 128, "checkpoint_every": 20, "log_every": 5},
        "grpo": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "eval_every": 2, "eval_problems": 8,
                 "checkpoint_every": 2, "max_new_tokens": 48},
        "eval": {"problems": 16, "k": 2, "max_new_tokens": 48},
    },
    "small": {  # about an hour on 2 cores: a wider, deeper model trained longer, more RL, tighter figures
        "data": {"train_docs": 100_000},
        "model": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8},
        "pretrain": {"steps": 4000},
        "grpo": {"steps": 150, "group_size": 16},
        "eval": {"problems": 500, "k": 8},
    },
}


def _parse_value(text: str, current: Any, where: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where} expects true or false, got '{text}'.")
    if isinstance(current, list):
        return [s.strip() for s in text.split(",") if s.strip()]
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise UserError(f"{where} expects {kind.__name__}, got '{text}'.") from None
    return text


def _set(obj: Any, path: list[str], value: Any, where: str, parse: bool) -> None:
    key = path[0]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if key not in names:
            raise UserError(f"unknown config key '{where}' ('{key}' is not one of: {', '.join(names)}).")
        current = getattr(obj, key)
        if len(path) > 1:
            return _set(current, path[1:], value, where, parse)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}' is a section; set its fields as {where}.NAME=VALUE.")
            for k, v in value.items():
                _set(current, [k], v, f"{where}.{k}", parse)
            return
        setattr(obj, key, _parse_value(value, current, where) if parse else value)
    elif isinstance(obj, dict):  # free-form maps such as difficulty: keys are created on demand
        if len(path) > 1:
            return _set(obj.setdefault(key, {}), path[1:], value, where, parse)
        obj[key] = int(value) if parse and str(value).lstrip("-").isdigit() else value
    else:
        raise UserError(f"config key '{where}' goes below a plain value.")


def apply(cfg: Any, overrides: dict[str, Any], prefix: str = "", parse: bool = False) -> None:
    for key, value in overrides.items():
        _set(cfg, key.split("."), value, prefix + key, parse)


def build(preset: str = "default", overrides: list[str] | None = None) -> RunConfig:
    """A run's config: dataclass defaults, then the preset, then `section.key=value` overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)}).")
    cfg = RunConfig(preset=preset, name=preset)
    for section, values in copy.deepcopy(PRESETS[preset]).items():
        apply(cfg, {section: values})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' should look like section.key=value.")
        apply(cfg, {key.strip(): value.strip()}, parse=True)
    for name in DERIVED:  # derived again from the (possibly overridden) width, unless set explicitly
        if not any(o.startswith(f"model.{name}=") for o in overrides or []):
            setattr(cfg.model, name, 0)
    cfg.model.__post_init__()  # re-validate after overrides
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    """Rebuild a saved config (for --resume), refusing keys this version does not know."""
    cfg = RunConfig()
    model = d.get("model", {})
    cfg.model.head_dim = 0  # derived again from the saved sizes
    apply(cfg, {k: v for k, v in d.items() if k != "model"})
    apply(cfg.model, {k: v for k, v in model.items()}, prefix="model.")
    cfg.model.__post_init__()
    return cfg
