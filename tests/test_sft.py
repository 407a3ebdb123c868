"""SFT on chat examples: which tokens carry loss (assistant turns, thinking included), the epoch order (each
example once per epoch, split over ranks without duplicates), learning, exact resume, and readable errors for
bad JSONL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from pocketr1.cli import build_parser
from pocketr1.config import SFTConfig
from pocketr1.errors import UserError
from pocketr1.finetune import resolve_settings
from pocketr1.model import ModelConfig, build_model, load_model, save_model
from pocketr1.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer
from pocketr1.train import distributed
from pocketr1.train.common import Metrics
from pocketr1.train.pretrain import pack_rows
from pocketr1.train.sft import encode_chat, load_chat_jsonl, schedule, sft

CPU = torch.device("cpu")
TEXTS = [f"What is {a} plus {b}? {a} plus {b} is {a + b}. The answer is {a + b}. Hello, how are you?"
         for a in range(10) for b in range(10)]


def make_tokenizer(folder: Path) -> ChatTokenizer:
    save_tokenizer(train_tokenizer(TEXTS, 320), folder, 128)
    return ChatTokenizer(folder)


def tiny_config(tok: ChatTokenizer, tie: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=tie, bos_token_id=tok.token_id(tok.bos_token), eos_token_id=tok.eos_id)


def make_model_folder(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A pocket-r1 model folder as a run writes one (weights, config, tokenizer with the chat template)."""
    tok = make_tokenizer(folder / "tokenizer")
    model = build_model(tiny_config(tok, tie))
    model.init_weights(seed)
    save_model(model, folder / "model", {f: folder / "tokenizer" / f for f in ("tokenizer.json",
                                                                              "tokenizer_config.json")})
    return folder / "model"


def examples(n: int = 16) -> list[list[dict]]:
    out = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10
        out.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}.",
                     "reasoning_content": f"{a} plus {b} is {a + b}."}])
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatTokenizer:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def loss_text(tok: ChatTokenizer, ids: list[int], mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)


# --- which tokens carry loss -------------------------------------------------------------------------------

def test_only_the_assistant_turn_carries_loss_thinking_and_end_token_included(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 plus 3 is 5."}]
    ids, mask = encode_chat(tok, messages)
    assert len(ids) == len(mask) and ids[-1] == tok.eos_id
    prompt = tok.chat_ids(messages[:2])  # exactly what inference sends, ending in `<｜Assistant｜><think>\n`
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    assert all(mask[len(prompt):])
    assert loss_text(tok, ids, mask) == "2 plus 3 is 5.\n</think>\n\nThe answer is 5.<｜end▁of▁sentence｜>"


def test_inline_thinking_and_reasoning_content_give_the_same_example(tok):
    user = {"role": "user", "content": "What is 2 plus 3?"}
    a = encode_chat(tok, [user, {"role": "assistant", "content": "The answer is 5.",
                                 "reasoning_content": "2 plus 3 is 5."}])
    inline = "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is 5."
    b = encode_chat(tok, [user, {"role": "assistant", "content": inline}])
    assert a == b


def test_every_assistant_turn_of_a_conversation_carries_loss(tok):
    messages = [{"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "<think>\nhi\n</think>\n\nHello"},
                {"role": "user", "content": "What is 1 plus 1?"},
                {"role": "assistant", "content": "2", "reasoning_content": "1 plus 1 is 2."},
                {"role": "user", "content": "a trailing question with nothing to learn"}]
    ids, mask = encode_chat(tok, messages)
    text = loss_text(tok, ids, mask)
    # The earlier turn as history shows it (the template strips its thinking), then the final turn whole.
    assert text == "\n\nHello<｜end▁of▁sentence｜>1 plus 1 is 2.\n</think>\n\n2<｜end▁of▁sentence｜>"
    assert "trailing" not in tok.decode(ids)
    assert not mask[0] and "User" not in text and "Assistant" not in text


def test_packed_weights_follow_the_per_token_mask(tok):
    encoded = [encode_chat(tok, e) for e in examples(3)]
    batch = pack_rows(encoded, [[0, 1], [2]], 96, tok.pad_id, False, CPU)
    (ids0, m0), (ids1, m1), (ids2, m2) = encoded
    n0, n1 = len(ids0) - 1, len(ids1) - 1
    assert batch.weights[0, :n0].tolist() == m0[1:] and batch.weights[0, n0:n0 + n1].tolist() == m1[1:]
    assert batch.weights[1, :len(ids2) - 1].tolist() == m2[1:]
    assert batch.weights[0, n0 + n1:].sum() == 0 and batch.positions[0, n0] == 0
    assert not batch.mask[0, 0, n0, n0 - 1]  # the second example cannot see the first


# --- order: each example once per epoch ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_example_once_per_epoch_across_ranks(world):
    lengths = [5 + (7 * i) % 40 for i in range(37)]
    cfg = SFTConfig(epochs=3, rows=3)
    plan = schedule(lengths, cfg, 64, seed=1)
    for epoch in range(3):
        seen = []
        for e, layout in plan:
            if e == epoch:
                for rank in range(world):
                    part = distributed.shard(len(layout), world, rank)
                    seen += [i for row in layout[part.start:part.stop] for i in row]
        assert sorted(seen) == list(range(len(lengths))), epoch  # none dropped, none twice
    orders = [[i for e, layout in plan if e == k for row in layout for i in row] for k in range(2)]
    assert orders[0] != orders[1]  # reshuffled every epoch
    assert schedule(lengths, cfg, 64, seed=1) == plan  # and the same again (resume, other ranks)
    assert len(schedule(lengths, SFTConfig(steps=50, rows=3), 64, seed=1)) == 50


# --- training -------------------------------------------------------------------------------------------------

def train(folder: Path, tok: ChatTokenizer, ckpt: Path, cfg: SFTConfig, seed: int = 0):
    model = load_model(folder, dtype=torch.float32)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(ckpt.parent / "metrics.jsonl")
    return sft(model, tok, examples(), cfg, ckpt, metrics, CPU, seed, dtype="float32"), metrics


def test_loss_decreases_and_resume_equals_uninterrupted(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    tok = ChatTokenizer(folder)
    cfg = SFTConfig(epochs=8, rows=2, seq_len=96, lr=3e-3, warmup=2, checkpoint_every=4, log_every=1)
    whole, metrics = train(folder, tok, tmp_path / "a" / "checkpoint", cfg)
    losses = [r["loss"] for r in metrics.read("sft")]
    assert losses[-1] < 0.6 * losses[0], losses
    # The uninterrupted run left its last checkpoint behind; a fresh process resuming from it must land on
    # the same weights and log each step once.
    last = (len(losses) - 1) // 4 * 4
    resumed_dir = tmp_path / "b" / "checkpoint"
    resumed_dir.parent.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint", resumed_dir)
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    resumed, metrics_b = train(folder, tok, resumed_dir, cfg)
    assert json.loads((resumed_dir / "progress.json").read_text())["step"] == last
    assert [r["step"] for r in metrics_b.read("sft")] == list(range(1, len(losses) + 1))
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)


def test_resume_on_other_data_is_refused(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    tok = ChatTokenizer(folder)
    cfg = SFTConfig(steps=3, rows=2, seq_len=96, checkpoint_every=2)
    train(folder, tok, tmp_path / "checkpoint", cfg)
    model = load_model(folder, dtype=torch.float32)
    with pytest.raises(UserError, match="other examples"):
        sft(model, tok, examples(5), cfg, tmp_path / "checkpoint", Metrics(tmp_path / "m.jsonl"), CPU, 0)


# --- JSONL ----------------------------------------------------------------------------------------------------

def test_load_chat_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    rows = [{"messages": e} for e in examples(3)]
    path = write_jsonl(tmp_path / "d.jsonl", [rows[0], "", rows[1], rows[2]])
    assert load_chat_jsonl(path) == examples(3)


@pytest.mark.parametrize("bad,line,message", [
    ('{"messages": [', 2, "not valid JSON"),
    ('{"msgs": []}', 2, "'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', 2, "role"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', 2, "no assistant"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', 2, "non-text"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": examples(1)[0]}, bad])
    with pytest.raises(UserError, match=message) as e:
        load_chat_jsonl(path)
    assert f"{path} line {line}" in str(e.value)


def test_empty_jsonl_and_cli_errors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="holds no examples"):
        load_chat_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    folder = make_model_folder(tmp_path / "m")
    data = write_jsonl(tmp_path / "bad.jsonl", ["{nope"])
    result = run_cli("finetune", folder, data, "--out", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{data} line 1 is not valid JSON" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a fine-tune that could not start
    args = build_parser().parse_args(["finetune", str(folder), str(data), "model.hidden_size=8", "--out",
                                      str(tmp_path / "o")])
    with pytest.raises(UserError, match=r"sft\.\* overrides"):
        resolve_settings(args, args.out)


def test_sft_verb_trains_every_weight_and_finetune_defaults_to_lora(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": e} for e in examples(2)])
    methods = {}
    for argv in (["sft"], ["finetune"], ["sft", "--lora"], ["finetune", "--full"]):
        args = build_parser().parse_args([*argv, str(folder), str(data), "--out", str(tmp_path / "o")])
        methods[" ".join(argv)] = resolve_settings(args, args.out)["method"]
    assert methods == {"sft": "full", "finetune": "lora", "sft --lora": "lora", "finetune --full": "full"}
