"""The r1 recipe's part of `report.md` and `summary.json`: held-out pass@1 and cons@k per task family after
every stage, the distilled student against the RL-only student, the GRPO variants, and the language reward
with and without. Each section reads what its stage wrote and is left out when that is missing.
"""

from __future__ import annotations

from pathlib import Path

from pocketr1.fsutil import read_json
from pocketr1.recipe import model_folders

STUDENT_LABELS = {"student_base": "student base (pretrained only)", "student_sft": "distilled (SFT on teacher traces)",
                  "student_rl": "RL only (GRPO, same compute)"}


def _rows(path: Path) -> dict[str, dict]:
    """Held-out rows of one eval file by family (the beyond-range rows belong to the main table)."""
    if not path.is_file():
        return {}
    return {r["family"]: r for r in read_json(path)["rows"] if "beyond" not in r.get("split", "held-out")}


def _cell(row: dict | None) -> str:
    if not row:
        return "-"
    cons = row["cons@{}".format(row["k"])]
    return f"{100 * row['pass@1']:.1f}% / {100 * cons:.1f}%"


def _table(header: list[str], body: list[list[str]]) -> str:
    from pocketr1.report import markdown_table

    return markdown_table(header, body)


def _stages_section(run) -> list[str]:
    evals = {name: _rows(run.folder / "eval" / f"{name}.json") for name, _ in model_folders(run.folder)}
    families = list(run.cfg.data.families)
    body = [[f"`{name}`", label, *(_cell(evals[name].get(f)) for f in families)]
            for name, label in model_folders(run.folder) if evals[name]]
    info = run.state.get("info", {})
    notes = []
    for stage in ("cold_start", "rejection_sft"):
        if stage in info:
            s = info[stage]
            traces = s.get("traces", {})
            kept = {f: t["kept"] for f, t in traces.items() if isinstance(t, dict)}
            how = (f"{s['examples']} verified traces ({', '.join(f'{f} {n}' for f, n in kept.items())})"
                   if kept else f"{s['examples']} supplied examples")
            notes.append(f"- `{stage}`: SFT on {how}" + ("" if s["trained"] else
                         " — none passed the verifier, so this model is its start model unchanged") + ".")
    r1 = run.cfg.r1
    reasoning = [f for f in r1.reasoning_families if f in families] or families
    notes += [f"- `rl_reasoning`: {r1.rl_reasoning_steps} GRPO steps on {', '.join(reasoning)}; `rl_all`: "
              f"{r1.rl_all_steps} on {', '.join(families)}; both with language weight {r1.language_weight:g} and the "
              "GRPO settings below (their step counts replaced, the reference reset scaled to them)."]
    k = run.cfg.eval.k
    return ["## The R1 recipe, stage by stage", "",
            f"Held-out pass@1 / cons@{k} per task family after each stage ({run.cfg.eval.problems} problems, k={k}).",
            "", _table(["model", "made by", *families], body), "", *notes, ""]


def _distill_section(run) -> list[str]:
    path = run.folder / "distill" / "distill.json"
    if not path.is_file() or "eval" not in read_json(path):
        return []
    d = read_json(path)
    families = [r["family"] for r in d["eval"]["student_base"]]
    unit = d["student"]["clock"]
    cost = {"student_base": d["cost"].get("student_base"),
            "student_sft": d["cost"].get("traces", 0) + d["cost"].get("student_sft", 0),
            "student_rl": d["cost"].get("student_rl")}
    body = [[STUDENT_LABELS[name], *(_cell(r) for r in rows), f"{cost[name]:.1f}" if cost[name] else "-"]
            for name, rows in d["eval"].items()]
    teacher = _rows(run.folder / "eval" / "rl.json")
    body.append(["teacher (the run's `rl` model)", *(_cell(teacher.get(f)) for f in families), "-"])
    traces = d.get("traces", {})
    return ["## Distilled student vs RL-only student", "",
            f"The student is the `{d['student']['preset']}` preset's model size "
            f"({d['student']['parameters']:,} parameters), pretrained on the same corpus with the teacher's "
            f"tokenizer. The distilled student is SFT'd on {traces.get('rows', 0)} verified traces of the teacher; "
            f"the RL-only student runs GRPO from the same base until it has spent the same {unit} as the "
            f"distilled one after the base (teacher sampling + SFT): {d['rl_steps']} GRPO steps.", "",
            _table(["student", *(f"{f} pass@1 / cons@k" for f in families), f"training {unit}"], body), ""]


def _compare_section(run) -> list[str]:
    path = run.folder / "compare.json"
    if not path.is_file():
        return []
    entries = read_json(path)["entries"]
    lines = []
    variants = {k.split(":", 1)[1]: e for k, e in entries.items() if k.startswith("variant:")}
    if variants:
        first = next(iter(variants.values()))
        families = [r["family"] for r in first["rows"]]
        body = [[f"`{name}`", *(_cell(r) for r in e["rows"]), str(e["steps"]), str(e["samples"]),
                 f"{e['cpu_s']:.1f}"] for name, e in variants.items()]
        lines += ["## GRPO variants: grpo vs dr_grpo vs dapo", "",
                  f"Each a short GRPO run from `{first['start']}` with the same seed, steps, prompts per step and "
                  "group size; dapo = clip-higher (ε 0.2/0.28), token-level loss, dynamic sampling, soft overlong "
                  "penalty, no KL. Held-out pass@1 / cons@k:", "",
                  _table(["variant", *families, "steps", "samples drawn", "CPU-s"], body), ""]
    language = {k.split(":", 1)[1]: e for k, e in entries.items() if k.startswith("language:")}
    if language:
        body = []
        for weight, e in language.items():
            r = e["rows"][0]
            share = r.get("language_consistency")
            body.append([weight, _cell(r), "-" if share is None else f"{100 * share:.1f}%",
                         f"{r['mean_length']:.1f}"])
        lines += ["## Language-consistency reward, without and with", "",
                  f"The same short GRPO run from `{next(iter(language.values()))['start']}` on the `language` task "
                  "family (its corpus reasons in mixed scripts, so the base mixes them too), without and with R1's "
                  "reward for the share of the thinking in the target script.",
                  "", _table(["language weight", "pass@1 / cons@k", "thinking in target script", "mean length"],
                             body), ""]
    note = read_json(path).get("note")
    return lines + ([f"_{note}._", ""] if note else [])


def r1_sections(run) -> list[str]:
    """The recipe's sections; the comparisons (`pocketr1 compare`) for a run of either recipe."""
    if run.cfg.recipe != "r1":
        return _compare_section(run)
    return [*_stages_section(run), *_distill_section(run), *_compare_section(run)]


def r1_summary(run) -> dict:
    """The same figures for scripts: per model per family, the students, the comparisons."""
    if run.cfg.recipe != "r1":
        return {}
    stages = {name: {f: {"pass@1": r["pass@1"], "cons@k": r["cons@{}".format(r["k"])]} for f, r in
                     _rows(run.folder / "eval" / f"{name}.json").items()} for name, _ in model_folders(run.folder)}
    out: dict = {"recipe": "r1", "stages": stages}
    distill = run.folder / "distill" / "distill.json"
    if distill.is_file():
        d = read_json(distill)
        out["distill"] = {k: d.get(k) for k in ("cost", "rl_budget", "rl_steps", "student")}
        out["distill"]["eval"] = {name: {r["family"]: r["pass@1"] for r in rows}
                                  for name, rows in d.get("eval", {}).items()}
    if (run.folder / "compare.json").is_file():
        out["compare"] = {k: {r["family"]: r["pass@1"] for r in e["rows"]}
                          for k, e in read_json(run.folder / "compare.json")["entries"].items()}
    return out
