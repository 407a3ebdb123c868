"""End to end through the `pocketr1` command: a miniature run, a run killed and resumed, and CLI errors."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, cli_env, run_cli

from pocketr1.model import load_model
from pocketr1.model.transformer import attention_mask, positions_for
from pocketr1.run import STAGES
from pocketr1.tokenizer import ChatTokenizer

# Later stages kept small in the resume test: what it checks is the pretrain resume.
QUICK_TAIL = ["grpo.steps=2", "grpo.eval_every=0", "eval.problems=4", "eval.k=1"]


def metrics(folder: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["stage"] == stage]


def expected_log_steps(steps: int, log_every: int) -> list[int]:
    return sorted(set(range(log_every, steps + 1, log_every)) | {steps})


def assert_loads_both_ways(folder: Path) -> None:
    """pocket-r1 and transformers load the folder and agree on the logits of a chat prompt."""
    transformers = pytest.importorskip("transformers")
    ours = load_model(folder, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ChatTokenizer(folder).prompt_ids("Compute 1+2.")])
    n = ids.shape[1]
    pad_left = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        mine = ours(ids, positions_for(pad_left, 0, n), attention_mask(pad_left, n, n))
        reference = theirs(input_ids=ids).logits
    torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)


def assert_clean_user_error(done: subprocess.CompletedProcess, *mentions: str) -> None:
    """Non-zero exit, one line on stderr naming the problem, no traceback."""
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for text in mentions:
        assert text in lines[0], lines[0]


# --- a whole miniature run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("tiny")
    done = run_cli("run", "--preset", "tiny", "--out", root / "run", "--device", "cpu", cwd=root)
    return root / "run", done


@pytest.mark.slow
def test_tiny_run_finishes_and_writes_everything(tiny_run):
    folder, done = tiny_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for name in ("config.json", "metrics.jsonl", "state.json", "eval/base.json", "eval/rl.json"):
        assert (folder / name).is_file(), name
    for model in ("base", "rl"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (folder / model / name).is_file(), f"{model}/{name}"
    state = json.loads((folder / "state.json").read_text())
    assert state["done"] == list(STAGES)


@pytest.mark.slow
def test_tiny_run_metrics_and_eval(tiny_run):
    folder, done = tiny_run
    assert done.returncode == 0
    cfg = json.loads((folder / "config.json").read_text())
    pretrain = metrics(folder, "pretrain")
    pc = cfg["pretrain"]
    assert [r["step"] for r in pretrain] == expected_log_steps(pc["steps"], pc["log_every"])
    assert all(r["loss"] > 0 for r in pretrain)
    assert pretrain[-1]["loss"] < pretrain[0]["loss"]  # it learned something
    assert [r["step"] for r in metrics(folder, "grpo")] == list(range(1, cfg["grpo"]["steps"] + 1))
    for name in ("base", "rl"):
        report = json.loads((folder / "eval" / f"{name}.json").read_text())
        assert report["model"] == name
        families = {r["family"] for r in report["rows"]}
        assert families == set(cfg["data"]["families"])
        for row in report["rows"]:
            assert row["problems"] == cfg["eval"]["problems"]
            assert 0.0 <= row["pass@1"] <= 1.0
            assert "held-out" in row["split"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["base", "rl"])
def test_tiny_run_models_load_in_transformers(tiny_run, model):
    folder, done = tiny_run
    assert done.returncode == 0
    assert_loads_both_ways(folder / model)


@pytest.mark.slow
def test_tiny_run_tokenizer_and_template_work_in_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    folder, done = tiny_run
    assert done.returncode == 0
    ours = ChatTokenizer(folder / "rl")
    theirs = transformers.AutoTokenizer.from_pretrained(folder / "rl")
    messages = [{"role": "user", "content": "Compute 12+7-5."},
                {"role": "assistant", "content": "12+7=19\n</think>\n<answer>14</answer>"},
                {"role": "user", "content": "Use 3,5,7 to make 22."}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ours.render(messages)
    assert text.endswith("<｜Assistant｜><think>\n")
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten(tiny_run, tmp_path):
    folder, done = tiny_run
    assert done.returncode == 0
    before = (folder / "state.json").read_text()
    again = run_cli("run", "--preset", "tiny", "--out", folder, cwd=tmp_path, timeout=120)
    assert_clean_user_error(again, str(folder))
    assert (folder / "state.json").read_text() == before


# --- kill and resume ----------------------------------------------------------------------------------------

@pytest.mark.slow
def kill_once_checkpointed(cmd: list, cwd: Path, checkpoint: Path) -> None:
    """Start `cmd`, SIGKILL it as soon as `checkpoint` exists, and check it was still running then."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert checkpoint.exists() or checkpoint.parent.with_name("checkpoint.old").exists(), stderr[-2000:]
    assert still_running, "the run ended before it could be killed mid-stage"


@pytest.mark.slow
def test_run_killed_in_pretrain_resumes_without_gaps_or_duplicates(tmp_path):
    folder = tmp_path / "run"
    steps = 80
    kill_once_checkpointed([*CLI, "run", "--preset", "tiny", "--out", str(folder), "--device", "cpu",
                            f"pretrain.steps={steps}", "pretrain.checkpoint_every=20", *QUICK_TAIL],
                           tmp_path, folder / "pretrain" / "checkpoint" / "progress.json")
    state = json.loads((folder / "state.json").read_text())
    assert "pretrain" not in state["done"]
    # Metrics up to the first checkpoint (step 20) were written before the kill; a true resume keeps them.
    before_kill = [r for r in metrics(folder, "pretrain") if r["step"] <= 20]
    assert before_kill

    done = run_cli("run", "--resume", "--out", folder, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((folder / "state.json").read_text())
    assert state["done"] == list(STAGES)
    log_every = json.loads((folder / "config.json").read_text())["pretrain"]["log_every"]
    rows = metrics(folder, "pretrain")
    assert [r["step"] for r in rows] == expected_log_steps(steps, log_every)
    assert [r for r in rows if r["step"] <= 20] == before_kill  # not redone from step 0
    assert_loads_both_ways(folder / "base")


@pytest.mark.slow
def test_run_killed_in_grpo_resumes_without_gaps_or_duplicates(tmp_path):
    folder = tmp_path / "run"
    steps = 12
    kill_once_checkpointed([*CLI, "run", "--preset", "tiny", "--out", str(folder), "--device", "cpu",
                            f"grpo.steps={steps}", "grpo.checkpoint_every=3", "grpo.eval_every=2",
                            "eval.problems=4", "eval.k=1"],
                           tmp_path, folder / "grpo" / "checkpoint" / "progress.json")
    assert "grpo" not in json.loads((folder / "state.json").read_text())["done"]

    done = run_cli("run", "--resume", "--out", folder, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(folder, "grpo")] == list(range(1, steps + 1))
    assert [r["step"] for r in metrics(folder, "grpo_eval")] == list(range(0, steps + 1, 2))
    assert_loads_both_ways(folder / "rl")


# --- CLI errors ---------------------------------------------------------------------------------------------

def test_unknown_preset_is_a_one_line_error(tmp_path):
    done = run_cli("run", "--preset", "nope", "--out", tmp_path / "run", cwd=tmp_path, timeout=120)
    assert_clean_user_error(done, "nope")


def test_unknown_override_is_a_one_line_error(tmp_path):
    done = run_cli("run", "--preset", "tiny", "--out", tmp_path / "run", "grpo.nope=1", cwd=tmp_path,
                   timeout=120)
    assert_clean_user_error(done, "grpo.nope")
    assert not (tmp_path / "run" / "state.json").exists()


def test_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli("run", "--preset", "tiny", "--out", blocker / "run", cwd=tmp_path, timeout=120)
    assert_clean_user_error(done, str(blocker / "run"))
    assert blocker.read_text() == "not a folder"


def test_resume_of_a_missing_run_is_a_one_line_error(tmp_path):
    done = run_cli("run", "--resume", "--out", tmp_path / "nothing-here", cwd=tmp_path, timeout=120)
    assert_clean_user_error(done, "nothing-here")


def test_eval_of_a_missing_path_is_a_one_line_error(tmp_path):
    done = run_cli("eval", "/nonexistent", cwd=tmp_path, timeout=120)
    assert_clean_user_error(done, "/nonexistent")


@pytest.mark.slow
def test_grpo_resume_restores_the_reset_reference(tmp_path):
    """With reference resets on, the checkpoint carries the reference weights and a resume picks them up."""
    folder = tmp_path / "run"
    steps = 8
    kill_once_checkpointed([*CLI, "run", "--preset", "tiny", "--out", str(folder), "--device", "cpu",
                            f"grpo.steps={steps}", "grpo.checkpoint_every=3", "grpo.ref_reset_every=2",
                            "grpo.beta=0.01", "eval.problems=4", "eval.k=1"],
                           tmp_path, folder / "grpo" / "checkpoint" / "reference.safetensors")
    done = run_cli("run", "--resume", "--out", folder, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(folder, "grpo")] == list(range(1, steps + 1))
