"""The multi-stage R1 recipe (`pocketr1 run --recipe r1`), as DeepSeek-R1 describes it, at laptop scale:

    corpus → tokenizer → pretrain (base) → eval
    → cold_start     verified, readable traces sampled from the base at high k (or a supplied JSONL), SFT the base
    → rl_reasoning   GRPO from the cold-start model, R1's language-consistency reward summed with accuracy
    → rejection_sft  sample the reasoning-RL model, keep verified readable traces, SFT the *base* on them
    → rl_all         a final GRPO pass over every task family: the run's `rl` model
    → distill        a smaller student SFT'd on the final model's traces vs the same student by RL alone
    → compare        short GRPO runs: grpo vs dr_grpo vs dapo, and with vs without the language reward
    → report

with an eval after every stage that makes a model. Each stage is one entry in `state.json`; a stage that
trains keeps its own checkpoint (SFT stages under `<stage>/checkpoint`, GRPO stages under
`stages/<stage>/grpo/checkpoint` with their own metrics file), so a resume redoes at most the steps since.
The traces each SFT stage trained on are kept in `data/<stage>.jsonl` with their provenance.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pocketr1.config import RunConfig
from pocketr1.errors import UserError
from pocketr1.train.common import Metrics

R1_STAGES = ("corpus", "tokenizer", "pretrain", "eval_base",
             "cold_start", "eval_cold_start",
             "rl_reasoning", "eval_rl_reasoning",
             "rejection_sft", "eval_rejection_sft",
             "rl_all", "eval_rl",
             "distill", "compare", "report")
# The models a recipe run makes, in order, with the stage that made each (for the report's table).
R1_MODELS = (("base", "pretrain"), ("cold_start", "cold start SFT"), ("rl_reasoning", "reasoning RL"),
             ("rejection_sft", "rejection-sampling SFT"), ("rl", "RL, all tasks"))


def stage_config(cfg: RunConfig, steps: int, families: list[str] | None = None, **grpo) -> RunConfig:
    """A copy of `cfg` for one GRPO stage of `steps` steps: a reference reset keeps its share of the run."""
    out = copy.deepcopy(cfg)
    if families:
        out.data.families = list(families)
    if cfg.grpo.ref_reset_every and cfg.grpo.steps:
        out.grpo.ref_reset_every = max(1, round(cfg.grpo.ref_reset_every * steps / cfg.grpo.steps))
    out.grpo.steps = steps
    out.grpo.checkpoint_every = max(1, min(cfg.grpo.checkpoint_every, steps))
    for key, value in grpo.items():
        setattr(out.grpo, key, value)
    return out


def run_grpo(run, name: str, start_model: str, cfg: RunConfig, into_run_folder: bool = False):
    """GRPO from the run's `start_model`, checkpointed and logged in `stages/<name>/` (or, for the final RL
    stage, where the r1zero recipe keeps its own, so the report's curves show it)."""
    from pocketr1.train.grpo import grpo

    where = run.folder if into_run_folder else run.folder / "stages" / name
    metrics = run.metrics if into_run_folder else Metrics(where / "metrics.jsonl")
    where.mkdir(parents=True, exist_ok=True)
    return grpo(cfg, where, run.tokenizer(), run.model(start_model), run.device, metrics)


SAMPLE_SEEDS = {"cold_start": 1, "rejection_sft": 2}  # each sampling stage draws its own problems and samples


def sample_stage(run, name: str, model: str, prompts: int, per_prompt: int) -> tuple[list[dict], dict]:
    """Verified traces of the run's `model` over the run's tasks, written to data/<name>.jsonl."""
    from pocketr1.train.sample import sample_traces, spec_for_run, write_jsonl

    cfg = run.cfg
    spec = spec_for_run(cfg, prompts=prompts, per_prompt=per_prompt, keep_per_prompt=cfg.r1.keep_per_prompt,
                        temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=cfg.grpo.max_new_tokens,
                        min_language=cfg.r1.min_language, seed=cfg.seed * 1000 + SAMPLE_SEEDS[name])
    rows, stats = sample_traces(run.model(model), run.tokenizer(), spec, run.folder / model)
    write_jsonl(run.folder / "data" / f"{name}.jsonl", rows)
    return rows, stats


def sft_stage(run, name: str, start_model: str, examples: list[list[dict]]) -> dict:
    """SFT `start_model` on `examples` and save it as `name`. With no examples (a base that never got an
    answer right) the model is saved unchanged, and the report says so."""
    from pocketr1.train.sft import sft

    model = run.model(start_model)
    if examples:
        cfg = run.cfg
        model = sft(model, run.tokenizer(), examples, cfg.sft, run.folder / name / "checkpoint", run.metrics,
                    run.device, cfg.seed, cfg.dtype, stage=name)
    run.save(model, name)
    return {"examples": len(examples), "trained": bool(examples)}


# --- the stages ---------------------------------------------------------------------------------------------

def stage_cold_start(run) -> dict:
    r1 = run.cfg.r1
    if r1.cold_start_jsonl:
        from pocketr1.train.sft import load_chat_jsonl

        examples, stats = load_chat_jsonl(r1.cold_start_jsonl), {"supplied": r1.cold_start_jsonl}
    else:
        rows, stats = sample_stage(run, "cold_start", "base", r1.cold_start_prompts, r1.cold_start_k)
        examples = [r["messages"] for r in rows]
    return {"cold_start": {"traces": stats, **sft_stage(run, "cold_start", "base", examples)}}


def stage_rl_reasoning(run) -> dict:
    cfg, r1 = run.cfg, run.cfg.r1
    families = [f for f in r1.reasoning_families if f in cfg.data.families] or cfg.data.families
    stage = stage_config(cfg, r1.rl_reasoning_steps, families, language_weight=r1.language_weight)
    run.save(run_grpo(run, "rl_reasoning", "cold_start", stage), "rl_reasoning")
    return {}


def stage_rejection_sft(run) -> dict:
    r1 = run.cfg.r1
    rows, stats = sample_stage(run, "rejection_sft", "rl_reasoning", r1.rejection_prompts, r1.rejection_k)
    # R1 fine-tunes the base (not the RL model) on the rejection-sampled data.
    return {"rejection_sft": {"traces": stats, **sft_stage(run, "rejection_sft", "base",
                                                            [r["messages"] for r in rows])}}


def stage_rl_all(run) -> dict:
    cfg, r1 = run.cfg, run.cfg.r1
    stage = stage_config(cfg, r1.rl_all_steps, language_weight=r1.language_weight)
    run.save(run_grpo(run, "rl_all", "rejection_sft", stage, into_run_folder=True), "rl")
    return {}


def stage_distill(run) -> dict:
    from pocketr1.train.distill import train_students

    info = train_students(run.folder / "distill", run.cfg, run.folder / "rl", run.cfg.r1.student_preset,
                          run.device)
    return {"distill": info}


def stage_compare(run) -> dict:
    from pocketr1.train.compare import run_comparisons

    run_comparisons(run)
    return {}


def _evaluator(name: str):
    return lambda run: run.evaluate(name)


STAGE_FUNCTIONS = {
    "cold_start": stage_cold_start, "eval_cold_start": _evaluator("cold_start"),
    "rl_reasoning": stage_rl_reasoning, "eval_rl_reasoning": _evaluator("rl_reasoning"),
    "rejection_sft": stage_rejection_sft, "eval_rejection_sft": _evaluator("rejection_sft"),
    "rl_all": stage_rl_all, "distill": stage_distill, "compare": stage_compare,
}
RECIPE_STAGES = {"r1": R1_STAGES}


def stages_of(recipe: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return RECIPE_STAGES.get(recipe, default)


def check_recipe(run) -> None:
    """Refuse what the r1 recipe does not support, before any work."""
    from pocketr1.train import distributed

    if run.cfg.recipe == "r1" and distributed.world() > 1:
        raise UserError("the r1 recipe runs in one process; start it without torchrun.")


def model_folders(folder: Path) -> list[tuple[str, str]]:
    """(model name, what made it) for the recipe models this run folder holds, in recipe order."""
    return [(name, label) for name, label in R1_MODELS if (folder / name / "config.json").is_file()]
