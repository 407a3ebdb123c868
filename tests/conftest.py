"""Shared test setup: everything offline, small and quick on a 2-core machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Set before anything imports huggingface_hub / transformers: tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _cli_prefix() -> list[str]:
    """The installed `pocketr1` console script beside this interpreter, else `python -m pocketr1`."""
    script = Path(sys.executable).with_name("pocketr1")
    if script.is_file():
        return [str(script)]
    found = shutil.which("pocketr1")
    return [found] if found else [sys.executable, "-m", "pocketr1"]


CLI = _cli_prefix()


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `pocketr1 ARGS...` and capture its output as text."""
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
