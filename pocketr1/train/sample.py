"""Rejection sampling (`pocketr1 sample`): many completions per training prompt from a model, keeping only
the ones a rule verifier accepts and a reader could follow, as chat JSONL for SFT with their provenance.

R1 builds its cold-start and stage-3 SFT data this way. A completion is kept when it stopped on its own,
has the `thinking</think><answer>…</answer>` shape, its answer passes the task's verifier, its thinking is
not empty, not stuck repeating a line, and written in the prompt's script (R1 drops mixed-language chains
of thought), and every worked line `a op b = c` in it true (a right answer reached through false steps
teaches wrong reasoning). At most `keep_per_prompt` distinct traces per prompt are kept, so easy prompts do not crowd
out the rest.

R1's readable format is "reasoning, then a summary". Here the reasoning is the model's own lines (trimmed,
blank lines and immediate repeats dropped) and the summary one closing line, `So the answer is X.`, at the
end of the thinking: after `</think>` there is only `<answer>X</answer>`, which the format reward and the
verifier read, so the summary cannot go there without costing the reward it is trained for.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from pocketr1.engine import SamplingParams, generate
from pocketr1.errors import UserError
from pocketr1.fsutil import read_json, write_text
from pocketr1.model import Transformer
from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem
from pocketr1.tasks.rewards import parse_completion
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train.reward_shaping import language_score

MAX_LINE_REPEATS = 3  # a thinking that writes one line more often than this is looping, not reasoning
_STEP = re.compile(r"^(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)$")  # a worked line such as `12+7=19`


@dataclass(slots=True)
class SampleSpec:
    families: list[str]
    difficulty: dict[str, dict[str, int]] = field(default_factory=dict)
    prompts: int = 64  # training-split problems per family
    per_prompt: int = 8  # completions sampled per problem
    keep_per_prompt: int = 2  # distinct verified traces kept per problem
    temperature: float = 0.6  # R1's advice for sampling its models: T 0.6, top-p 0.95
    top_p: float = 0.95
    max_new_tokens: int = 128
    min_language: float = 0.9  # share of the thinking in the target script
    seed: int = 0
    batch_size: int = 256  # rows generated together


@dataclass(frozen=True, slots=True)
class Verdict:
    keep: bool
    reason: str  # "kept", or why not: unfinished, malformed, wrong, no_thinking, repetitive, false_step,
    # mixed_script
    language: float | None = None


def judge(problem: Problem, text: str, finished: bool, min_language: float) -> Verdict:
    """Whether one completion is a verified, well-formed, readable trace."""
    if not finished:
        return Verdict(False, "unfinished")
    parsed = parse_completion(text)
    if not parsed.well_formed or parsed.answer is None:
        return Verdict(False, "malformed")
    if not get_family(problem.family).check(problem, parsed.answer):
        return Verdict(False, "wrong")
    lines = [line.strip() for line in parsed.thinking.splitlines() if line.strip()]
    if not lines:
        return Verdict(False, "no_thinking")
    if max(Counter(lines).values()) > MAX_LINE_REPEATS:
        return Verdict(False, "repetitive")
    if any(not _step_holds(line) for line in lines):
        return Verdict(False, "false_step")
    language = language_score(problem, text)
    if language < min_language:
        return Verdict(False, "mixed_script", language)
    return Verdict(True, "kept", language)


def _step_holds(line: str) -> bool:
    """False for a worked line `a op b = c` whose arithmetic is wrong: a right answer reached through false
    steps teaches the wrong reasoning. Other lines (words, a countdown try that missed) pass."""
    m = _STEP.match(line)
    if not m:
        return True
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return value == c


def readable_trace(thinking: str, answer: str) -> str:
    """R1's readable format at our scale: the reasoning lines, then a one-line summary with the answer."""
    lines: list[str] = []
    for line in (x.strip() for x in thinking.splitlines()):
        if line and (not lines or line != lines[-1]):
            lines.append(line)
    return "\n".join([*lines, f"So the answer is {answer}."])


def trace_messages(question: str, reasoning: str, answer: str) -> list[dict]:
    """One SFT example: the user's question; the assistant's reasoning (DeepSeek's `reasoning_content`)
    and its answer in the tags the verifier reads."""
    return [{"role": "user", "content": question},
            {"role": "assistant", "reasoning_content": reasoning, "content": f"<answer>{answer}</answer>"}]


def prompt_id(problem: Problem) -> str:
    return hashlib.sha1(f"{problem.family}\n{problem.question}".encode()).hexdigest()[:16]


def model_sha256(folder: Path) -> str:
    """SHA-256 of the model's weights file: which exact model wrote a trace."""
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sample_traces(model: Transformer, tok: ChatTokenizer, spec: SampleSpec, model_dir: Path | None = None,
                  progress: bool = True) -> tuple[list[dict], dict]:
    """Verified traces as chat rows (`messages` + `provenance`), and per-family counts of what was kept
    and why the rest was dropped. `model_dir` (the folder `model` was loaded from) goes into provenance."""
    model.eval()
    source = {"model": str(model_dir.resolve()) if model_dir else None,
              "model_sha256": model_sha256(model_dir) if model_dir else None}
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_new_tokens": spec.max_new_tokens,
                "per_prompt": spec.per_prompt}
    params = SamplingParams(spec.temperature, spec.top_p, 0, spec.max_new_tokens)
    rows, stats = [], {}
    per_chunk = max(1, spec.batch_size // spec.per_prompt)
    for f_index, name in enumerate(spec.families):
        family = get_family(name)
        level = family.difficulty(spec.difficulty.get(name))
        problems = family.problems(spec.prompts, spec.seed, level, heldout=False)
        counts: Counter = Counter()
        with_trace = 0
        verifier = f"{type(family).__module__}.{type(family).__name__}.check"
        for start in tqdm(range(0, len(problems), per_chunk), desc=f"sample {name}", unit="batch",
                          dynamic_ncols=True, disable=not progress):
            chunk = problems[start:start + per_chunk]
            # One random stream per problem: a problem's samples do not depend on what shares its batch.
            seeds = [spec.seed * 1_000_003 + f_index * 100_003 + start + i for i in range(len(chunk))]
            outs = generate(model, [tok.prompt_ids(p.question) for p in chunk], params, tok.stop_ids,
                            n=spec.per_prompt, pad_id=tok.pad_id, prompt_seeds=seeds)
            for i, problem in enumerate(chunk):
                kept: list[str] = []
                for j, c in enumerate(outs[i * spec.per_prompt:(i + 1) * spec.per_prompt]):
                    text = tok.decode(c.ids)
                    verdict = judge(problem, text, c.finished, spec.min_language)
                    parsed = parse_completion(text)
                    reasoning = readable_trace(parsed.thinking, parsed.answer) if verdict.keep else ""
                    if verdict.keep and (reasoning in kept or len(kept) >= spec.keep_per_prompt):
                        verdict = Verdict(False, "duplicate" if reasoning in kept else "enough")
                    counts[verdict.reason] += 1
                    if not verdict.keep:
                        continue
                    kept.append(reasoning)
                    rows.append({"messages": trace_messages(problem.question, reasoning, parsed.answer),
                                 "provenance": {**source, "prompt_id": prompt_id(problem), "family": name,
                                                "difficulty": level, "split": "train", "verifier": verifier,
                                                "gold": problem.answer, "sampling": sampling,
                                                "seed": seeds[i], "sample_index": j,
                                                "language_consistency": round(verdict.language, 4)}})
                with_trace += bool(kept)
        stats[name] = {"prompts": len(problems), "samples": sum(counts.values()), "kept": counts["kept"],
                       "prompts_with_trace": with_trace, "dropped": {k: v for k, v in counts.items() if k != "kept"}}
    return rows, stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def spec_for_run(run_cfg, **overrides) -> SampleSpec:
    """A SampleSpec over a run's task families and difficulty."""
    return SampleSpec(families=list(run_cfg.data.families), difficulty=run_cfg.data.difficulty, **overrides)


def sample_command(args) -> None:
    """`pocketr1 sample MODEL --out data.jsonl`: write the verified traces and say what was kept."""
    from pocketr1.chat import is_run_folder, resolve_model_dir
    from pocketr1.model import load_model
    from pocketr1.tasks import parse_difficulty
    from pocketr1.train.common import pick_device

    model_dir = resolve_model_dir(args.path)
    run_cfg = read_json(args.path / "config.json") if is_run_folder(args.path) else {}
    families = args.families or run_cfg.get("data", {}).get("families") or ["arithmetic", "countdown"]
    difficulty = dict(run_cfg.get("data", {}).get("difficulty", {}))
    for item in args.difficulty or []:
        name, sep, knobs = item.partition(":")
        if not sep:
            raise UserError(f"--difficulty '{item}' should look like FAMILY:key=value,...")
        difficulty[name] = parse_difficulty(knobs)
    spec = SampleSpec(families=families, difficulty=difficulty, prompts=args.prompts, per_prompt=args.per_prompt,
                      keep_per_prompt=args.keep, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_tokens, min_language=args.min_language, seed=args.seed)
    for name in spec.families:
        get_family(name).difficulty(spec.difficulty.get(name))  # unknown tasks and knobs: one-line errors
    model = load_model(model_dir, device=pick_device(args.device))
    rows, stats = sample_traces(model, ChatTokenizer(model_dir), spec, model_dir)
    write_jsonl(args.out, rows)
    for name, s in stats.items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "none"
        print(f"{name}: kept {s['kept']} of {s['samples']} samples ({s['prompts_with_trace']} of {s['prompts']} "
              f"prompts have a trace); dropped: {dropped}")
    print(f"Wrote {len(rows)} traces to {args.out} (spec: {json.dumps(asdict(spec))})")
