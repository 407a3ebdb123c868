"""Logit parity with `transformers`, both ways: what HF writes pocket-r1 loads, and what pocket-r1 writes HF
loads, with equal fp32 logits on a left-padded batch."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pocketr1.model import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from pocketr1.model.transformer import attention_mask, positions_for  # noqa: E402

VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
             bos_token_id=0, eos_token_id=1)
PAD_LEFT = [0, 3, 5]  # rows of the batch: unpadded, 3 pads, 5 pads
LENGTH = 12


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (HF zero-initialises biases, which would hide a missing bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of token ids (pads are token 2) and each row's number of pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(PAD_LEFT), LENGTH), generator=gen)
    pad_left = torch.tensor(PAD_LEFT)
    for row, n in enumerate(PAD_LEFT):
        ids[row, :n] = 2
    return ids, pad_left


def ours_logits(model: Transformer, ids: torch.Tensor, pad_left: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids, positions_for(pad_left, 0, LENGTH), attention_mask(pad_left, LENGTH, LENGTH))
    return logits.float()


def hf_logits(model, ids: torch.Tensor, pad_left: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(LENGTH)[None, :] >= pad_left[:, None]).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_for(pad_left, 0, LENGTH))
    return out.logits.float()


def assert_same_on_real_tokens(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Compare every position that holds a real token (what pads produce is nobody's business)."""
    assert ours.shape == theirs.shape
    for row, n in enumerate(PAD_LEFT):
        torch.testing.assert_close(ours[row, n:], theirs[row, n:], atol=1e-5, rtol=1e-5)


def hf_config(kind: str):
    if kind == "qwen2":
        return transformers.Qwen2Config(**SIZES, tie_word_embeddings=False, rope_theta=5000.0,
                                        attn_implementation="eager")
    return transformers.LlamaConfig(**SIZES, tie_word_embeddings=True, attention_bias=False,
                                    rope_theta=20000.0, attn_implementation="eager")


def hf_model(kind: str, seed: int = 0):
    cls = transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM
    model = cls(hf_config(kind)).float().eval()
    randomize(model, seed)
    if kind == "llama":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_transformers_checkpoint_loads_with_equal_logits(kind, tmp_path):
    reference = hf_model(kind)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)

    assert ours.config.model_type == kind
    assert ours.config.attention_bias == (kind == "qwen2")
    assert ours.config.tie_word_embeddings == (kind == "llama")
    ids, pad_left = batch()
    assert_same_on_real_tokens(ours_logits(ours, ids, pad_left), hf_logits(reference, ids, pad_left))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_pocketr1_checkpoint_loads_in_transformers_with_equal_logits(kind, tmp_path):
    cfg = ModelConfig(model_type=kind, **SIZES, attention_bias=kind == "qwen2",
                      tie_word_embeddings=kind == "llama", rope_theta=5000.0)
    ours = Transformer(cfg).eval()
    randomize(ours, seed=1)
    save_model(ours, tmp_path)

    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == kind
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert type(theirs).__name__ == ("Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM")
    ids, pad_left = batch(seed=1)
    assert_same_on_real_tokens(ours_logits(ours, ids, pad_left), hf_logits(theirs, ids, pad_left))


def test_sharded_checkpoint_loads(tmp_path):
    reference = hf_model("qwen2", seed=2)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "the checkpoint should really be split"
    assert not (tmp_path / "model.safetensors").exists()

    ours = load_model(tmp_path, dtype=torch.float32)
    ids, pad_left = batch(seed=2)
    assert_same_on_real_tokens(ours_logits(ours, ids, pad_left), hf_logits(reference, ids, pad_left))


def test_pad_rows_do_not_change_real_rows():
    """A row's logits are the same alone and inside a left-padded batch."""
    ours = Transformer(ModelConfig(**SIZES)).eval()
    randomize(ours, seed=3)
    ids, pad_left = batch(seed=3)
    together = ours_logits(ours, ids, pad_left)
    for row, n in enumerate(PAD_LEFT):
        alone_ids = ids[row:row + 1, n:]
        length = alone_ids.shape[1]
        with torch.no_grad():
            alone = ours(alone_ids, torch.arange(length)[None], None)
        torch.testing.assert_close(together[row, n:], alone[0], atol=1e-5, rtol=1e-5)


def test_dtype_key_of_newer_transformers_is_read(tmp_path):
    """transformers >= 5 writes `dtype`, older versions `torch_dtype`: either names the weights' precision."""
    from pocketr1.model import ModelConfig

    base = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    assert ModelConfig.from_hf(base | {"dtype": "bfloat16"}).torch_dtype == "bfloat16"
    assert ModelConfig.from_hf(base | {"torch_dtype": "float16", "dtype": "bfloat16"}).torch_dtype == "float16"
