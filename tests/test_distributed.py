"""Data parallel under torchrun, on two local CPU processes (gloo): the same losses and weights as one process
with the same global batch, every example on exactly one rank, rank-0-only checkpoints that load alone, a
killed or hung rank ending the job with one clear line, and `--resume` after it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, cli_env
from safetensors.torch import load_file

from pocketr1.model import load_model
from pocketr1.train import distributed
from pocketr1.train.common import load_checkpoint, make_optimizer
from pocketr1.train.grpo_loss import VARIANTS, grpo_loss
from pocketr1.train.pretrain import pack_batch, rank_rows

# float32 everywhere: batch composition must not change rounding. format_weight 1 and 200 pretraining steps
# give rewards that differ within groups, so GRPO actually moves the weights (a zero gradient proves nothing).
TINY = ["--preset", "tiny", "--device", "cpu", "threads=1", "dtype=float32", "pretrain.steps=200",
        "pretrain.checkpoint_every=100", "grpo.steps=4", "grpo.eval_every=0", "grpo.beta=0.01",
        "grpo.format_weight=1", "grpo.lr=1e-4", "grpo.checkpoint_every=2"]
TIMEOUT = 20  # --dist-timeout for these tests: how long a silent peer may stall a collective


def env() -> dict[str, str]:
    return cli_env() | {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "pocketr1", *map(str, args), "--dist-timeout", str(TIMEOUT)]


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(folder: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["stage"] == stage]


# --- sharding: every example exactly once ---------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (16, 3), (3, 4), (0, 2)])
def test_shards_cover_every_item_once_in_order(n, world):
    parts = [distributed.shard(n, world, r) for r in range(world)]
    assert [i for part in parts for i in part] == list(range(n))  # no duplicates, no drops, order kept
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_rows_of_the_global_batch_are_the_single_process_batch():
    encoded = [(list(range(3, 3 + n)), 2) for n in (5, 9, 14, 7, 20, 11)]
    full = pack_batch(encoded, torch.Generator().manual_seed(3), 5, 32, 0, False, torch.device("cpu"))
    parts = [rank_rows(full, distributed.shard(5, 2, r)) for r in range(2)]
    for name in ("inputs", "targets", "weights", "positions", "mask"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(full, name))


@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_losses_with_global_denominators_average_to_the_single_process_loss(variant):
    """What DDP averages (each rank's loss over global counts, times world) is the one-process loss; its
    gradient too. Uneven lengths, so per-rank means would differ from the global one."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 6, generator=gen, requires_grad=True)
    ref, adv = logp.detach() + 0.1 * torch.randn(8, 6, generator=gen), torch.randn(8, generator=gen)
    mask = (torch.arange(6)[None] < torch.tensor([1, 6, 2, 5, 3, 6, 6, 4])[:, None]).float()
    args = (variant, 0.2, 0.28, 0.05, 6)
    full = grpo_loss(logp, logp.detach(), ref, adv, mask, *args).loss
    (g_full,) = torch.autograd.grad(full, logp)
    world, parts = 2, [slice(0, 3), slice(3, 8)]  # uneven: as after DAPO drops a group on one rank
    total = float(mask.sum()) if variant == "dapo" else 8.0
    losses = [grpo_loss(logp[r], logp[r].detach(), ref[r], adv[r], mask[r], *args, total / world).loss
              for r in parts]
    averaged = sum(losses) / world
    (g_avg,) = torch.autograd.grad(averaged, logp)
    torch.testing.assert_close(averaged, full)
    torch.testing.assert_close(g_avg, g_full)


# --- one process against two, same global batch ----------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    one = run([*CLI, "grpo", "--out", root / "one", *TINY], root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun("grpo", "--out", root / "two", *TINY), root)
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two"


@pytest.mark.slow
def test_pretrain_losses_and_weights_match_one_process(pair):
    one, two = pair
    a, b = metrics(one, "pretrain"), metrics(two, "pretrain")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=2e-4), (x, y)
    wa, wb = (load_file(str(f / "base" / "model.safetensors")) for f in pair)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)


@pytest.mark.slow
def test_grpo_rollouts_losses_and_weights_match_one_process(pair):
    one, two = pair
    a, b = metrics(one, "grpo"), metrics(two, "grpo")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert any(r["kl"] > 0 for r in a), "the policy never moved: the comparison would prove nothing"
    for x, y in zip(a, b):
        for key in ("reward", "accuracy", "response_length", "reflection_rate"):  # the same samples
            assert y[key] == x[key], (key, x, y)
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["kl"] == pytest.approx(x["kl"], abs=1e-5, rel=1e-2)
    wa, wb = (load_file(str(f / "rl" / "model.safetensors")) for f in pair)
    moved = max((load_file(str(one / "base" / "model.safetensors"))[k] - wa[k]).abs().max().item() for k in wa)
    assert moved > 1e-4
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-4, rtol=1e-3)


@pytest.mark.slow
def test_checkpoints_written_once_and_load_in_one_process(pair):
    _, two = pair
    assert load_model(two / "rl").config.num_hidden_layers == 2
    loaded = load_checkpoint(two / "grpo" / "checkpoint", lambda m: make_optimizer(m, 1e-4, 0.0),
                             torch.device("cpu"))
    assert loaded is not None and loaded[2]["step"] == 2
    assert loaded[1].state_dict()["state"], "optimizer state was not saved"
    assert not list(two.rglob("*.tmp"))
    logged = [r["step"] for r in metrics(two, "grpo")]
    assert logged == sorted(set(logged))  # one writer: no duplicated lines


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    steps = ["--preset", "tiny", "--device", "cpu", "threads=1", "dtype=float32", "pretrain.steps=30",
             "pretrain.checkpoint_every=10", "pretrain.log_every=10"]
    one = run([*CLI, "pretrain", "--out", tmp_path / "one", *steps], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp = run(torchrun("pretrain", "--out", tmp_path / "fsdp", "--fsdp", *steps), tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    for x, y in zip(metrics(tmp_path / "one", "pretrain"), metrics(tmp_path / "fsdp", "pretrain"), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=2e-4)
    # The FSDP checkpoint holds full (gathered) weights and optimiser state, numbered as one process numbers them.
    loaded = load_checkpoint(tmp_path / "fsdp" / "pretrain" / "checkpoint",
                             lambda m: make_optimizer(m, 1e-3, 0.1), torch.device("cpu"))
    assert loaded is not None and loaded[2]["step"] == 20
    sizes = {p.shape for p in loaded[0].parameters()}
    assert {s["exp_avg"].shape for s in loaded[1].state_dict()["state"].values()} == sizes
    # As if it had crashed after step 20: resuming under FSDP (weights and Adam moments re-sharded from the
    # full checkpoint) must land on the same step-30 loss as the uninterrupted run.
    first = metrics(tmp_path / "fsdp", "pretrain")[-1]
    state_path = tmp_path / "fsdp" / "state.json"
    state = json.loads(state_path.read_text())
    state["done"].remove("pretrain")
    state_path.write_text(json.dumps(state))
    again = run(torchrun("pretrain", "--resume", "--fsdp", "--out", tmp_path / "fsdp", "--device", "cpu"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = metrics(tmp_path / "fsdp", "pretrain")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] == pytest.approx(first["loss"], abs=1e-4)


# --- a rank that dies or hangs, then --resume -----------------------------------------------------------

def worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its children)."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for item in env_vars:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


def start_and_wait_for_checkpoint(folder: Path, cwd: Path, steps: int) -> subprocess.Popen:
    cmd = torchrun("pretrain", "--out", folder, "--preset", "tiny", "--device", "cpu", "threads=1",
                   "dtype=float32", f"pretrain.steps={steps}", "pretrain.checkpoint_every=10")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (folder / "pretrain" / "checkpoint" / "progress.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.1)
    return proc


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.slow
def test_killed_rank_stops_the_job_with_a_clear_error_and_resume_finishes(tmp_path):
    folder, steps = tmp_path / "run", 300
    proc = start_and_wait_for_checkpoint(folder, tmp_path, steps)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    t0 = time.monotonic()
    stderr = proc.communicate(timeout=TIMEOUT + 60)[1]
    assert proc.returncode != 0
    assert time.monotonic() - t0 < TIMEOUT + 30
    assert "pocketr1: error: rank 0 of 2 lost its peers" in stderr, stderr[-3000:]
    assert "--resume" in stderr
    done_before = [r["step"] for r in metrics(folder, "pretrain")]
    assert done_before and done_before[-1] < steps

    resumed = run(torchrun("pretrain", "--resume", "--out", folder, "--device", "cpu"), tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = [r["step"] for r in metrics(folder, "pretrain")]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # no gaps, no duplicates, finished
    assert load_model(folder / "base") is not None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.slow
def test_hung_rank_times_out_instead_of_waiting_forever(tmp_path):
    """A rank that stops answering (SIGSTOP: alive, so torchrun does not notice) must not hold rank 0 forever:
    its collective fails after --dist-timeout and it exits with one clear line."""
    proc = start_and_wait_for_checkpoint(tmp_path / "run", tmp_path, 100_000)
    pids = worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() - t0 < TIMEOUT + 60:
            time.sleep(0.2)
        waited = time.monotonic() - t0
    finally:
        os.kill(pids[1], signal.SIGCONT)  # let torchrun's SIGTERM reach it
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0
    assert TIMEOUT - 2 < waited < TIMEOUT + 45, waited
    assert "pocketr1: error: rank 0 of 2 lost its peers" in stderr, stderr[-3000:]
