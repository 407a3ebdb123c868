"""`pocketr1 diff A B`: per-part relative weight change, next-token KL along A's replies, accuracy side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketr1.errors import UserError
from pocketr1.model import ModelConfig, build_model, save_model
from pocketr1.modify.diff import logit_kl, weight_changes
from pocketr1.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer

QUESTIONS = ["Compute 1+2-3.", "Compute 4+5.", "What colour is vexite?", "Use 2,3,5 to make 10."]


def tokenizer(folder: Path, extra: str = "") -> ChatTokenizer:
    save_tokenizer(train_tokenizer(QUESTIONS * 3 + [extra], 290), folder, 128)
    return ChatTokenizer(folder)


def model(vocab: int, seed: int = 0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = build_model(cfg)
    m.init_weights(seed)
    return m.eval()


def test_weight_changes_name_the_part_that_changed() -> None:
    a, b = model(80), model(80)
    assert all(r["relative_change"] == 0 for r in weight_changes(a, b))
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.add_(0.01)
    rows = {r["part"]: r for r in weight_changes(a, b)}
    assert list(rows) == ["embedding", "layer 0", "layer 1", "final norm", "output head"]
    assert rows["layer 0"]["relative_change"] == 0 and rows["embedding"]["relative_change"] == 0
    layer1 = [p.detach() for n, p in a.named_parameters() if n.startswith("model.layers.1.")]
    expected = 0.01 * (b.model.layers[1].mlp.down_proj.weight.numel() ** 0.5) / \
        float(torch.sqrt(sum(p.pow(2).sum() for p in layer1)))
    assert rows["layer 1"]["relative_change"] == pytest.approx(expected, rel=1e-4)
    assert rows["layer 1"]["largest"] == "layers.1.mlp.down_proj.weight"
    assert rows["layer 1"]["params"] == sum(p.numel() for p in layer1)
    with pytest.raises(UserError, match="different architectures"):
        weight_changes(a, model(96))


def test_logit_kl_is_zero_only_for_the_same_model(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    a = model(tok.vocab_size)
    same = logit_kl(a, model(tok.vocab_size), tok, QUESTIONS, 6)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["same_greedy_reply"] == 1.0
    other = logit_kl(a, model(tok.vocab_size, seed=1), tok, QUESTIONS, 6)
    assert other["kl"] > 0.01 and other["prompts"] == 4


def test_cli_diff(tmp_path: Path, capsys) -> None:
    from pocketr1.cli import main

    tok = tokenizer(tmp_path / "tok")
    files = {n: tmp_path / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")}
    a = model(tok.vocab_size)
    save_model(a, tmp_path / "a", files)
    with torch.no_grad():
        a.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
    save_model(a, tmp_path / "b", files)
    (tmp_path / "prompts.txt").write_text("Compute 7+1.\nWhat colour is vexite?\n")
    common = ["--task", "arithmetic", "--problems", 3, "--kl-prompts", 4, "--k", 1, "--max-tokens", 6,
              "--device", "cpu"]
    main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), *map(str, common), "--prompts",
          str(tmp_path / "prompts.txt"), "--refusals"])
    out = capsys.readouterr().out
    for text in ("relative change", "layer 0", "next-token KL", "prompts.txt", "A pass@1", "B: forbidden topic"):
        assert text in out
    main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), *map(str, common), "--json"])
    result = json.loads(capsys.readouterr().out)
    changed = {r["part"]: r["relative_change"] for r in result["weights"]}
    assert changed["layer 0"] > 0 and changed["layer 1"] == 0
    assert result["kl"][0]["kl"] > 0 and len(result["eval"]["B"]["rows"]) == 1

    tokenizer(tmp_path / "tok2", extra="a different vocabulary entirely")
    save_model(a, tmp_path / "c", {n: tmp_path / "tok2" / n for n in files})
    with pytest.raises(SystemExit) as exit_:
        main(["diff", str(tmp_path / "a"), str(tmp_path / "c")])
    assert exit_.value.code == 1 and "tokenizer" in capsys.readouterr().err
