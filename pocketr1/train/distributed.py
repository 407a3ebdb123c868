"""Data-parallel training under `torchrun`: process group, rank helpers, DDP / FSDP2 wrapping, all-reduces.

Launched without torchrun (WORLD_SIZE unset or 1) nothing here creates a process group or wraps a model:
every helper degrades to the single-process answer, so the one-process path is exactly the plain code.

    torchrun --nproc-per-node 2 -m pocketr1 run --preset tiny --out runs/x        # DDP, gloo on CPU
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pocketr1 grpo --out runs/x --fsdp                                       # FSDP2, nccl on CUDA

A rank that dies makes the others fail inside a collective within `--dist-timeout` seconds (gloo raises,
NCCL aborts through its watchdog) instead of waiting forever; the CLI turns that into one error line.
"""

from __future__ import annotations

import inspect
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 300.0
_slow_group = None  # a second group with a long timeout: ranks idle while rank 0 evaluates or writes reports


class DistributedError(RuntimeError):
    """A collective failed: a peer died or stopped answering within the timeout."""


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes (env vars); returns this rank's device. A no-op alone."""
    global _slow_group
    if not launched() or dist.is_initialized():
        return local_device(device)
    device = local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    # gloo on CPU for the idle waits too: an NCCL barrier would hold a GPU stream for minutes.
    _slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
    return device


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: rank-local CUDA index from LOCAL_RANK."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier(slow: bool = False) -> None:
    """Wait for every rank. `slow`: while rank 0 alone does something long (evaluation, report)."""
    if world() > 1:
        dist.barrier(group=_slow_group if slow else None)


def teardown() -> None:
    global _slow_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _slow_group = None


def shard(n: int, world_size: int | None = None, rank_: int | None = None) -> range:
    """This rank's share of `n` items, in contiguous blocks (rank r gets items [r·k, (r+1)·k) plus one of
    the first n % world leftovers): every item on exactly one rank, the union in the original order."""
    w = world() if world_size is None else world_size
    r = rank() if rank_ is None else rank_
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def wrap(model: nn.Module, fsdp: bool = False) -> nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (`fully_shard`: each block's weights,
    gradients and optimiser state sharded across ranks). The result is what the training forward calls;
    build the optimiser after wrapping (FSDP2 swaps parameters for sharded DTensors in place)."""
    if world() == 1:
        return model
    if fsdp:
        fully_shard, _ = _fsdp2()
        for block in model.model.layers:  # one all-gather per block, freed again after its use
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and the (possibly tied) head
        return model
    device_ids = [model.lm_head.weight.device.index] if model.lm_head.weight.is_cuda else None
    # No buffer broadcast: the only buffers are constant RoPE tables, and a forward that skips a collective
    # lets ranks run different numbers of no-grad forwards.
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})  # renamed in recent torch; the old name warns there
    return ddp(model, device_ids=device_ids, **no_sync)


def is_wrapped(model: nn.Module) -> bool:
    """Whether calls must go through `model.forward` (DDP's and FSDP's hooks live there)."""
    return isinstance(model, (nn.parallel.DistributedDataParallel, _fsdp2()[1]))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, _fsdp2()[1])


def _fsdp2():
    """FSDP2's `fully_shard` and `FSDPModule`: public from torch 2.6, under `_composable` in 2.5."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (gathered from FSDP shards on every rank; only rank 0's is filled)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sum_all(*values: float | torch.Tensor) -> list[float]:
    """Sum of each value over every rank (one all-reduce for all of them)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world() > 1:
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-shaped `t`, concatenated in rank order along dim 0."""
    if world() == 1:
        return t
    parts = [torch.empty_like(t, device=_comm_device()) for _ in range(world())]
    dist.all_gather(parts, t.to(_comm_device()))
    return torch.cat(parts).to(t.device)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict in the single-process layout (parameters numbered in group order), so a
    checkpoint written under FSDP resumes alone or under DDP, and the other way round."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
    names = [n for g in sd.get("param_groups", []) for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    groups, start = [], 0
    for g in sd.get("param_groups", []):
        groups.append({**g, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {"state": {index[n]: s for n, s in sd.get("state", {}).items()}, "param_groups": groups}


def load_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a single-process-layout optimiser state into the optimiser of a (possibly sharded) model."""
    if not is_sharded(model):
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Numbered in the order make_optimizer lists them: its groups, each in named_parameters order.
    names = [n for g in _named_groups(model, optimizer) for n in g]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    state = {names[int(i)]: s for i, s in sd["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def _named_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, factory, fsdp: bool
            ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Wrap a freshly built or resumed model and give it a matching optimiser (its state carried over)."""
    if world() == 1:
        return model, optimizer
    if not fsdp:
        return wrap(model), optimizer  # DDP keeps the same parameters: the optimiser stays valid
    saved = optimizer.state_dict()
    model = wrap(model, fsdp=True)
    optimizer = factory(model)  # over the sharded parameters
    if saved["state"]:
        load_optim_state(model, optimizer, saved)
    return model, optimizer


def plain_copy(model: nn.Module, like: nn.Module) -> nn.Module:
    """`like` (an unwrapped model of the same shape) filled with `model`'s full weights on every rank:
    what FSDP ranks generate with, and what gets saved as an HF folder."""
    if not is_sharded(model):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    like.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()})
    return like


def failure(error: BaseException) -> str | None:
    """One line for a collective that failed because a peer died or went silent; None for anything else."""
    if not dist.is_initialized():
        return None
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text).split(". This is typically")[0]  # gloo's source path
    peer = isinstance(error, dist.DistError) or any(
        w in str(error) for w in ("Connection closed", "Connection reset", "Timed out", "timed out", "Gloo", "NCCL"))
    if not peer:
        return None
    return (f"rank {rank()} of {world()} lost its peers ({text[:160]}); another process died or stopped "
            f"answering. Resume with the same command and --resume.")
