"""The user-facing verbs through the real CLI, on one tiny run made once for the module: the report files,
`ask` (exact and deterministic with --raw at T=0), `eval` with difficulty knobs, and `chat` over stdin.
Each command runs as a subprocess, as a user would run it, so exit codes and stdout/stderr are what a user
sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args: str | Path, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketr1", *map(str, args)], input=stdin, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user") / "run"
    # Fewer eval problems than the preset: these tests check the plumbing, not the numbers.
    result = cli("run", "--preset", "tiny", "--out", folder, "--device", "cpu", "eval.problems=8",
                 timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    # print_summary: the base-vs-RL table and how to chat with the result.
    assert "pass@1 base → RL" in result.stdout
    assert f"pocketr1 chat {folder}" in result.stdout
    return folder


def test_report_files_match_eval(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("What the base model learned from", "Base vs RL", "GRPO settings", "Cost", "Curves"):
        assert heading in report
    assert "never saw a reward" in report
    for name in ("reward", "response_length", "reflection", "pretrain_loss"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(b"\x89PNG"), png
        assert f"plots/{name}.png" in report
    assert not list((run_dir / "plots").glob(".*.tmp"))  # no temp file left behind by the atomic writes

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["models"] == {name: str((run_dir / name).resolve()) for name in ("base", "rl")}
    assert summary["wall_s"] > 0 and summary["kwh_estimate"] > 0
    for stage in ("base", "rl"):
        rows = json.loads((run_dir / "eval" / f"{stage}.json").read_text())["rows"]
        for row in rows:
            part = "beyond_training_range" if "beyond" in row["split"] else "held_out"
            got = summary[part][stage][row["family"]]
            k = row["k"]
            assert (got["pass@1"], got["cons@k"], got["greedy"], got["mean_length"]) == (
                row["pass@1"], row[f"cons@{k}"], row["greedy"], row["mean_length"])
            assert got["difficulty"] == row["difficulty"] and got["k"] == k


def test_ask_raw_greedy_is_exact_and_repeatable(run_dir: Path) -> None:
    args = ("ask", run_dir, "Compute 12+7.", "--raw", "--temperature", "0", "--max-tokens", "24",
            "--device", "cpu")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout and "\x1b[" not in first.stdout  # the completion only: no styling, no stats


def test_ask_chat_template_streams_answer(run_dir: Path) -> None:
    result = cli("ask", run_dir / "base", "Compute 1+2.", "--seed", "1", "--max-tokens", "32", "--stats")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "\x1b[" not in result.stdout  # not a terminal: no ANSI codes
    assert "ms/token" in result.stderr


def test_ask_on_a_folder_that_is_no_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "missing"):
        result = cli("ask", path, "Compute 1+2.")
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pocketr1: error:"), result.stderr
        assert str(path) in lines[0]
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_eval_with_difficulty_json(run_dir: Path) -> None:
    result = cli("eval", run_dir, "--task", "arithmetic", "--difficulty", "min_terms=6,max_terms=7",
                 "--problems", "4", "--k", "2", "--max-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"] == str(run_dir / "rl")
    [row] = out["rows"]
    assert row["family"] == "arithmetic" and row["k"] == 2 and row["problems"] == 4
    # The knobs given win; the others keep the run's training difficulty.
    assert {k: row["difficulty"][k] for k in ("min_terms", "max_terms")} == {"min_terms": 6, "max_terms": 7}
    assert "max_value" in row["difficulty"]
    assert 0 <= row["pass@1"] <= 1 and "cons@2" in row and "greedy" in row


def test_eval_table_on_a_model_folder(run_dir: Path) -> None:
    result = cli("eval", run_dir / "base", "--problems", "2", "--k", "1", "--max-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "pass@1" in result.stdout and "arithmetic" in result.stdout and "countdown" in result.stdout


@pytest.mark.parametrize("difficulty", ["bogus=3", "min_terms"])
def test_eval_bad_difficulty_fails_cleanly(run_dir: Path, difficulty: str) -> None:
    result = cli("eval", run_dir, "--task", "arithmetic", "--difficulty", difficulty, "--problems", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("pocketr1: error:") and "Traceback" not in result.stderr
    assert difficulty.split("=")[0] in result.stderr


def test_chat_over_stdin(run_dir: Path) -> None:
    result = cli("chat", run_dir, "--seed", "0", "--max-tokens", "32",
                 stdin="Compute 1+2.\n/reset\nUse 1,2,3 to make 6.\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "[conversation cleared]" in result.stdout
    replies = result.stdout.split("[conversation cleared]")
    assert all(r.strip() for r in replies)  # a reply before and after the reset
    assert "\x1b[" not in result.stdout


def test_chat_ends_on_end_of_input(run_dir: Path) -> None:
    result = cli("chat", run_dir, "--max-tokens", "16", stdin="Compute 2+2.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
