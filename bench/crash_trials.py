"""Crash trials: `pocketr1 run` killed with SIGKILL at random moments, then `--resume`d (and killed again, at
random) until a resume finishes; then every checkpoint must load, state.json must list every stage once,
metrics.jsonl must hold each (stage, step) exactly once with no gaps, and the resumed figures must equal
those of an uninterrupted run (the loss curve and GRPO rewards: a resume is exact, not merely "continues").

Half the kills land at a uniformly random time; the other half wait for a write to start (a checkpoint or
model folder being built under a temp name, or a swap in progress) and kill at once, so that the dangerous
moments are hit on purpose rather than by luck.

    python bench/crash_trials.py                    # 20 trials on a shrunk tiny preset -> results/crash.json
    python bench/crash_trials.py --trials 3 --quick # a smoke run
Each trial prints one line; the summary gives trials, faults injected, kills during writes, and runs lost
(a resume that failed, a checkpoint that did not load, or metrics with gaps or duplicates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("corpus", "tokenizer", "pretrain", "eval_base", "grpo", "eval_rl", "report")
# The tiny preset shrunk to a few seconds: enough checkpoints in each training stage to be killed between.
SHRUNK = ["data.train_docs=400", "pretrain.steps=16", "pretrain.checkpoint_every=4", "pretrain.log_every=2",
          "pretrain.rows=4", "pretrain.seq_len=64", "grpo.steps=8", "grpo.checkpoint_every=1", "grpo.eval_every=2",
          "grpo.eval_problems=4", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=16",
          "eval.problems=4", "eval.k=1", "eval.max_new_tokens=16"]
WATCHED = ("", "pretrain", "grpo")  # folders (under the run) where checkpoints and models are written


def cli() -> list[str]:
    script = Path(sys.executable).with_name("pocketr1")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pocketr1"]


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(folder: Path, resume: bool, overrides: list[str]) -> subprocess.Popen:
    args = ["run", "--resume", "--out", str(folder)] if resume else \
        ["run", "--preset", "tiny", "--out", str(folder), "--device", "cpu", *overrides]
    return subprocess.Popen([*cli(), *args], cwd=folder.parent, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def writes_in_progress(folder: Path) -> list[str]:
    """Folders being built under a temp name, or swapped (`X.old`), as a kill would find them."""
    found = []
    for sub in WATCHED:
        try:
            names = os.listdir(folder / sub)
        except FileNotFoundError:
            continue
        found += [f"{sub}/{n}".lstrip("/") for n in names
                  if n.endswith(".old") or (n.startswith(".") and n.endswith(".tmp") and (folder / sub / n).is_dir())]
    return found


def kill_somewhere(proc: subprocess.Popen, folder: Path, rng: random.Random, horizon: float, aim_at_write: bool
                   ) -> dict:
    """SIGKILL `proc` at a random time within `horizon` s, or (aiming) as soon as a write is seen after it."""
    t0 = time.monotonic()
    stale = set(writes_in_progress(folder))  # what an earlier kill left: not a write of this process
    at = t0 + rng.uniform(0.2, horizon)  # random: kill then; aiming: start watching then
    seen: list[str] = []
    while proc.poll() is None:
        now = time.monotonic()
        if aim_at_write and now >= at - 0.5 * horizon and (
                seen := [w for w in writes_in_progress(folder) if w not in stale]):
            break
        if not aim_at_write and now >= at:
            break
        if aim_at_write and now > t0 + 2 * horizon:
            break
        time.sleep(0.0005 if aim_at_write else 0.005)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    during = [w for w in writes_in_progress(folder) if w not in stale]  # a temp folder or a half-done swap
    return {"killed": not finished, "at_s": round(time.monotonic() - t0, 2), "during_write": bool(during or seen),
            "left": during}


def metric_steps(folder: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)  # a torn line would fail here: that is a lost run
        steps.setdefault(row["stage"], []).append(row["step"])
    return steps


def curves(folder: Path) -> dict[str, list]:
    """The figures a resume must reproduce exactly (times excluded)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"pretrain_loss": [r["loss"] for r in rows if r["stage"] == "pretrain"],
            "grpo_reward": [r["reward"] for r in rows if r["stage"] == "grpo"],
            "grpo_eval": [r for r in rows if r["stage"] == "grpo_eval"]}


def expected_steps(cfg: dict) -> dict[str, list[int]]:
    p, g = cfg["pretrain"], cfg["grpo"]
    return {"pretrain": sorted(set(range(p["log_every"], p["steps"] + 1, p["log_every"])) | {p["steps"]}),
            "grpo": list(range(1, g["steps"] + 1)),
            "grpo_eval": list(range(0, g["steps"] + 1, g["eval_every"])) if g["eval_every"] else [0]}


def check(folder: Path, reference: dict | None) -> list[str]:
    """Everything wrong with a finished run folder (empty: nothing)."""
    import torch

    from pocketr1.model import load_model
    from pocketr1.train.common import load_checkpoint, make_optimizer

    problems = []
    state = json.loads((folder / "state.json").read_text())
    if state["done"] != list(STAGES):
        problems.append(f"state.json done = {state['done']}")
    for name in ("base", "rl"):
        try:
            load_model(folder / name)
        except Exception as e:
            problems.append(f"{name} does not load: {e}")
    for stage in ("pretrain", "grpo"):
        try:
            load_checkpoint(folder / stage / "checkpoint", lambda m: make_optimizer(m, 1e-3, 0.0), torch.device("cpu"))
        except Exception as e:
            problems.append(f"{stage} checkpoint does not load: {e}")
    try:
        steps = metric_steps(folder)
    except (json.JSONDecodeError, KeyError) as e:
        return problems + [f"metrics.jsonl has a bad line ({e})"]
    for stage, want in expected_steps(json.loads((folder / "config.json").read_text())).items():
        if steps.get(stage, []) != want:
            problems.append(f"metrics {stage} steps {steps.get(stage)} != {want}")
    if reference is not None and (got := curves(folder)) != reference:
        diff = [k for k in got if got[k] != reference[k]]
        problems.append(f"resumed figures differ from an uninterrupted run: {diff}")
    litter = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]
    if litter:
        problems.append(f"left behind: {litter}")
    return problems


def reference_run(root: Path, overrides: list[str]) -> tuple[dict, float]:
    """An uninterrupted run: its figures and how long it took (the horizon for random kills)."""
    folder = root / "reference"
    t0 = time.monotonic()
    proc = start(folder, False, overrides)
    err = proc.communicate(timeout=600)[1]
    if proc.returncode:
        raise RuntimeError(f"the uninterrupted run failed: {err[-2000:]}")
    return curves(folder), time.monotonic() - t0


def trial(root: Path, index: int, rng: random.Random, horizon: float, reference: dict | None,
          overrides: list[str], max_faults: int = 3) -> dict:
    """Start a run, kill it 1..max_faults times (each resume may be killed again), resume to the end, check."""
    folder = root / f"trial{index:03d}"
    faults, during_write, restarts, attempts = [], 0, 0, 0
    want = rng.randint(1, max_faults)
    while len(faults) < want and attempts < 4 * max_faults:
        attempts += 1
        resume = (folder / "config.json").exists()  # killed before the folder existed: nothing to resume
        restarts += not resume and bool(faults)
        # A resumed run has less left to do: later kills come sooner.
        fault = kill_somewhere(start(folder, resume, overrides), folder, rng, horizon * (0.5 if faults else 1.0),
                               aim_at_write=index % 2 == 1)
        if fault["killed"]:
            faults.append(fault)
            during_write += fault["during_write"]
        elif not faults:  # finished before the first kill: start this trial again
            shutil.rmtree(folder)
    proc = start(folder, (folder / "config.json").exists(), overrides)
    err = proc.communicate(timeout=600)[1]
    problems = [f"resume exited {proc.returncode}: {err.strip().splitlines()[-1:]}"] if proc.returncode else []
    if not problems:
        problems = check(folder, reference)
    return {"trial": index, "faults": len(faults), "during_write": during_write, "restarts": restarts,
            "kill_times_s": [f["at_s"] for f in faults], "problems": problems}


def run_trials(n: int, seed: int, overrides: list[str], root: Path, exact: bool = True, log=print,
               reference: tuple[dict, float] | None = None) -> dict:
    """`n` trials; `reference`: an uninterrupted run's (figures, seconds) when one was already made."""
    rng = random.Random(seed)
    reference, horizon = reference or reference_run(root, overrides)
    rows = []
    for i in range(n):
        row = trial(root, i, rng, horizon, reference if exact else None, overrides)
        rows.append(row)
        log(f"trial {i:3d}: {row['faults']} kill(s) at {row['kill_times_s']} s, {row['during_write']} during a write"
            f" -> {'OK' if not row['problems'] else 'LOST: ' + '; '.join(row['problems'])}")
    return {"trials": n, "faults": sum(r["faults"] for r in rows),
            "faults_during_writes": sum(r["during_write"] for r in rows),
            "lost": sum(bool(r["problems"]) for r in rows), "horizon_s": round(horizon, 2), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="don't write results/crash.json")
    ap.add_argument("--keep", action="store_true", help="keep the trial folders (printed)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    root = Path(tempfile.mkdtemp(prefix="pocketr1-crash-"))
    try:
        t0 = time.monotonic()
        result = run_trials(args.trials, args.seed, SHRUNK, root)
        result |= {"wall_s": round(time.monotonic() - t0, 1), "overrides": SHRUNK, "seed": args.seed}
    finally:
        if args.keep:
            print(f"trial folders: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"trials {result['trials']}, faults injected {result['faults']} ({result['faults_during_writes']} during "
          f"a write), runs lost {result['lost']}  ({result['wall_s']} s)")
    if not args.quick:
        out = ROOT / "bench" / "results" / "crash.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {out}")
    sys.exit(1 if result["lost"] else 0)


if __name__ == "__main__":
    main()
