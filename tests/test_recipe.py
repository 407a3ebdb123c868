"""The multi-stage R1 recipe: its config presets, what rejection sampling keeps, and a miniature
`pocketr1 run --recipe r1` killed after a stage, resumed and checked to the end (report, students,
comparisons, traces with provenance), plus `pocketr1 sample` and `pocketr1 distill` on its result."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, cli_env, run_cli

from pocketr1 import config as config_mod
from pocketr1.recipe import R1_STAGES
from pocketr1.tasks import get_family
from pocketr1.tasks.base import Problem
from pocketr1.tasks.rewards import parse_completion
from pocketr1.train.sample import judge, readable_trace, trace_messages

# --- config -------------------------------------------------------------------------------------------------


def test_r1_grpo_preset_has_r1_settings_and_a_scaled_reference_reset():
    cfg = config_mod.build("default", ["grpo_preset=r1", "grpo.steps=520"])
    assert (cfg.grpo.group_size, cfg.grpo.beta, cfg.grpo.temperature) == (16, 0.001, 1.0)
    assert cfg.grpo.ref_reset_every == 20  # R1-Zero: every 400 of 10,400 steps -> 520 * 400 / 10400
    assert config_mod.build("default", ["grpo_preset=r1"]).grpo.ref_reset_every == 2  # 60 steps
    explicit = config_mod.build("default", ["grpo_preset=r1", "grpo.group_size=4", "grpo.ref_reset_every=7"])
    assert (explicit.grpo.group_size, explicit.grpo.ref_reset_every) == (4, 7)  # overrides win


def test_dapo_preset_switches_on_every_dapo_piece():
    g = config_mod.build("default", ["grpo_preset=dapo"]).grpo
    assert (g.variant, g.eps_low, g.eps_high, g.beta, g.dynamic_sampling) == ("dapo", 0.2, 0.28, 0.0, True)
    assert g.overlong_cache == g.max_new_tokens // 5
    plain = config_mod.build("default").grpo
    assert (plain.dynamic_sampling, plain.overlong_cache, plain.language_weight, plain.ref_reset_every) == \
        (False, 0, 0.0, 0)  # the r1zero recipe is unchanged


def test_recipe_r1_brings_its_tasks_and_grpo_preset():
    cfg = config_mod.build("tiny", ["recipe=r1"])
    assert cfg.grpo_preset == "r1" and cfg.grpo.group_size == 16
    assert "language" in cfg.data.families and "language" in cfg.r1.reasoning_families
    assert config_mod.build("tiny").recipe == "r1zero"
    mine = config_mod.build("tiny", ["recipe=r1", "data.families=arithmetic", "grpo_preset=grpo"])
    assert mine.data.families == ["arithmetic"] and mine.grpo.group_size == 4


# --- what rejection sampling keeps --------------------------------------------------------------------------

ARITH = get_family("arithmetic").generate(__import__("random").Random(3), get_family("arithmetic").difficulty())
LANG = Problem("language", "Add 1 and 2. Think in English.", "3", {"terms": [1, 2], "script": "latin"})


def completion(thinking: str, answer: str) -> str:
    return f"{thinking}\n</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(("problem", "text", "finished", "reason"), [
    (ARITH, completion(get_family("arithmetic").worked_solution(ARITH, None), ARITH.answer), True, "kept"),
    (ARITH, completion("1+1=2", str(int(ARITH.answer) + 1)), True, "wrong"),
    (ARITH, completion("1+1=2", ARITH.answer), False, "unfinished"),  # ran out of tokens
    (ARITH, f"1+1=2 <answer>{ARITH.answer}</answer>", True, "malformed"),  # no </think>
    (ARITH, completion("1+1=2", ARITH.answer) + f"<answer>{ARITH.answer}</answer>", True, "malformed"),
    (ARITH, completion("", ARITH.answer), True, "no_thinking"),  # a bare answer is no reasoning trace
    (ARITH, completion("\n".join(["1+1=2"] * 4), ARITH.answer), True, "repetitive"),
    (ARITH, completion("1+3=5\n2*2=4", ARITH.answer), True, "false_step"),  # right answer, false reasoning
    (ARITH, completion("1+3=4\n2*2=4\n9-2=7\n8/2=4\nwait, 3+3 is 6", ARITH.answer), True, "kept"),
    (LANG, completion("one plus two is three", "3"), True, "kept"),
    (LANG, completion("оне плус тво ис тхрее", "3"), True, "mixed_script"),
])
def test_judge_keeps_only_verified_wellformed_readable_traces(problem, text, finished, reason):
    verdict = judge(problem, text, finished, min_language=0.9)
    assert verdict.reason == reason
    assert verdict.keep == (reason == "kept")


def test_readable_trace_is_reasoning_then_a_summary_and_trains_as_a_wellformed_answer():
    from pocketr1.train.sft import completion_text

    reasoning = readable_trace("  12+7=19 \n\n12+7=19\n19-5=14\n", "14")
    assert reasoning == "12+7=19\n19-5=14\nSo the answer is 14."
    assistant = trace_messages("Compute 12+7-5.", reasoning, "14")[1]
    trained = completion_text("<｜Assistant｜><think>\n", assistant)  # what SFT teaches the model to write
    parsed = parse_completion(trained)
    assert parsed.well_formed and parsed.answer == "14"
    assert parsed.thinking.strip().endswith("So the answer is 14.")


# --- a miniature r1 recipe, end to end ----------------------------------------------------------------------

# Easy enough that a one-minute base gets some answers right (so there are traces to keep), small enough
# to run in well under a minute on two quiet cores.
EASY = ["data.families=arithmetic,language", "r1.reasoning_families=arithmetic,language", "data.worked_fraction=1.0",
        "data.difficulty.arithmetic.min_terms=2", "data.difficulty.arithmetic.max_terms=2",
        "data.difficulty.language.max_terms=2",
        "pretrain.steps=200", "r1.student_pretrain_steps=40", "grpo.group_size=4", "grpo.eval_every=0",
        "eval.problems=8", "eval.k=2", "r1.cold_start_prompts=16", "r1.cold_start_k=8"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> tuple[Path, dict, float]:
    """The recipe killed once `rl_reasoning` is recorded, then resumed to the end."""
    root = tmp_path_factory.mktemp("r1")
    folder = root / "run"
    proc = subprocess.Popen([*CLI, "run", "--recipe", "r1", "--preset", "tiny", "--out", str(folder), "--device", "cpu",
                             *EASY], cwd=root, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_path, deadline = folder / "state.json", time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if state_path.exists() and "rl_reasoning" in json.loads(state_path.read_text() or "{}").get("done", []):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the recipe ended before it could be killed after a stage"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    before = json.loads(state_path.read_text())
    base_mtime = (folder / "base" / "model.safetensors").stat().st_mtime
    done = run_cli("run", "--resume", "--out", folder, cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, before, base_mtime


@pytest.mark.slow
def test_recipe_resumes_after_a_stage_without_redoing_it(recipe_run):
    folder, before, base_mtime = recipe_run
    state = json.loads((folder / "state.json").read_text())
    assert state["done"] == list(R1_STAGES)
    for stage in before["done"]:  # recorded once: a redone stage would have added to its cost
        assert state["cost"][stage] == before["cost"][stage], stage
    assert (folder / "base" / "model.safetensors").stat().st_mtime == base_mtime
    sft_steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["stage"] == "cold_start"]
    assert sft_steps == sorted(set(sft_steps))  # no step logged twice


@pytest.mark.slow
def test_recipe_evaluates_every_stage_and_reports_them(recipe_run):
    folder, _, _ = recipe_run
    families = ["arithmetic", "language"]
    for model in ("base", "cold_start", "rl_reasoning", "rejection_sft", "rl"):
        assert (folder / model / "model.safetensors").is_file(), model
        rows = json.loads((folder / "eval" / f"{model}.json").read_text())["rows"]
        assert {r["family"] for r in rows if r["split"] == "held-out"} == set(families)
    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary["stages"]) == ["base", "cold_start", "rl_reasoning", "rejection_sft", "rl"]
    for per_family in summary["stages"].values():
        assert set(per_family) == set(families)
        assert all(0 <= v["pass@1"] <= 1 and 0 <= v["cons@k"] <= 1 for v in per_family.values())
    report = (folder / "report.md").read_text()
    for heading in ("## The R1 recipe, stage by stage", "## Distilled student vs RL-only student",
                    "## GRPO variants: grpo vs dr_grpo vs dapo", "## Language-consistency reward, without and with"):
        assert heading in report


@pytest.mark.slow
def test_recipe_students_and_comparisons(recipe_run):
    folder, _, _ = recipe_run
    d = json.loads((folder / "distill" / "distill.json").read_text())
    assert set(d["eval"]) == {"student_base", "student_sft", "student_rl"}
    assert d["rl_budget"]["cpu_s"] == pytest.approx(d["cost"]["traces"] + d["cost"]["student_sft"])
    rl_rows = [json.loads(line) for line in (folder / "distill" / "student_rl_run" / "metrics.jsonl").read_text()
               .splitlines() if json.loads(line)["stage"] == "grpo"]
    assert len(rl_rows) == d["rl_steps"] >= 1
    student = json.loads((folder / "distill" / "student_base" / "config.json").read_text())
    teacher = json.loads((folder / "rl" / "config.json").read_text())
    assert student["vocab_size"] == teacher["vocab_size"]  # the teacher's tokenizer
    entries = json.loads((folder / "compare.json").read_text())["entries"]
    assert set(entries) == {"variant:grpo", "variant:dr_grpo", "variant:dapo", "language:0", "language:1"}
    steps = {e["steps"] for e in entries.values()}
    assert steps == {json.loads((folder / "config.json").read_text())["r1"]["compare_steps"]}  # same budget
    assert entries["variant:dapo"]["settings"]["dynamic_sampling"] is True
    assert entries["language:1"]["settings"]["language_weight"] == 1.0
    assert entries["language:0"]["settings"]["language_weight"] == 0.0


def assert_verified_with_provenance(rows: list[dict], model_dir: Path) -> None:
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    for row in rows:
        p = row["provenance"]
        for key in ("model", "model_sha256", "prompt_id", "family", "verifier", "sampling", "seed", "gold"):
            assert key in p, key
        assert p["model_sha256"] == digest and Path(p["model"]) == model_dir.resolve()
        user, assistant = row["messages"]
        answer = parse_completion(f"x\n</think>\n{assistant['content']}").answer
        assert get_family(p["family"]).check(Problem(p["family"], user["content"], p["gold"]), answer)
        assert assistant["reasoning_content"].endswith(f"So the answer is {answer}.")


@pytest.mark.slow
def test_recipe_traces_are_verified_and_carry_provenance(recipe_run):
    folder, _, _ = recipe_run
    from pocketr1.train.sft import load_chat_jsonl

    for stage, model in (("cold_start", "base"), ("rejection_sft", "rl_reasoning")):
        path = folder / "data" / f"{stage}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert_verified_with_provenance(rows, folder / model)
        info = json.loads((folder / "state.json").read_text())["info"][stage]
        assert info["examples"] == len(rows) == sum(t["kept"] for t in info["traces"].values())
        if rows:
            assert len(load_chat_jsonl(path)) == len(rows)  # what SFT reads
    assert json.loads((folder / "state.json").read_text())["info"]["cold_start"]["examples"] > 0


@pytest.mark.slow
def test_sample_and_distill_commands(recipe_run, tmp_path):
    folder, _, _ = recipe_run
    out = tmp_path / "traces.jsonl"
    done = run_cli("sample", folder, "--out", out, "--prompts", "6", "--per-prompt", "4", "--families", "arithmetic",
                   "--device", "cpu", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert f"Wrote {len(rows)} traces" in done.stdout
    assert_verified_with_provenance(rows, folder / "rl")
    assert {r["provenance"]["family"] for r in rows} <= {"arithmetic"}

    student = tmp_path / "student"
    args = ["distill", "--teacher", folder, "--student-preset", "tiny", "--out", student, "--device", "cpu",
            "pretrain.steps=10", "r1.rejection_prompts=4", "r1.rejection_k=2", "eval.problems=4", "eval.k=1"]
    done = run_cli(*args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    d = json.loads((student / "distill.json").read_text())
    assert d["student"]["teacher"] == str((folder / "rl").resolve())
    assert {r["family"] for r in d["eval"]["student_sft"]} == {"arithmetic", "language"}  # the teacher's tasks
    again = run_cli(*args, cwd=tmp_path, timeout=300)  # everything is there: nothing is redone
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((student / "distill.json").read_text())["cost"] == d["cost"]
