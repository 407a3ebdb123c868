"""`pocketr1 compare RUN` (and the r1 recipe's `compare` stage): short GRPO runs from one model of a run,
on the same seed and the same budget (steps × prompts × samples), each evaluated on held-out problems.

- variants: `grpo` vs `dr_grpo` vs `dapo` (config.GRPO_PRESETS: DAPO with clip-higher, token-level loss,
  dynamic sampling, the soft overlong penalty and no KL). Dynamic sampling draws extra groups to refill a
  step, so DAPO's time is reported beside its figures rather than equalised.
- language reward: the same short run on the `language` task family (prompts that tempt the model to mix
  scripts in its thinking) without and with R1's language-consistency reward, scored by held-out pass@1
  and by the share of the thinking in the target script.

The variants start from the run's cold-start model when it has one (the r1 recipe's start of reasoning RL),
else its base; the language runs always start from the base, which mixes scripts as its corpus did (a
cold start was trained on single-script traces only, so it would leave the reward nothing to do).
Results go to `compare.json` one entry at a time, so a rerun continues where it stopped.
"""

from __future__ import annotations

import time

from pocketr1.config import apply, apply_grpo_preset
from pocketr1.fsutil import read_json, write_json
from pocketr1.tasks import get_family
from pocketr1.train.common import Metrics

LANGUAGE_FAMILY = "language"


def _train_and_eval(run, key: str, start: str, cfg, families: list[str]) -> dict:
    from pocketr1.evaluate import evaluate_family
    from pocketr1.train.grpo import grpo

    where = run.folder / "compare" / key.replace(":", "_")
    where.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(where / "metrics.jsonl")
    t0, c0 = time.perf_counter(), time.process_time()
    model = grpo(cfg, where, run.tokenizer(), run.model(start), run.device, metrics)
    cost = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}
    tok, ec = run.tokenizer(), cfg.eval
    rows = []
    for name in families:
        family = get_family(name)
        rows.append(evaluate_family(model, tok, family, family.difficulty(cfg.data.difficulty.get(name)),
                                    ec.problems, ec.k, ec, greedy=False))
    steps = metrics.read("grpo")
    return {"start": start, "steps": len(steps), "samples": sum(r.get("groups_drawn", cfg.grpo.prompts_per_step)
                                                                  for r in steps) * cfg.grpo.group_size,
            "settings": {k: getattr(cfg.grpo, k) for k in ("variant", "eps_low", "eps_high", "beta",
                                                            "dynamic_sampling", "overlong_cache",
                                                            "language_weight", "group_size", "prompts_per_step")},
            "train_reward": steps[-1]["reward"] if steps else None, "rows": rows, **cost}


def run_comparisons(run) -> dict:
    """Every comparison entry not in compare.json yet; returns the whole file's content."""
    from pocketr1.recipe import stage_config

    cfg, r1 = run.cfg, run.cfg.r1
    path = run.folder / "compare.json"
    results = read_json(path) if path.exists() else {"entries": {}}
    start = "cold_start" if (run.folder / "cold_start" / "config.json").is_file() else "base"
    plans = []
    for variant in r1.compare_variants:
        c = stage_config(cfg, r1.compare_steps, eval_every=0)
        apply_grpo_preset(c.grpo, variant)
        plans.append((f"variant:{variant}", c, list(cfg.data.families), start))
    if LANGUAGE_FAMILY in cfg.data.families:
        for weight in (0.0, r1.language_weight):
            c = stage_config(cfg, r1.compare_steps, [LANGUAGE_FAMILY], eval_every=0, language_weight=weight)
            plans.append((f"language:{weight:g}", c, [LANGUAGE_FAMILY], "base"))
    else:
        results["note"] = "the run has no `language` task, so the language-reward comparison was skipped"
    for key, c, families, origin in plans:
        if key not in results["entries"]:
            results["entries"][key] = _train_and_eval(run, key, origin, c, families)
            write_json(path, results)
    write_json(path, results)
    return results


def compare_command(args) -> None:
    """`pocketr1 compare RUN`: run the comparisons into a run folder and rewrite its report."""
    from pocketr1.report import write_report
    from pocketr1.run import Run

    run = Run.open(args.path)
    for item in args.overrides:
        key, _, value = item.partition("=")
        apply(run.cfg, {key.strip(): value.strip()}, parse=True)
    results = run_comparisons(run)
    write_report(run)
    for key, entry in results["entries"].items():
        figures = ", ".join(f"{r['family']} {100 * r['pass@1']:.1f}%" for r in entry["rows"])
        print(f"{key}: held-out pass@1 {figures} ({entry['steps']} steps, {entry['cpu_s']:.0f} CPU-s)")
    print(f"Report: {run.folder / 'report.md'}")
