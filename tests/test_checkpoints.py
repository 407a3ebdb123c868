"""Atomic writes, resumable training checkpoints, and refusing bad model folders before allocating."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pocketr1.errors import UserError
from pocketr1.fsutil import atomic_path, read_json, recover_dir, write_dir, write_json
from pocketr1.model import ModelConfig, Transformer, load_model, save_model
from pocketr1.train.common import load_checkpoint, make_optimizer, new_model, save_checkpoint

SMALL = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)


# --- atomic files and folders -------------------------------------------------------------------------------

def test_write_json_writes_whole_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"done": ["corpus"], "n": 1})
    write_json(path, {"done": ["corpus", "tokenizer"], "n": 2})
    assert read_json(path) == {"done": ["corpus", "tokenizer"], "n": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_failure_inside_atomic_path_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"version": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"version": 2, "half')  # a partial write, then a crash
        raise RuntimeError("crash")
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failure_inside_write_dir_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "model"
    write_dir(folder, lambda tmp: (tmp / "a.txt").write_text("old"))

    def crash(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new, half written")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_dir(folder, crash)
    assert (folder / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_recover_dir_restores_a_swap_interrupted_between_renames(tmp_path):
    folder = tmp_path / "checkpoint"
    old = tmp_path / "checkpoint.old"
    old.mkdir()
    (old / "progress.json").write_text("{}")
    stale = tmp_path / ".checkpoint.abc.tmp"
    stale.mkdir()
    recover_dir(folder)
    assert (folder / "progress.json").is_file()
    assert not old.exists() and not stale.exists()


def test_read_json_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        read_json(tmp_path / "bad.json")


# --- training checkpoints -----------------------------------------------------------------------------------

def train_step(model: Transformer, optimizer: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=gen)
    positions = torch.arange(8).expand(2, 8)
    logits = model(ids[:, :-1], positions[:, :-1], None)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_round_trip(tmp_path, tied):
    factory = lambda m: make_optimizer(m, 1e-2, 0.1)  # noqa: E731
    model = new_model(ModelConfig(**SMALL, tie_word_embeddings=tied), seed=0, device=torch.device("cpu"))
    optimizer = factory(model)
    for step in range(3):
        train_step(model, optimizer, seed=step)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 3, "note": "x"})

    loaded_model, loaded_opt, progress = load_checkpoint(tmp_path / "ckpt", factory, torch.device("cpu"))
    assert progress == {"step": 3, "note": "x"}
    assert loaded_model.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[name], value), name
    if tied:
        assert loaded_model.lm_head.weight is loaded_model.model.embed_tokens.weight
    saved, restored = optimizer.state_dict(), loaded_opt.state_dict()
    # Compared as JSON, which is how they are stored: AdamW's betas tuple comes back as a list.
    assert json.dumps(restored["param_groups"]) == json.dumps(saved["param_groups"])
    assert saved["state"].keys() == restored["state"].keys() and len(saved["state"]) > 0
    for idx, state in saved["state"].items():
        for key, value in state.items():
            got = torch.as_tensor(restored["state"][idx][key])
            assert torch.equal(got, torch.as_tensor(value)), (idx, key)

    # The real test of a resume: one more step from either copy gives the same weights.
    train_step(model, optimizer, seed=99)
    train_step(loaded_model, loaded_opt, seed=99)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded_model.state_dict()[name], value, atol=0, rtol=0)


def test_no_checkpoint_means_none(tmp_path):
    factory = lambda m: make_optimizer(m, 1e-3, 0.0)  # noqa: E731
    assert load_checkpoint(tmp_path / "nothing", factory, torch.device("cpu")) is None


def test_damaged_optimizer_state_is_a_user_error(tmp_path):
    factory = lambda m: make_optimizer(m, 1e-2, 0.0)  # noqa: E731
    model = new_model(ModelConfig(**SMALL), seed=0, device=torch.device("cpu"))
    optimizer = factory(model)
    train_step(model, optimizer, seed=0)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 1})
    (tmp_path / "ckpt" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "ckpt", factory, torch.device("cpu"))


# --- refusing bad model folders -----------------------------------------------------------------------------

@pytest.fixture
def model_folder(tmp_path) -> Path:
    model = Transformer(ModelConfig(**SMALL))
    model.init_weights(0)
    save_model(model, tmp_path / "model")
    assert load_model(tmp_path / "model") is not None  # the intact folder loads
    return tmp_path / "model"


def test_truncated_safetensors_is_a_user_error(model_folder):
    weights = model_folder / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, 100, 4):
        weights.write_bytes(data[:size])
        with pytest.raises(UserError, match="model.safetensors"):
            load_model(model_folder)


def test_pickle_only_folder_is_refused(model_folder):
    (model_folder / "model.safetensors").unlink()
    (model_folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(UserError, match="safetensors"):
        load_model(model_folder)


def test_no_config_or_no_folder_is_a_user_error(model_folder, tmp_path):
    with pytest.raises(UserError):
        load_model(tmp_path / "missing")
    (model_folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        load_model(model_folder)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_shape_mismatch_is_a_user_error(model_folder):
    edit_config(model_folder, intermediate_size=40)
    with pytest.raises(UserError, match="shape"):
        load_model(model_folder)


def test_missing_and_unexpected_tensors_are_user_errors(model_folder, tmp_path):
    edit_config(model_folder, num_hidden_layers=3)  # the file has only 2 layers
    with pytest.raises(UserError, match="lacks"):
        load_model(model_folder)
    edit_config(model_folder, num_hidden_layers=1)  # the file has a layer too many
    with pytest.raises(UserError, match="layers.1"):
        load_model(model_folder)


def test_shard_index_pointing_outside_its_folder_is_refused(model_folder, tmp_path):
    outside = tmp_path / "evil.safetensors"
    save_file({"model.norm.weight": torch.ones(SMALL["hidden_size"])}, str(outside))
    (model_folder / "model.safetensors").rename(model_folder / "model-00001-of-00001.safetensors")
    (model_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00001.safetensors",
        "model.norm.weight": "../evil.safetensors"}}))
    with pytest.raises(UserError, match="outside"):
        load_model(model_folder)


ABSURD = {
    "hidden_size 10**7": dict(hidden_size=10**7),
    "10**6 layers": dict(num_hidden_layers=10**6),
    "vocab 10**12": dict(vocab_size=10**12),
    "wide and deep": dict(intermediate_size=10**9, num_hidden_layers=10**3),
    "no heads": dict(num_attention_heads=0),
    "no kv heads": dict(num_key_value_heads=0),
    "negative width": dict(hidden_size=-16),
    "fewer dims than heads": dict(hidden_size=1, num_attention_heads=2),
    "layers as text": dict(num_hidden_layers="2"),
}

# Loads each absurd folder in a child process with capped address space, so a regression that does try
# to allocate fails there instead of exhausting the machine. Prints one JSON line per case.
PROBE = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from pocketr1.errors import UserError
from pocketr1.model import load_model
for folder in sys.argv[1:]:
    start = time.perf_counter()
    try:
        load_model(folder)
        outcome = "loaded"
    except UserError as e:
        outcome = "UserError: " + str(e)
    except BaseException as e:
        outcome = type(e).__name__ + ": " + str(e)[:300]
    seconds = time.perf_counter() - start
    print(json.dumps({"folder": folder, "outcome": outcome, "seconds": seconds}), flush=True)
"""


@pytest.fixture(scope="module")
def absurd_outcomes(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("absurd")
    model = Transformer(ModelConfig(**SMALL))
    model.init_weights(0)
    folders = {}
    for name, changes in ABSURD.items():
        folder = root / name.replace(" ", "_").replace("*", "")
        save_model(model, folder)
        edit_config(folder, **changes)
        folders[str(folder)] = name
    done = subprocess.run([sys.executable, "-c", PROBE, *folders], capture_output=True, text=True,
                          timeout=120)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {folders[row["folder"]]: row for row in rows}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_config_is_refused_before_allocating(absurd_outcomes, case):
    assert case in absurd_outcomes, "the probe process died before this case"
    row = absurd_outcomes[case]
    assert row["outcome"].startswith("UserError"), row["outcome"]
    assert row["seconds"] < 2.0


def test_written_files_and_folders_are_not_private(tmp_path):
    import stat

    from pocketr1.fsutil import _UMASK, write_dir, write_text

    write_text(tmp_path / "a.txt", "x")
    write_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_text("y"))
    # as open()/mkdir() would make them under the process umask, not mkstemp's private 0600/0700
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~_UMASK
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~_UMASK
