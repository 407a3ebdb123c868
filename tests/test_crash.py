"""Crash-proof runs, through the real `pocketr1` command on a shrunk tiny preset: SIGKILL at random moments
(and aimed at checkpoint writes) then `--resume` to the end; a disk that fills up while a checkpoint is
written; Ctrl-C in pretraining and in GRPO. The trial machinery is bench/crash_trials.py (the bigger run)."""

from __future__ import annotations

import gc
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, cli_env

from pocketr1.errors import UserError
from pocketr1.model import ModelConfig, Transformer
from pocketr1.train import common
from pocketr1.train.common import load_checkpoint, make_optimizer, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crash_trials import SHRUNK, check, curves, reference_run, run_trials  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict, float]:
    """An uninterrupted run, its figures (which every resumed run must reproduce) and its duration."""
    root = tmp_path_factory.mktemp("reference")
    figures, seconds = reference_run(root, SHRUNK)
    return root / "reference", figures, seconds


def factory(model):
    return make_optimizer(model, 1e-3, 0.0)


def start(folder: Path, *args: str) -> subprocess.Popen:
    cmd = [*CLI, "run", "--resume", "--out", str(folder)] if args == ("--resume",) else \
        [*CLI, "run", "--preset", "tiny", "--out", str(folder), "--device", "cpu", *SHRUNK, *args]
    return subprocess.Popen(cmd, cwd=folder.parent, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def assert_one_line_error(stderr: str, *mentions: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    for text in mentions:
        assert text in line, stderr[-3000:]
    return line


# --- SIGKILL at random --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkilled_runs_always_resume_exactly(tmp_path, reference):
    result = run_trials(3, seed=1, overrides=SHRUNK, root=tmp_path, reference=reference[1:])
    assert result["faults"] >= 3
    assert result["lost"] == 0, [r["problems"] for r in result["rows"]]


def test_the_checks_catch_a_duplicate_and_a_torn_line(tmp_path, reference):
    """The trial checks can fail: a finished run passes, the same run with a metrics line doubled or torn
    does not (nor does one whose figures differ from the uninterrupted run)."""
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    assert check(folder, reference[1]) == []
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines + [lines[-3]]) + "\n")
    assert any("steps" in p for p in check(folder, None))
    metrics.write_text("\n".join(lines) + "\n" + lines[-1][:10])
    assert any("bad line" in p for p in check(folder, None))
    metrics.write_text("\n".join(lines) + "\n")
    other = curves(folder) | {"pretrain_loss": [0.0]}
    assert any("differ" in p for p in check(folder, other))


# --- Ctrl-C ----------------------------------------------------------------------------------------------------

def interrupt_when(proc: subprocess.Popen, metrics: Path, stage: str) -> str:
    """SIGINT `proc` once `stage` has logged a step; its stderr once it has stopped."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and f'"stage": "{stage}"' in metrics.read_text():
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before {stage} could be interrupted"
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, stderr[-3000:]
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "grpo"])
def test_ctrl_c_saves_then_resume_continues_from_that_step(tmp_path, reference, stage):
    folder = tmp_path / "run"
    stderr = interrupt_when(start(folder), folder / "metrics.jsonl", stage)
    line = assert_one_line_error(stderr, "Ctrl-C", stage, "--resume")
    step = int(line.split(f"{stage} step ")[1].split(",")[0])
    progress = json.loads((folder / stage / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == step  # saved exactly where it stopped, not at the last periodic checkpoint
    assert stage not in json.loads((folder / "state.json").read_text())["done"]
    logged = [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == stage]
    assert logged and max(logged) <= step

    done = start(folder, "--resume")
    assert done.wait(600) == 0, done.stderr.read()[-3000:]
    assert check(folder, reference[1]) == []  # every step once, and the same figures as without the stop


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_loop_handler_removed():
    stop = common.StopOnInterrupt()
    before = signal.getsignal(signal.SIGINT)
    seen = []
    with pytest.raises(KeyboardInterrupt) as caught:
        for step in stop.steps(range(100)):
            seen.append(step)
            if step == 2:
                signal.raise_signal(signal.SIGINT)  # the first: only a flag
                assert stop.requested()
                signal.raise_signal(signal.SIGINT)  # the second: stop now
    assert not isinstance(caught.value, common.Interrupted)
    assert seen == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is before


# --- a full disk ------------------------------------------------------------------------------------------------

def tiny_model() -> Transformer:
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    model.init_weights(0)
    return model


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """ENOSPC injected at the safetensors write of the optimiser state (the real-filesystem version is below)."""
    model = tiny_model()
    optimizer = factory(model)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 4})
    real_save = common.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if filename.endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"\0" * 100)  # a part was written before the disk filled up
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(common, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left on device.*intact"):
        save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 8})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "ckpt", factory, torch.device("cpu"))[2]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left


def mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_filesystem_is_one_line_and_the_previous_checkpoint_loads(tmp_path):
    """`pretrain/` on a tmpfs with room for one checkpoint and a half: the second one cannot be written."""
    folder = tmp_path / "run"
    prep = subprocess.run([*CLI, "tokenizer", "--preset", "tiny", "--out", str(folder), "--device", "cpu", *SHRUNK],
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    cfg = json.loads((folder / "config.json").read_text())
    params = ModelConfig(**{k: v for k, v in cfg["model"].items() if k in ModelConfig.__slots__}).num_params()
    checkpoint_bytes = params * 4 * 3  # weights, and Adam's two moments, in float32
    if not mount_tmpfs(folder / "pretrain", int(checkpoint_bytes * 1.5)):
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC test covers the logic")
    try:
        done = start(folder, "--resume")
        stderr = done.communicate(timeout=600)[1]
        assert done.returncode == 1, stderr[-3000:]
        assert_one_line_error(stderr, "No space left on device", "checkpoint", "intact")
        loaded = load_checkpoint(folder / "pretrain" / "checkpoint", factory, torch.device("cpu"))
        assert loaded is not None and loaded[2]["step"] == cfg["pretrain"]["checkpoint_every"]
        assert [p.name for p in (folder / "pretrain").iterdir()] == ["checkpoint"]
    finally:
        loaded = None  # its tensors map the checkpoint's files: the mount would be busy
        gc.collect()
        if subprocess.run(["umount", str(folder / "pretrain")], capture_output=True, timeout=60).returncode:
            subprocess.run(["umount", "-l", str(folder / "pretrain")], capture_output=True, timeout=60)
