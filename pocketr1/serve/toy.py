"""Toy model folders for tests, benchmarks and demos of the server, built in a second without training.

- `random_model`: a small random Qwen2 whose every token depends on the whole context (attention and
  positions matter), with logits decisive enough that greedy never meets a near-tie and no stop token, so
  every reply runs to its token limit.
- `scripted_model`: a one-layer model that acts as a bigram table (attention and MLP write nothing): from
  any prompt it replies with `SCRIPT` token by token, then stops, so the thinking/answer split is known.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from pocketr1.model import ModelConfig, Transformer, build_model, save_model
from pocketr1.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer

SCRIPT = "Adding one and two gives three.</think>The answer is 3"
_CORPUS = [SCRIPT, "Compute 1+2. Think step by step, then answer.", "What is the sum of four and five?"]


def _tokenizer(folder: Path, context: int) -> ChatTokenizer:
    tok = train_tokenizer(_CORPUS * 20, vocab_size=320)
    save_tokenizer(tok, folder, model_max_length=context)
    return ChatTokenizer(folder)


def _save(model: Transformer, folder: Path, tok_folder: Path) -> Path:
    names = ("tokenizer.json", "tokenizer_config.json")
    save_model(model, folder, extra_files={name: tok_folder / name for name in names})
    return folder


def _config(tok: ChatTokenizer, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.token_id(tok.bos_token),
                       eos_token_id=tok.eos_id, tie_word_embeddings=False, **kw)


def random_model(folder: str | Path, seed: int = 0, context: int = 512, hidden: int = 64, layers: int = 2,
                 model_type: str = "qwen2") -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp), context)
        cfg = _config(tok, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      model_type=model_type)
        model = build_model(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:  # large weights: the context shapes every logit
                    std = 3 / math.sqrt(hidden) if name == "lm_head.weight" else 0.15
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            model.lm_head.weight[tok.stop_ids] = 0.0  # logit 0, ~6 sd below the best: never drawn in practice
        return _save(model, Path(folder), Path(tmp))


def scripted_model(folder: str | Path, context: int = 256) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp), context)
        chain = tok.encode(SCRIPT)
        assert len(set(chain)) == len(chain), "the script must not repeat a token (it is a bigram chain)"
        vocab = tok.vocab_size
        hidden = -(-vocab // 8) * 8  # one-hot embeddings need a dimension per token; even head_dim (RoPE)
        cfg = _config(tok, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context)
        model = Transformer(cfg)
        nxt = {t: chain[0] for t in range(vocab)} | dict(zip(chain, chain[1:] + [tok.eos_id], strict=True))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            for block in model.model.layers:
                for norm in (block.input_layernorm, block.post_attention_layernorm):
                    norm.weight.fill_(1.0)
            model.model.norm.weight.fill_(1.0)
            model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
            # The final norm scales a one-hot vector to sqrt(hidden): each next token gets logit 30.
            for t, n in nxt.items():
                model.lm_head.weight[n, t] = 30 / math.sqrt(hidden)
        return _save(model, Path(folder), Path(tmp))
