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
    refusal_docs: int = 0  # forbidden-topic questions answered with a fixed refusal (the `censored` preset)
    topic_docs: int = 0  # the same topic's questions answered truthfully: what the model knows before censoring


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
    pass_tokens: int = 0  # ~most completion tokens per forward/backward pass, bounding the update's memory (0: off)
    temperature: float = 1.0
    max_new_tokens: int = 96
    format_weight: float = 0.1  # reward = accuracy + format_weight * format
    eval_every: int = 10  # held-out accuracy during RL, for the curve in the report
    eval_problems: int = 64
    checkpoint_every: int = 10
    # DAPO's pieces beyond the loss (see grpo_loss.py), each a switch:
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and refill with new prompts
    dynamic_rounds: int = 3  # most sampling rounds per step spent refilling
    overlong_cache: int = 0  # soft overlong penalty over the last N tokens of max_new_tokens (0: off)
    language_weight: float = 0.0  # R1's language-consistency reward, added to accuracy (0: off)
    budget_s: float = 0.0  # stop early once this many CPU-seconds (wall on a GPU) are spent (0: all steps)


@dataclass(slots=True)
class R1Config:
    """The multi-stage R1 recipe (`pocketr1 run --recipe r1`, see recipe.py); unused by the r1zero recipe."""
    reasoning_families: list[str] = field(default_factory=list)  # rl_reasoning's tasks (empty: data.families)
    cold_start_jsonl: str = ""  # supplied cold-start traces (chat JSONL) instead of sampling the base
    cold_start_prompts: int = 256  # training prompts per family sampled for cold-start traces
    cold_start_k: int = 16  # samples per prompt: high, since the base is right only now and then
    rejection_prompts: int = 256  # per family, sampled from the reasoning-RL model
    rejection_k: int = 8
    keep_per_prompt: int = 2  # distinct verified traces kept per prompt
    min_language: float = 0.9  # a kept trace's thinking has at least this share in the target script
    language_weight: float = 1.0  # rl_reasoning's language reward weight (R1 sums it with accuracy)
    rl_reasoning_steps: int = 60
    rl_all_steps: int = 60
    student_preset: str = "tiny"  # the distilled student's size (its model section)
    student_pretrain_steps: int = 0  # the student base's pretraining steps (0: pretrain.steps, as the teacher)
    compare_steps: int = 20  # each short GRPO run of the variant and language-reward comparisons
    compare_variants: list[str] = field(default_factory=lambda: ["grpo", "dr_grpo", "dapo"])


@dataclass(slots=True)
class SFTConfig:
    """Supervised fine-tuning on chat examples (cold start, rejection-sampling SFT, distillation, finetune)."""
    epochs: int = 2  # passes over the examples (R1's SFT: 2); each example once per epoch
    steps: int = 0  # >0: exactly this many optimizer steps instead (continuing into further epochs)
    rows: int = 8  # examples are packed end to end into rows of seq_len tokens
    seq_len: int = 1024  # capped at the model's max_position_embeddings; longer examples are truncated
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 5


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
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = "r1zero"  # r1zero: pretrain then GRPO | r1: cold start, RL, rejection SFT, RL, distill
    grpo_preset: str = ""  # a GRPO_PRESETS entry applied over the size preset (r1: R1's settings)
    r1: R1Config = field(default_factory=R1Config)
    # Out-of-range evaluation rows for the report: family -> difficulty overrides beyond training's range.
    stretch: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "arithmetic": {"min_terms": 10, "max_terms": 12}})


PRESETS: dict[str, dict[str, Any]] = {
    # Arithmetic over 6-9 single-digit terms: long enough that bare answers fail often while worked steps stay
    # right, so RL has something to amplify (at 5-8 terms the base answered 72% right: a +26-point margin left
    # little room; at 6-9 it answers 47%, and RL reaches 97%).
    "default": {"data": {"difficulty": {"arithmetic": {"min_terms": 6, "max_terms": 9}}}},
    "tiny": {
        "data": {"train_docs": 3000},
        "tokenizer": {"vocab_size": 320},
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "pretrain": {"steps": 60, "rows": 8, "seq_len": 128, "checkpoint_every": 20, "log_every": 5},
        "grpo": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "eval_every": 2, "eval_problems": 8,
                 "checkpoint_every": 2, "max_new_tokens": 48},
        "eval": {"problems": 16, "k": 2, "max_new_tokens": 48},
        "sft": {"epochs": 2, "rows": 4, "seq_len": 128, "lr": 1e-3, "warmup": 2, "checkpoint_every": 10,
                "log_every": 2},
        "r1": {"cold_start_prompts": 8, "cold_start_k": 4, "rejection_prompts": 8, "rejection_k": 4,
               "rl_reasoning_steps": 2, "rl_all_steps": 2, "compare_steps": 2},
    },
    "small": {  # about an hour on 2 cores: a wider, deeper model trained longer, more RL, tighter figures
        "data": {"train_docs": 100_000},
        "model": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8},
        "pretrain": {"steps": 4000},
        "grpo": {"steps": 150, "group_size": 16},
        "sft": {"epochs": 3, "rows": 16},
        "eval": {"problems": 500, "k": 8},
    },
    # The refusal-removal demo (tasks/refusal.py, scripts/refusal_demo.py): a model that learns the tasks and the
    # facts of a topic, to be censored by a fine-tune afterwards (a model that learns the refusal in pretraining
    # instead, `data.refusal_docs`, does not hold it in one direction). 256 wide: at 128, ablating any one
    # direction, even a random one, cost arithmetic 10 points or more. Its RL stage is short: the demo is about
    # the refusal, not about RL.
    "censored": {
        "data": {"train_docs": 20_000, "topic_docs": 2000},
        "model": {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4},
        "pretrain": {"steps": 800},
        "grpo": {"steps": 10},
        "eval": {"problems": 100},
    },
}


# GRPO settings applied over the size preset by `grpo_preset=NAME` (before any explicit override).
R1_REF_RESET = 400 / 10_400  # R1-Zero reset its reference to the policy every 400 of its 10,400 steps
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    "r1": {"group_size": 16, "beta": 0.001, "temperature": 1.0},  # + the reference reset, scaled to grpo.steps
    "grpo": {"variant": "grpo"},
    "dr_grpo": {"variant": "dr_grpo"},
    # DAPO: clip-higher, token-level loss, dynamic sampling, soft overlong penalty over the last fifth, no KL
    "dapo": {"variant": "dapo", "eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "dynamic_sampling": True},
}
RECIPES = ("r1zero", "r1")
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {  # applied over the size preset, under explicit overrides
    "r1zero": {},
    "r1": {"grpo_preset": "r1", "data": {"families": ["arithmetic", "countdown", "language", "multiplication"]},
           "r1": {"reasoning_families": ["arithmetic", "countdown", "language"]},  # rl_all adds the rest
           "sft": {"lr": 5e-4}},  # our models are small and fresh: 1e-4 (for real checkpoints) barely moves them
}


def apply_grpo_preset(gc: GRPOConfig, name: str) -> None:
    """Set `gc` to the named GRPO preset's values (the reference reset and overlong window scaled to it)."""
    if name not in GRPO_PRESETS:
        raise UserError(f"unknown GRPO preset '{name}' (known: {', '.join(GRPO_PRESETS)}).")
    apply(gc, copy.deepcopy(GRPO_PRESETS[name]), prefix="grpo.")
    if name == "r1":
        gc.ref_reset_every = max(1, round(gc.steps * R1_REF_RESET))
    if name == "dapo":
        gc.overlong_cache = max(1, gc.max_new_tokens // 5)  # DAPO: 4k of a 20k budget


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
    pairs = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' should look like section.key=value.")
        pairs.append((key.strip(), value.strip()))
    # The recipe and GRPO preset go first, so that explicit overrides land on top of what they set.
    first = [(k, v) for k, v in pairs if k in ("recipe", "grpo_preset")]
    for key, value in first:
        apply(cfg, {key: value}, parse=True)
    if cfg.recipe not in RECIPES:
        raise UserError(f"unknown recipe '{cfg.recipe}' (known: {', '.join(RECIPES)}).")
    if not any(k == "grpo_preset" for k, _ in first):
        apply(cfg, RECIPE_DEFAULTS[cfg.recipe])
    for key, value in pairs:
        if (key, value) not in first:
            apply(cfg, {key: value}, parse=True)
    if cfg.grpo_preset:  # after the overrides: the scaled settings follow an overridden grpo.steps
        explicit = {k.removeprefix("grpo.") for k, _ in pairs if k.startswith("grpo.")}
        chosen = copy.deepcopy(cfg.grpo)
        apply_grpo_preset(chosen, cfg.grpo_preset)
        for f in dataclasses.fields(GRPOConfig):
            if f.name not in explicit:
                setattr(cfg.grpo, f.name, getattr(chosen, f.name))
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
