"""`pocketr1 eval PATH`: held-out pass@1 over k samples, cons@k and greedy accuracy, per task family.

PATH is a run folder (its RL model, else its base; tasks and difficulty default to what the run trained
on) or any model folder (every registered task at its default difficulty).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pocketr1.chat import is_run_folder, resolve_model_dir
from pocketr1.config import EvalConfig
from pocketr1.errors import UserError
from pocketr1.fsutil import read_json
from pocketr1.report import format_difficulty, percent, text_table


def _run_data(path: Path) -> dict | None:
    """The `data` section of a run folder's config, else None. Read as plain JSON, not rebuilt into a
    RunConfig: evaluating needs only the task list and difficulty, and should work on runs written by an
    older or newer version whose other settings this one may not know."""
    if not is_run_folder(path):
        return None
    data = read_json(path / "config.json").get("data")
    return data if isinstance(data, dict) else {}


def _check(args) -> None:
    if args.k < 1 or args.problems < 1 or args.max_tokens < 1:
        raise UserError("--k, --problems and --max-tokens must each be at least 1.")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be 0 or more and --top-p in (0, 1].")


def evaluate_command(args) -> None:
    from pocketr1.config import DataConfig
    from pocketr1.tasks import get_family, parse_difficulty

    _check(args)
    model_dir = resolve_model_dir(args.path)
    run_data = _run_data(args.path)
    # A bare model folder gets the default run's families: most models were never trained on the others.
    names = args.task or (run_data or {}).get("families") or DataConfig().families
    refusal_problems = _refusal_prompts(args)  # checked before the model loads too
    overrides = parse_difficulty(args.difficulty)
    trained = (run_data or {}).get("difficulty") or {}
    # Every task and knob is checked before the model loads, so a typo fails at once.
    plan = []
    for name in dict.fromkeys(names):
        family = get_family(name)
        try:
            plan.append((family, family.difficulty({**trained.get(name, {}), **overrides})))
        except UserError as e:
            # Knobs belong to one family; evaluating every task by default is the likely slip.
            hint = "" if args.task else " Choose the task(s) with --task."
            raise UserError(f"{e}{hint}") from None

    from pocketr1.evaluate import evaluate_family
    from pocketr1.model import load_model
    from pocketr1.tokenizer import ChatTokenizer
    from pocketr1.train.common import pick_device

    ec = EvalConfig(problems=args.problems, k=args.k, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_tokens)
    model = load_model(model_dir, device=pick_device(args.device), int8=getattr(args, "int8", False))
    tok = ChatTokenizer(model_dir)
    rows = []
    for family, level in plan:
        # Progress on stderr: a long evaluation should not look hung, and stdout stays parseable.
        print(f"evaluating {family.name} ({args.problems} held-out problems x {args.k} samples)...",
              file=sys.stderr, flush=True)
        row = evaluate_family(model, tok, family, level, args.problems, args.k, ec)
        rows.append(row | {"split": "held-out"})
    refusals = None
    if refusal_problems is not None:
        from pocketr1.tasks.refusal import evaluate_refusals

        label, problems = refusal_problems
        print(f"measuring refusals on {label} ({len(problems)} prompts x {args.k} samples)...", file=sys.stderr,
              flush=True)
        refusals = evaluate_refusals(model, tok, problems, args.k, ec) | {"prompts_from": label}
    if args.json:
        print(json.dumps({"model": str(model_dir), "rows": rows} | ({"refusals": refusals} if refusals else {}),
                         indent=2))
    else:
        print(f"model: {model_dir}  (T={args.temperature}, top-p {args.top_p}, "
              f"up to {args.max_tokens} tokens)")
        print(results_table(rows))
        if refusals:
            print(refusal_table([refusals]))


def _refusal_prompts(args) -> tuple[str, list] | None:
    """For --refusals: the forbidden topic's held-out questions, or the prompts of the file it names."""
    if getattr(args, "refusals", None) is None:
        return None
    from pocketr1.tasks.base import Problem
    from pocketr1.tasks.refusal import Alchemy

    if not args.refusals:
        return "the forbidden topic's held-out questions", Alchemy().all_problems(True, forbidden=True)[:args.problems]
    from pocketr1.modify.abliterate import read_prompts

    prompts = read_prompts(Path(args.refusals))
    if not prompts:
        raise UserError(f"--refusals file {args.refusals} holds no prompts.")
    return str(args.refusals), [Problem("prompts", p, "") for p in prompts[:args.problems]]


def refusal_table(rows: list[dict]) -> str:
    """The --refusals figures as a table, one row per measurement."""
    header = ["refusals on", "prompts", "refusal rate", "greedy", "topic pass@1"]
    return text_table(header, [[r["prompts_from"], str(r["prompts"]), f"{percent(r['refusal_rate'])} (k={r['k']})",
                                percent(r["greedy_refusal_rate"]), percent(r["topic_pass@1"])] for r in rows])


def results_table(rows: list[dict]) -> str:
    """The eval rows as an aligned text table, rates in percent."""
    header = ["task", "difficulty", "problems", "pass@1", "cons@k", "greedy", "mean length", "thinking"]
    body = []
    for r in rows:
        k = r["k"]
        body.append([r["family"], format_difficulty(r["difficulty"]), str(r["problems"]),
                     percent(r["pass@1"]), f"{percent(r[f'cons@{k}'])} (k={k})", percent(r.get("greedy")),
                     f"{r['mean_length']:.1f}", percent(r["thinking_rate"])])
    return text_table(header, body)
