"""Time-to-aha: wall time from an empty folder until the RL model beats its base on held-out problems by
the target margin, and the held-out accuracy curve on the way.

Reads a finished (or running) run folder: `state.json` holds every stage's wall time, `metrics.jsonl` the
GRPO steps (`step_s`) and the held-out pass@1 logged every `grpo.eval_every` steps (`grpo_eval` rows; step 0
is the base, scored by the same evaluator on the same problems as every later point). The clock at a curve
point is the wall time of every stage before GRPO, plus the GRPO steps up to it, plus the held-out evals
done so far (their share of the GRPO stage's wall time not spent in steps). The aha is the first point
where a family's pass@1 exceeds step 0's by the margin (default 25 points, on arithmetic).

    python bench/aha.py runs/latest          # read a run folder -> results/aha.json
    python bench/aha.py --run                # `pocketr1 run` (default preset) in a temp folder first (~15 min)
    python bench/aha.py --run --preset tiny  # smoke run (~1 min; the tiny preset is not expected to reach it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", type=Path, help="a pocket-r1 run folder (omit with --run)")
    p.add_argument("--run", action="store_true", help="launch `pocketr1 run` into a temp folder and read that")
    p.add_argument("--preset", default="default", help="preset for --run (default: default)")
    p.add_argument("--family", default="arithmetic", help="task family the margin is measured on")
    p.add_argument("--margin", type=float, default=0.25, help="target gain in held-out pass@1 (default: 0.25)")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/aha.json, or "
                                            "aha-<preset>.json for another preset)")
    args = p.parse_args(argv)
    if not args.run and args.run_dir is None:
        p.error("give a run folder, or --run")
    return args


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short
    return rows


def analyse(run_dir: Path, family: str, margin: float) -> dict:
    state = json.loads((run_dir / "state.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    cost = state.get("cost", {})
    order = [s for s in state.get("done", []) if s in cost]
    before = order[:order.index("grpo")] if "grpo" in order else order
    before_s = sum(cost[s]["wall_s"] for s in before)
    steps = {r["step"]: r for r in metrics if r.get("stage") == "grpo"}
    evals = sorted((r for r in metrics if r.get("stage") == "grpo_eval"), key=lambda r: r["step"])
    key = f"heldout_{family}"
    if not evals or key not in evals[0]:
        raise SystemExit(f"{run_dir} has no held-out {family} curve (grpo_eval rows) yet.")
    step_total = sum(r.get("step_s", 0.0) for r in steps.values())
    grpo_wall = cost.get("grpo", {}).get("wall_s")
    per_eval = max(0.0, (grpo_wall - step_total) / len(evals)) if grpo_wall else 0.0
    base = evals[0][key]
    curve, aha = [], None
    for i, row in enumerate(evals):
        clock = before_s + sum(r.get("step_s", 0.0) for s, r in steps.items() if s <= row["step"]) \
            + (i + 1) * per_eval
        point = {"step": row["step"], "clock_s": round(clock, 1),
                 **{k.removeprefix("heldout_"): v for k, v in row.items() if k.startswith("heldout_")}}
        curve.append(point)
        if aha is None and row[key] - base >= margin - 1e-9:
            aha = point
    summary = {}
    if (run_dir / "summary.json").is_file():
        held = json.loads((run_dir / "summary.json").read_text()).get("held_out", {})
        summary = {m: {f: v.get("pass@1") for f, v in fams.items()} for m, fams in held.items()}
    return {"run_dir": str(run_dir), "preset": config.get("preset"), "family": family, "margin": margin,
            "stages_before_grpo": {s: cost[s]["wall_s"] for s in before}, "before_grpo_s": round(before_s, 1),
            "grpo_wall_s": grpo_wall, "per_eval_s_estimate": round(per_eval, 2),
            "total_wall_s": round(sum(c["wall_s"] for c in cost.values()), 1),
            "base_pass1": base, "aha": aha, "curve": curve, "final_eval_pass1": summary,
            "eval_problems": config.get("grpo", {}).get("eval_problems")}


def main(argv=None) -> None:
    args = parse_args(argv)
    info = common.machine()
    print(common.describe(info))
    launched = None
    with tempfile.TemporaryDirectory(prefix="bench-aha-") as tmp:
        run_dir = args.run_dir
        if args.run:
            run_dir = Path(tmp) / "run"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pocketr1", "run", "--preset", args.preset, "--out", str(run_dir)],
                           check=True)
            launched = round(time.perf_counter() - t0, 1)
        result = analyse(run_dir, args.family, args.margin)
    result["launched_wall_s"] = launched
    result["machine_note"] = "the machine this script ran on; a run folder read from elsewhere may differ"

    n = result["eval_problems"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["stages_before_grpo"].items())
    print(f"\nrun {result['run_dir']} (preset {result['preset']}); before GRPO {result['before_grpo_s']:.0f} s "
          f"({stages})")
    families = [k for k in result["curve"][0] if k not in ("step", "clock_s")]
    print(f"\nheld-out pass@1 ({n} problems, 1 sample at the eval temperature) vs GRPO step:")
    print(f"{'step':>5} {'clock':>8} " + " ".join(f"{f:>10}" for f in families))
    for p in result["curve"]:
        mark = "  <- aha" if p == result["aha"] else ""
        print(f"{p['step']:>5} {p['clock_s'] / 60:>6.1f}m " + " ".join(f"{p[f]:>10.3f}" for f in families) + mark)
    aha = result["aha"]
    if aha:
        print(f"\ntime-to-aha ({args.family} +{args.margin * 100:.0f} points over the base's "
              f"{result['base_pass1']:.3f}): {aha['clock_s']:.0f} s = {aha['clock_s'] / 60:.1f} min, at GRPO step "
              f"{aha['step']} ({aha[args.family]:.3f})")
    else:
        print(f"\nno aha: {args.family} never beat the base's {result['base_pass1']:.3f} by {args.margin:.2f}")
    print(f"whole run: {result['total_wall_s'] / 60:.1f} min of stage wall time"
          + (f", {launched / 60:.1f} min launched from here" if launched else ""))
    if result["final_eval_pass1"]:
        print("final eval pass@1 (report's held-out set): " + "; ".join(
            f"{m}: " + ", ".join(f"{f} {v:.3f}" for f, v in fams.items())
            for m, fams in result["final_eval_pass1"].items()))

    name = "aha.json" if result["preset"] == "default" else f"aha-{result['preset']}.json"
    info["load_average_end"] = common.os.getloadavg()
    common.write_result(args.out or common.RESULTS / name, {"benchmark": "aha", "machine": info, **result})


if __name__ == "__main__":
    main()
