"""`pocketr1 finetune` under torchrun, two local CPU processes (gloo): the same losses and weights as one
process with the same global batch (DDP full fine-tuning; FSDP2 with a LoRA adapter), every example once per
epoch, a checkpoint written once that loads in one process, and --resume after a Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI
from safetensors.torch import load_file
from test_distributed import env, run, torchrun, worker_pids
from test_sft import examples, make_model_folder, write_jsonl

from pocketr1.train.common import load_checkpoint, make_optimizer

N_EXAMPLES = 24
COMMON = ["--preset", "tiny", "--device", "cpu", "threads=1", "dtype=float32", "sft.rows=4", "sft.seq_len=64",
          "sft.log_every=1"]
LONG = [*COMMON, "sft.steps=200", "sft.checkpoint_every=10"]  # long enough to stop it half-way
SHORT = [*COMMON, "sft.steps=24", "sft.checkpoint_every=100", "sft.lr=1e-2"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sftdist")
    folder = make_model_folder(root / "base")
    jsonl = write_jsonl(root / "data.jsonl", [{"messages": e} for e in examples(N_EXAMPLES)])
    return root, folder, jsonl


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert y["examples"] == x["examples"] and y["epoch"] == x["epoch"]
        assert y["loss"] == pytest.approx(x["loss"], abs=2e-4), (x, y)


@pytest.mark.slow
def test_ddp_stopped_and_resumed_matches_one_process(data):
    root, folder, jsonl = data
    one = run([*CLI, "finetune", folder, jsonl, "--full", "--out", root / "one", *LONG], root)
    assert one.returncode == 0, one.stderr[-3000:]

    out = root / "two"
    proc = subprocess.Popen(torchrun("finetune", folder, jsonl, "--full", "--out", out, *LONG), cwd=root, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint" / "progress.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    for pid in worker_pids(proc.pid).values():  # Ctrl-C in both ranks: they agree on a step, save, and stop
        os.kill(pid, signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and "--resume continues" in stderr, stderr[-3000:]
    stopped = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert 10 <= stopped < 200
    # Written once, by rank 0, whole; one process can load it (weights and Adam state).
    loaded = load_checkpoint(out / "checkpoint", lambda m: make_optimizer(m, 1e-3, 0.0), torch.device("cpu"))
    assert loaded is not None and loaded[2]["step"] == stopped and loaded[1].state_dict()["state"]
    assert not list(out.rglob("*.tmp"))

    again = run(torchrun("finetune", folder, jsonl, "--full", "--out", out, "--resume", "--device", "cpu"), root)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = metrics(root / "one"), metrics(out)
    assert [r["step"] for r in b] == list(range(1, 201))  # every step logged once, across the stop
    assert_same_losses(a, b)
    assert a[-1]["loss"] < 0.7 * a[0]["loss"]  # it learned: the comparison is not between two idle runs
    for epoch in {r["epoch"] for r in b[:-1]} - {b[-1]["epoch"]}:  # whole epochs: each example exactly once
        assert sum(r["examples"] for r in b if r["epoch"] == epoch) == N_EXAMPLES
    wa, wb = (load_file(str(f / "model.safetensors")) for f in (root / "one", out))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)
    assert not (out / "checkpoint").exists()  # the finished folder is the model, not the work in progress


@pytest.mark.slow
def test_fsdp_lora_matches_one_process(data):
    root, folder, jsonl = data
    one = run([*CLI, "finetune", folder, jsonl, "--lora", "--rank", "4", "--out", root / "lora1", *SHORT], root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun("finetune", folder, jsonl, "--lora", "--rank", "4", "--fsdp", "--out", root / "lora2", *SHORT),
              root)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(root / "lora1"), metrics(root / "lora2")
    assert_same_losses(a, b)
    assert a[-1]["loss"] < a[0]["loss"] - 0.1
    wa, wb = (load_file(str(root / f / "adapter_model.safetensors")) for f in ("lora1", "lora2"))
    assert wa.keys() == wb.keys() and any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)
