"""A finished run's report: `report.md` (corpus, model, base-vs-RL table, GRPO settings, cost, plots), PNG
plots in `plots/`, and `summary.json` with the headline figures for scripts; plus the short summary that
`pocketr1 run` prints at the end. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from pocketr1.fsutil import atomic_path, read_json, write_json, write_text
from pocketr1.report_r1 import r1_sections, r1_summary

# The energy figure is an estimate from CPU time alone: a fully busy laptop core, with its share of the
# memory and uncore, draws roughly this much. Idle draw and any GPU are not counted.
WATTS_PER_BUSY_CORE = 15.0
JOULES_PER_KWH = 3.6e6
STRETCH = "beyond"  # eval rows whose split mentions this are out of the training range
METRICS = ("pass@1", "cons@k", "greedy", "mean_length", "thinking_rate", "reflection_rate")


# --- formatting shared with `pocketr1 eval` ---------------------------------------------------------------
def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_difficulty(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in d.items())


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes} min {s} s"


def _kwh(cpu_s: float) -> float:
    return cpu_s * WATTS_PER_BUSY_CORE / JOULES_PER_KWH


# --- reading a run ------------------------------------------------------------------------------------------
def _metrics(row: dict) -> dict:
    """One eval row with cons@<k> under a stable key, so scripts need not know k."""
    return {"difficulty": row["difficulty"], "problems": row["problems"], "k": row["k"],
            **{m: row.get(f"cons@{row['k']}" if m == "cons@k" else m) for m in METRICS}}


def load_evals(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for name in ("base", "rl"):
        path = folder / "eval" / f"{name}.json"
        if path.is_file():
            out[name] = read_json(path)["rows"]
    return out


def paired_rows(evals: dict[str, list[dict]]) -> list[tuple[dict | None, dict | None]]:
    """Base and RL rows of the same task, split and difficulty side by side, in evaluation order."""
    def key(r: dict) -> str:
        return json.dumps([r["family"], r["split"], r["difficulty"]], sort_keys=True)

    pairs: dict[str, list] = {}
    for slot, name in enumerate(("base", "rl")):
        for row in evals.get(name, []):
            pairs.setdefault(key(row), [None, None])[slot] = row
    return [(b, r) for b, r in pairs.values()]


def _split_label(row: dict, evals: dict[str, list[dict]]) -> str:
    """'held-out', or for a stretch row the knobs it raises past the family's training range."""
    if STRETCH not in row["split"]:
        return row["split"]
    usual = next((r["difficulty"] for rows in evals.values() for r in rows
                  if r["family"] == row["family"] and STRETCH not in r["split"]), {})
    changed = {k: v for k, v in row["difficulty"].items() if usual.get(k) != v}
    return f"beyond range ({format_difficulty(changed)})"


def _pair(b: dict | None, r: dict | None, key: str, fmt=percent) -> str:
    """'base → RL' for one metric; '-' for a side not evaluated."""
    side = lambda row: fmt(_metrics(row)[key]) if row else "-"  # noqa: E731
    return f"{side(b)} → {side(r)}"


def _delta(b: dict | None, r: dict | None) -> str:
    """RL minus base pass@1, in percentage points."""
    return f"{100 * (r['pass@1'] - b['pass@1']):+.1f}" if b and r else "-"


def summary(run) -> dict:
    """The headline figures, machine-readable."""
    evals = load_evals(run.folder)
    cost = run.state.get("cost", {})
    cpu_s = sum(c["cpu_s"] for c in cost.values())
    results: dict[str, dict] = {"held_out": {}, "beyond_training_range": {}}
    for name, rows in evals.items():
        for row in rows:
            part = "beyond_training_range" if STRETCH in row["split"] else "held_out"
            results[part].setdefault(name, {})[row["family"]] = _metrics(row)
    return {
        "run": str(run.folder.resolve()), "preset": run.cfg.preset,
        "models": {name: str((run.folder / name).resolve()) for name in ("base", "rl")},
        "parameters": run.state.get("info", {}).get("parameters"),
        "eval": {"problems": run.cfg.eval.problems, "k": run.cfg.eval.k,
                 "temperature": run.cfg.eval.temperature, "top_p": run.cfg.eval.top_p},
        **results,
        "wall_s": round(sum(c["wall_s"] for c in cost.values()), 2), "cpu_s": round(cpu_s, 2),
        "kwh_estimate": _kwh(cpu_s), "watts_per_busy_core": WATTS_PER_BUSY_CORE, "cost": cost,
        **r1_summary(run),
    }


# --- plots ------------------------------------------------------------------------------------------------
def _plot(path: Path, title: str, ylabel: str, series: list[tuple[str, list, list]], xlabel: str) -> bool:
    """One line chart; False (and no file) when there is nothing to draw."""
    series = [s for s in series if s[1]]
    if not series:
        return False
    # The Figure API needs no pyplot and no global backend: the Agg canvas renders it headless.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if len(series) > 1:
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_plots(run) -> dict[str, str]:
    """The PNGs that had data, as {caption: path relative to the run folder}."""
    grpo, heldout, pre = (run.metrics.read(s) for s in ("grpo", "grpo_eval", "pretrain"))

    def col(rows: list[dict], key: str) -> tuple[list, list]:
        kept = [r for r in rows if r.get(key) is not None]
        return [r["step"] for r in kept], [r[key] for r in kept]

    families = sorted({k for r in heldout for k in r if k.startswith("heldout_")})
    reward = [("reward (training batch)", *col(grpo, "reward")),
              ("accuracy (training batch)", *col(grpo, "accuracy")),
              *[(f"held-out pass@1, {f.removeprefix('heldout_')}", *col(heldout, f)) for f in families]]
    charts = {
        "Reward and held-out accuracy vs RL step": ("reward.png", "reward / accuracy", reward, "RL step"),
        "Mean response length vs RL step": (
            "response_length.png", "tokens", [("mean response length", *col(grpo, "response_length"))],
            "RL step"),
        "Reflection-word frequency vs RL step": (
            "reflection.png", "share of responses",
            [("responses with wait/check/verify/...", *col(grpo, "reflection_rate"))], "RL step"),
        "Pretraining loss": ("pretrain_loss.png", "cross-entropy", [("loss", *col(pre, "loss"))], "step"),
    }
    out = {}
    for caption, (name, ylabel, series, xlabel) in charts.items():
        if _plot(run.folder / "plots" / name, caption, ylabel, series, xlabel):
            out[caption] = f"plots/{name}"
    return out


# --- report.md ----------------------------------------------------------------------------------------------
def _corpus_section(run) -> list[str]:
    corpus = run.state.get("info", {}).get("corpus", {})
    rows = [[fam, str(c["documents"]), str(c["worked"]), str(c["bare"])] for fam, c in corpus.items()]
    totals = [sum(c[k] for c in corpus.values()) for k in ("documents", "worked", "bare")]
    rows.append(["**total**", *(f"**{t}**" for t in totals)])
    return ["## What the base model learned from", "",
            markdown_table(["task", "documents", "worked solution", "bare answer"], rows), "",
            "Each document is one solved training-split problem in the chat format. In about "
            f"{run.cfg.data.worked_fraction:.0%} of them the thinking block holds a worked solution; the "
            "rest close the thinking at once and give the bare answer. **The base model never saw a "
            "reward**: it was only trained to continue these documents. Whatever RL changes, it found by "
            "sampling and being scored.", ""]


def _model_section(run) -> list[str]:
    m, params = run.cfg.model, run.state.get("info", {}).get("parameters")
    size = f"{params:,} parameters" if params else "size not recorded"
    return ["## The model", "",
            f"{m.model_type}, {size} ({m.num_hidden_layers} layers, hidden size {m.hidden_size}, "
            f"{m.num_attention_heads} attention heads / {m.num_key_value_heads} key-value heads, "
            f"MLP {m.intermediate_size}, vocabulary {m.vocab_size}, "
            f"context {m.max_position_embeddings} tokens).",
            ""]


def _results_section(run, evals: dict[str, list[dict]]) -> list[str]:
    ec = run.cfg.eval
    lines = ["## Base vs RL on held-out problems", "",
             f"{ec.problems} held-out problems per row (never trained on), k={ec.k} samples each at "
             f"T={ec.temperature}, top-p {ec.top_p}, up to {ec.max_new_tokens} tokens. pass@1 is the mean "
             f"correctness of the samples, cons@{ec.k} the majority vote, greedy a single T=0 answer.", ""]
    if not evals:
        return [*lines, "No evaluation results yet.", ""]
    body = []
    for b, r in paired_rows(evals):
        row = b or r
        body.append([row["family"], _split_label(row, evals), format_difficulty(row["difficulty"]),
                     percent(b["pass@1"]) if b else "-", percent(r["pass@1"]) if r else "-", _delta(b, r),
                     _pair(b, r, "cons@k"), _pair(b, r, "greedy"),
                     _pair(b, r, "mean_length", "{:.1f}".format),
                     _pair(b, r, "thinking_rate"), _pair(b, r, "reflection_rate")])
    header = ["task", "split", "difficulty", "pass@1 base", "pass@1 RL", "Δ (points)",
              f"cons@{ec.k} base → RL", "greedy base → RL", "mean length base → RL", "thinking base → RL",
              "reflection base → RL"]
    return [*lines, markdown_table(header, body), ""]


def _grpo_section(run) -> list[str]:
    g = run.cfg.grpo
    rows = [[k, f"`{v}`"] for k, v in dataclasses.asdict(g).items()]
    return ["## GRPO settings", "", markdown_table(["setting", "value"], rows), "",
            f"Reward = accuracy (the task's verifier on the final answer) + {g.format_weight} × format "
            "(`…</think>` then exactly one `<answer>…</answer>`). No neural reward model.", ""]


def _cost_section(run) -> list[str]:
    cost = run.state.get("cost", {})
    body = [[stage, _duration(c["wall_s"]), f"{c['cpu_s']:.1f}", f"{_kwh(c['cpu_s']):.6f}"]
            for stage, c in cost.items()]
    wall, cpu = sum(c["wall_s"] for c in cost.values()), sum(c["cpu_s"] for c in cost.values())
    body.append(["**total**", f"**{_duration(wall)}**", f"**{cpu:.1f}**", f"**{_kwh(cpu):.6f}**"])
    gpu = "" if run.device.type == "cpu" else f" This run used {run.device.type}; its draw is not counted."
    return ["## Cost", "", markdown_table(["stage", "wall time", "CPU-seconds", "est. kWh"], body), "",
            f"Energy is estimated from CPU time alone at {WATTS_PER_BUSY_CORE:g} W per busy core "
            f"(`WATTS_PER_BUSY_CORE`); idle draw is not counted.{gpu}", ""]


def render_report(run, plots: dict[str, str]) -> str:
    cfg = run.cfg
    recipe = ("recipe R1-Zero: pretrain a base model, then GRPO with rule-checked rewards only." if cfg.recipe != "r1"
              else "recipe R1: pretrain a base model, cold-start SFT, reasoning RL, rejection-sampling SFT, RL "
                   "over every task, then distillation into a smaller student; rule-checked rewards only.")
    lines = [f"# pocket-r1 run `{run.folder.name}`", "",
             f"Preset `{cfg.preset}`, tasks {', '.join(cfg.data.families)}, {recipe}", "",
             *_corpus_section(run), *_model_section(run), *_results_section(run, load_evals(run.folder)),
             *r1_sections(run), *_grpo_section(run), *_cost_section(run), "## Curves", ""]
    lines += [f"### {caption}\n\n![{caption}]({path})\n" for caption, path in plots.items()]
    if not plots:
        lines.append("No metrics were logged, so there is nothing to plot.\n")
    return "\n".join(lines)


def write_report(run) -> None:
    """report.md, plots/*.png and summary.json in the run folder."""
    plots = write_plots(run)
    write_text(run.folder / "report.md", render_report(run, plots))
    write_json(run.folder / "summary.json", summary(run))


def print_summary(run) -> None:
    """The base-vs-RL table and how to talk to the result, for the end of `pocketr1 run`."""
    evals = load_evals(run.folder)
    ec = run.cfg.eval
    print(f"\nHeld-out results ({ec.problems} problems per row, k={ec.k} samples at T={ec.temperature}):")
    body = []
    for b, r in paired_rows(evals):
        row = b or r
        body.append([row["family"], _split_label(row, evals), _pair(b, r, "pass@1"), f"{_delta(b, r)} pts",
                     _pair(b, r, "cons@k"), _pair(b, r, "greedy")])
    print(text_table(["task", "split", "pass@1 base → RL", "change", f"cons@{ec.k} base → RL",
                      "greedy base → RL"], body))
    wall = sum(c["wall_s"] for c in run.state.get("cost", {}).values())
    print(f"\nWall time {_duration(wall)}. Report: {run.folder / 'report.md'}")
    print(f"Chat with it:  pocketr1 chat {shlex.quote(str(run.folder))}")
