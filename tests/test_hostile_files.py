"""Hostile model folders, through the `pocketr1` command: each is refused with one readable sentence (exit 1,
no traceback) before anything large is allocated, and nothing is ever unpickled.

Every case runs in one child process (`pocketr1.cli.main`, as the console script calls it) under a 4 GiB
address-space cap, so a regression that does try to allocate from a hostile config fails there instead of
exhausting the machine; one case also goes through the real console script."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI, cli_env
from safetensors.torch import load_file, save_file

from pocketr1.serve.toy import random_model


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def truncate(folder: Path, size: int) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:size])


def header_claims(folder: Path, length: int) -> None:
    """A safetensors header whose length field claims `length` bytes."""
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + path.read_bytes()[8:])


def shard(folder: Path, evil: str) -> None:
    """Split into a one-shard index whose weight map also names `evil`."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = load_file(str(folder / "model-00001-of-00001.safetensors"))
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map["model.norm.weight"] = evil
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def pickle_only(folder: Path, name: str) -> None:
    # Never written with torch.save in a test that could be loaded: the payload would run on unpickling.
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")


def retype(folder: Path, dtype: torch.dtype) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    save_file({k: (v * 100).to(dtype) for k, v in state.items()}, str(path))


CASES = {
    "truncated to half": (lambda f: truncate(f, (f / "model.safetensors").stat().st_size // 2), "model.safetensors"),
    "truncated to 4 bytes": (lambda f: truncate(f, 4), "model.safetensors"),
    "header length 2**62": (lambda f: header_claims(f, 1 << 62), "model.safetensors"),
    "mismatched shapes": (lambda f: edit_json(f / "config.json", intermediate_size=100), "shape"),
    "10**12 parameters": (lambda f: edit_json(f / "config.json", vocab_size=10**12), "parameters"),
    "1e11 parameters in a 0.5 MB file": (lambda f: edit_json(f / "config.json", intermediate_size=10**6,
                                                             num_hidden_layers=500), "parameters"),
    "10**12 positions": (lambda f: edit_json(f / "config.json", max_position_embeddings=10**12), "positions"),
    "rope_theta as text": (lambda f: edit_json(f / "config.json", rope_theta="abc"), "rope_theta"),
    "path traversal in shard index": (lambda f: shard(f, "../../etc/passwd"), "outside"),
    "absolute path in shard index": (lambda f: shard(f, "/etc/passwd"), "outside"),
    "shard index not an object": (lambda f: shard(f, "x") or (f / "model.safetensors.index.json").write_text("[1]"),
                                  "index"),
    ".bin pickle only": (lambda f: pickle_only(f, "pytorch_model.bin"), "pickle"),
    ".pt pickle only": (lambda f: pickle_only(f, "model.pt"), "pickle"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{model_type: qwen2"), "config.json"),
    "config a JSON list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json"),
    "config nested 100k deep": (lambda f: (f / "config.json").write_text("[" * 100_000), "config.json"),
    "int64 weights": (lambda f: retype(f, torch.int64), "stored as I64"),
    "bool weights": (lambda f: retype(f, torch.bool), "stored as BOOL"),
    "tokenizer.json garbage": (lambda f: (f / "tokenizer.json").write_bytes(b"\x00\xffnot json"), "tokenizer.json"),
    "tokenizer.json valid JSON, no tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"a": 1}'),
                                                "tokenizer.json"),
    "tokenizer_config a list": (lambda f: (f / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json"),
}

# One child process for every case: the exit code, the stderr, and whether a pickle payload ran.
PROBE = """
import contextlib, io, json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from pocketr1.cli import main
for folder in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["ask", folder, "Compute 1+2.", "--max-tokens", "4"])
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = "crash", err.write(traceback.format_exc())
    print(json.dumps({"folder": folder, "code": code, "stderr": err.getvalue()}), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile")
    good = random_model(root / "good")
    folders = {}
    for i, (name, (spoil, _)) in enumerate(CASES.items()):
        folder = root / f"case{i:02d}"
        subprocess.run(["cp", "-r", str(good), str(folder)], check=True)
        spoil(folder)
        folders[str(folder)] = name
    done = subprocess.run([sys.executable, "-c", PROBE, str(good), *folders], capture_output=True, text=True,
                          timeout=300, cwd=root)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows and rows[0]["code"] == 0, (rows[:1], done.stderr[-3000:])  # the intact folder answers
    assert not (root / "PWNED").exists(), "a pickle was loaded"
    return {folders[r["folder"]]: r for r in rows[1:]}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_folder_is_refused_in_one_sentence(outcomes, case):
    assert case in outcomes, "the probe process died before this case (an allocation over the cap?)"
    row = outcomes[case]
    assert row["code"] == 1, row
    assert "Traceback" not in row["stderr"], row["stderr"]
    lines = row["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketr1: error: "), row["stderr"]
    assert CASES[case][1] in lines[0], lines[0]


def test_the_console_script_refuses_a_pickle_folder(tmp_path):
    folder = random_model(tmp_path / "model")
    pickle_only(folder, "pytorch_model.bin")
    done = subprocess.run([*CLI, "info", str(folder)], env=cli_env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "pickle" in done.stderr
    assert not (tmp_path / "PWNED").exists()
