"""Distillation (`pocketr1 distill --teacher T --student-preset tiny`) and R1's headline comparison at our
scale: a smaller student trained only by SFT on the teacher's verified traces, against the same student
trained by GRPO alone for the same compute.

Both students start from one student base: the student preset's model size, pretrained on the teacher's
task corpus with the teacher's tokenizer (R1 distilled into pretrained Qwen/Llama bases, and compared with
RL on the same base). "The same compute" is measured, not assumed: the RL-only student gets as many
CPU-seconds (wall seconds on a GPU) of GRPO as the distilled student cost after the shared base, which
is sampling the teacher's traces plus the SFT. Counting the teacher's sampling on the distillation side
favours RL; the teacher's own training is not counted (in R1 it is paid once for every student).

Every step is kept in the output folder and skipped when it is already there, so a rerun resumes:

    student_base/  traces.jsonl  student_sft/  student_rl/  eval/*.json  distill.json (costs, table)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from pocketr1 import config as config_mod
from pocketr1.config import RunConfig
from pocketr1.evaluate import evaluate_family
from pocketr1.fsutil import read_json, write_json
from pocketr1.model import Transformer, load_model, save_model
from pocketr1.tasks import get_family
from pocketr1.tasks.corpus import build_corpus
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train.common import Metrics

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STUDENTS = ("student_base", "student_sft", "student_rl")
RL_STEP_CAP = 10  # the RL student may run up to this many times grpo.steps before its budget ends it


def student_config(cfg: RunConfig, preset: str, tok: ChatTokenizer) -> RunConfig:
    """`cfg` with the model section of `preset`, sized to the teacher's tokenizer."""
    out = copy.deepcopy(cfg)
    out.model = config_mod.build(preset).model
    out.model.vocab_size = tok.vocab_size
    out.model.bos_token_id, out.model.eos_token_id = tok.token_id(tok.bos_token), tok.eos_id
    out.model.max_position_embeddings = cfg.model.max_position_embeddings
    out.model.__post_init__()
    out.pretrain.steps = cfg.r1.student_pretrain_steps or cfg.pretrain.steps
    return out


class _Clock:
    """CPU-seconds of this process on a CPU device (steady under other load), wall seconds on a GPU."""

    def __init__(self, device: torch.device):
        self.read = time.process_time if device.type == "cpu" else time.perf_counter
        self.unit = "cpu_s" if device.type == "cpu" else "wall_s"


def _eval_rows(model: Transformer, tok: ChatTokenizer, cfg: RunConfig) -> list[dict]:
    ec, rows = cfg.eval, []
    for name in cfg.data.families:
        family = get_family(name)
        level = family.difficulty(cfg.data.difficulty.get(name))
        rows.append(evaluate_family(model, tok, family, level, ec.problems, ec.k, ec) | {"split": "held-out"})
    return rows


def train_students(folder: Path, cfg: RunConfig, teacher_dir: Path, preset: str, device: torch.device) -> dict:
    """Student base, teacher traces, SFT student, budget-matched RL student and their held-out evals in
    `folder`; returns (and writes to distill.json) the costs, step counts and eval rows."""
    from pocketr1.recipe import stage_config
    from pocketr1.train.grpo import grpo
    from pocketr1.train.pretrain import pretrain
    from pocketr1.train.sample import sample_traces, spec_for_run, write_jsonl
    from pocketr1.train.sft import sft

    folder.mkdir(parents=True, exist_ok=True)
    tok = ChatTokenizer(teacher_dir)
    scfg = student_config(cfg, preset, tok)
    metrics, clock = Metrics(folder / "metrics.jsonl"), _Clock(device)
    state_path = folder / "distill.json"
    state = read_json(state_path) if state_path.exists() else {"cost": {}}
    files = {f: teacher_dir / f for f in TOKENIZER_FILES}

    def timed(step: str, work):
        if step in state["cost"]:
            return None
        t0 = clock.read()
        result = work()
        state["cost"][step] = round(clock.read() - t0, 2)
        write_json(state_path, state)
        return result

    def make_base() -> None:
        d = scfg.data
        docs = build_corpus(d.families, d.train_docs, d.worked_fraction, d.difficulty, d.seed,
                            refusal_docs=d.refusal_docs, topic_docs=d.topic_docs)
        save_model(pretrain(scfg, folder, tok, docs, device, metrics), folder / "student_base", files)

    def make_traces() -> None:
        r1 = cfg.r1
        spec = spec_for_run(cfg, prompts=r1.rejection_prompts, per_prompt=r1.rejection_k,
                            keep_per_prompt=r1.keep_per_prompt, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                            max_new_tokens=cfg.grpo.max_new_tokens, min_language=r1.min_language, seed=cfg.seed + 7)
        teacher = load_model(teacher_dir, device=device)
        rows, stats = sample_traces(teacher, tok, spec, teacher_dir)
        write_jsonl(folder / "traces.jsonl", rows)
        state["traces"] = {"rows": len(rows), "stats": stats}

    def make_sft() -> None:
        rows = [r["messages"] for r in _read_rows(folder / "traces.jsonl")]
        model = load_model(folder / "student_base", device=device)
        if rows:
            model = sft(model, tok, rows, scfg.sft, folder / "student_sft" / "checkpoint", metrics, device,
                        cfg.seed, cfg.dtype, stage="student_sft")
        save_model(model, folder / "student_sft", files)

    timed("student_base", make_base)
    timed("traces", make_traces)
    timed("student_sft", make_sft)
    budget = state["cost"]["traces"] + state["cost"]["student_sft"]
    state["rl_budget"] = {clock.unit: budget, "means": "teacher sampling + student SFT"}

    def make_rl() -> None:
        rl_cfg = stage_config(scfg, RL_STEP_CAP * max(1, cfg.grpo.steps), budget_s=max(budget, 1e-3),
                              eval_every=0)
        where = folder / "student_rl_run"
        model = grpo(rl_cfg, where, tok, load_model(folder / "student_base", device=device), device,
                     Metrics(where / "metrics.jsonl"))
        state["rl_steps"] = len(Metrics(where / "metrics.jsonl").read("grpo"))
        save_model(model, folder / "student_rl", files)

    where = folder / "student_rl_run"
    where.mkdir(exist_ok=True)
    timed("student_rl", make_rl)
    for name in STUDENTS:
        path = folder / "eval" / f"{name}.json"
        if not path.exists():
            rows = _eval_rows(load_model(folder / name, device=device), tok, scfg)
            write_json(path, {"model": name, "rows": rows})
    state["eval"] = {name: read_json(folder / "eval" / f"{name}.json")["rows"] for name in STUDENTS}
    state["student"] = {"preset": preset, "parameters": sum(
        p.numel() for p in load_model(folder / "student_base", device=device).parameters()),
        "teacher": str(teacher_dir.resolve()), "clock": clock.unit}
    write_json(state_path, state)
    return {k: v for k, v in state.items() if k != "eval"}


def _read_rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def distill_command(args) -> None:
    """`pocketr1 distill`: the students in --out, then the comparison table."""
    from pocketr1.chat import is_run_folder, resolve_model_dir
    from pocketr1.fsutil import check_writable
    from pocketr1.report import percent, text_table
    from pocketr1.train.common import pick_device, set_threads

    teacher_dir = resolve_model_dir(args.teacher)
    cfg = config_mod.build(args.student_preset, args.overrides)
    if is_run_folder(args.teacher):  # the teacher's tasks, eval and sampling length: the student is held to them
        teacher_cfg = read_json(args.teacher / "config.json")
        config_mod.apply(cfg, {"data": teacher_cfg["data"], "eval": teacher_cfg["eval"],
                               "grpo.max_new_tokens": teacher_cfg["grpo"]["max_new_tokens"]})
        for item in args.overrides:  # explicit overrides still win
            key, _, value = item.partition("=")
            config_mod.apply(cfg, {key.strip(): value.strip()}, parse=True)
    out = args.out or Path("runs") / f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
    check_writable(out)
    if not (out / "config.json").exists():
        write_json(out / "config.json", config_mod.to_dict(cfg) | {"teacher": str(teacher_dir.resolve())})
    set_threads(cfg.threads)
    info = train_students(out, cfg, teacher_dir, args.student_preset, pick_device(args.device or cfg.device))
    evals = read_json(out / "distill.json")["eval"]
    body = [[name, r["family"], percent(r["pass@1"]), percent(r[f"cons@{r['k']}"])]
            for name in STUDENTS for r in evals[name]]
    print(text_table(["student", "task", "pass@1", "cons@k"], body))
    unit = info["rl_budget"]
    print(f"RL-only student: {info.get('rl_steps')} GRPO steps in the distilled student's budget of "
          f"{next(iter(unit.values())):.1f} {next(iter(unit))} ({unit['means']}). Folder: {out}")
