"""int8 quantization (pocketr1/modify/quantize.py): the error bound of one matrix, logits close to the float
model's, a saved folder that loads back identically, scales that are really used, rows that do not depend on
their batch, the CLI, and clean errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from pocketr1.cli import main
from pocketr1.errors import UserError
from pocketr1.model import ModelConfig, Transformer, load_model, save_model
from pocketr1.model.hf import build_model
from pocketr1.modify.quantize import Int8Linear, compare, quantize_weight
from pocketr1.tokenizer import save_tokenizer, train_tokenizer

SHAPE = dict(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def make_folder(folder: Path, tied: bool = False, model_type: str = "qwen2") -> Path:
    """A random float32 model whose logits are peaked (weights well above init scale), so a wrong scale or a
    swapped row shows up in the argmax, with a small BPE tokenizer beside it."""
    cfg = ModelConfig(model_type=model_type, tie_word_embeddings=tied, **SHAPE)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    tok_dir = folder.parent / f"{folder.name}-tok"
    save_tokenizer(train_tokenizer([f"{a} + {b} = {a + b}" for a in range(60) for b in range(30)], 300), tok_dir,
                   256)
    save_model(model, folder, {n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")})
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("q") / "fp")


def sequences(n: int = 3, length: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(5, 300, (length,), generator=gen).tolist() for _ in range(n)]


def test_quantize_weight_error_is_half_a_step():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert torch.equal(q.abs().amax(1), torch.full((64,), 127, dtype=torch.int8))  # each row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", ["fbgemm", "int8pack"])
def test_int8_linear_matches_float_matmul(kernel):
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm on this CPU")
    w, b, x = torch.randn(40, 64), torch.randn(40), torch.randn(5, 64) * 3 + 1
    q, scale = quantize_weight(w)
    y = Int8Linear(q, scale, b, [("proj", 40)], kernel)(x)
    exact = x @ (q.float() * scale[:, None]).T + b  # what the int8 weights mean
    assert (y - exact).norm() / exact.norm() < 0.02
    assert (y - (x @ w.T + b)).norm() / exact.norm() < 0.03


def test_int8_logits_close_save_and_reload(folder, tmp_path):
    fp, q = load_model(folder), load_model(folder, int8=True)
    good = compare(fp, q, sequences())
    assert good.kl < 5e-3 and good.agreement > 0.9, good
    save_model(q, tmp_path / "q8")
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "pocketr1-int8"
    state = load_file(tmp_path / "q8" / "model.safetensors")
    assert state["model.layers.0.self_attn.k_proj.weight"].dtype == torch.int8
    assert state["model.layers.0.self_attn.k_proj.weight_scale"].shape == (SHAPE["num_key_value_heads"] * 24,)
    assert state["lm_head.weight"].dtype == torch.int8  # the untied head is quantized too
    assert state["model.embed_tokens.weight"].dtype == torch.float32  # the embedding is not
    again = load_model(tmp_path / "q8")
    ids = torch.tensor(sequences(1))
    pos = torch.arange(ids.shape[1])[None]
    assert torch.equal(again(ids, pos, None), q(ids, pos, None))


def test_a_wrong_scale_shows_in_the_figures(folder, tmp_path):
    """The scales are read and used: one layer's scales off by 4x must blow the KL up."""
    q = load_model(folder, int8=True)
    save_model(q, tmp_path / "q8")
    path = tmp_path / "q8" / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.mlp.down_proj.weight_scale"] *= 4
    save_file(state, path)
    fp = load_model(folder)
    good, broken = compare(fp, q, sequences()), compare(fp, load_model(tmp_path / "q8"), sequences())
    assert broken.kl > 20 * good.kl and broken.kl > 0.01, (good, broken)
    assert broken.agreement < good.agreement


def test_tied_head_and_llama(tmp_path):
    folder = make_folder(tmp_path / "tied", tied=True, model_type="llama")
    fp, q = load_model(folder), load_model(folder, int8=True)
    assert compare(fp, q, sequences()).agreement > 0.9
    save_model(q, tmp_path / "q8")
    assert "lm_head.weight" not in load_file(tmp_path / "q8" / "model.safetensors")  # rebuilt from the embedding
    ids = torch.tensor(sequences(1))
    pos = torch.arange(ids.shape[1])[None]
    assert torch.equal(load_model(tmp_path / "q8")(ids, pos, None), q(ids, pos, None))


def test_a_row_does_not_depend_on_its_batch(folder):
    q = load_model(folder, int8=True)
    rows = torch.tensor(sequences(3, 12))
    pos = torch.arange(12)[None].expand(3, -1)
    together = q(rows, pos, None)
    alone = q(rows[1:2], pos[:1], None)
    assert torch.equal(together[1:2], alone)


def test_bad_int8_folders_fail_cleanly(folder, tmp_path):
    q8 = tmp_path / "q8"
    save_model(load_model(folder, int8=True), q8)
    path = q8 / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].float()
    save_file(state, path)
    with pytest.raises(UserError, match="int8"):
        load_model(q8)
    state.pop("model.layers.0.mlp.up_proj.weight_scale")
    save_file(state, path)
    with pytest.raises(UserError, match="lacks"):
        load_model(q8)
    config = json.loads((q8 / "config.json").read_text())
    (q8 / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UserError, match="gptq"):
        load_model(q8)


@pytest.mark.slow  # three CLI processes
def test_cli_quantize_then_ask(folder, tmp_path):
    out = tmp_path / "int8"
    done = run_cli("quantize", folder, out, "--prompts", "2", "--tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "greedy-token agreement" in done.stdout
    figure = json.loads((out / "quantization.json").read_text())
    assert figure["kl"] < 5e-3 and figure["agreement"] > 0.8
    assert (out / "tokenizer.json").is_file()
    ask = ("ask", "--raw", "--temperature", "0", "--max-tokens", "6", "--stats")
    saved = run_cli(ask[0], out, "1 + 2 =", *ask[1:])
    on_load = run_cli(ask[0], folder, "1 + 2 =", *ask[1:], "--int8")
    assert saved.returncode == 0 and on_load.returncode == 0, saved.stderr + on_load.stderr
    assert saved.stdout == on_load.stdout  # quantizing is deterministic: saved or on the fly, the same model
    assert "peak RSS" in saved.stderr
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+2?"},
                                             {"role": "assistant", "content": "3"}]}) + "\n")
    tuned = run_cli("finetune", out, data, "--out", tmp_path / "tuned")
    assert tuned.returncode == 1 and "holds int8 weights" in tuned.stderr and "Traceback" not in tuned.stderr


@pytest.mark.parametrize("case,message", [("exists", "already exists"), ("twice", "already quantized"),
                                          ("deepseek", "supports qwen2, llama")])
def test_cli_quantize_refuses_cleanly(folder, tmp_path, capsys, case, message):
    source, out = folder, tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "twice":
        source = tmp_path / "int8"
        save_model(load_model(folder, int8=True), source)
    else:
        cfg = ModelConfig(model_type="deepseek_v3", **SHAPE)
        model = build_model(cfg)
        model.init_weights(0)
        source = tmp_path / "ds"
        save_model(model, source)
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(source), str(out), "--prompts", "0"])
    assert exit_.value.code == 1
    assert message in capsys.readouterr().err
    assert case != "exists" or (out / "notes.txt").read_text() == "mine"
