"""LoRA through peft: the adapter pocket-r1 writes is peft's format (the same file names and tensor names
`PeftModel.save_pretrained` writes for the transformers model) and loads there with the same logits; an
adapter made by peft loads here; `merge` gives the adapter-on logits with no adapter left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_sft import examples, make_model_folder, make_tokenizer

from pocketr1.config import SFTConfig
from pocketr1.errors import UserError
from pocketr1.model import load_model
from pocketr1.modify import lora
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train.common import Metrics
from pocketr1.train.sft import sft

CPU = torch.device("cpu")
transformers.logging.set_verbosity_error()


def make_hf_folder(folder: Path, hidden: int = 32) -> Path:
    """A Qwen2 saved by transformers (untied head and qkv biases, as R1-Distill-Qwen has), with our tokenizer."""
    tok = make_tokenizer(folder)
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=tok.token_id(tok.bos_token), eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def trained_lora(folder: Path, tmp: Path, rank: int = 4, checkpoint_every: int = 100, seed: int = 0):
    """Our model from `folder` with a LoRA adapter trained a few steps (so B is no longer zero)."""
    model = load_model(folder, dtype=torch.float32)
    lora.add_lora(model, lora.lora_config(model, rank=rank, alpha=2 * rank, base=str(folder)), seed)
    cfg = SFTConfig(steps=4, rows=2, seq_len=96, lr=2e-2, warmup=1, checkpoint_every=checkpoint_every,
                    log_every=100)
    tmp.mkdir(parents=True, exist_ok=True)
    model = sft(model, ChatTokenizer(folder), examples(), cfg, tmp / "checkpoint", Metrics(tmp / "m.jsonl"), CPU, 0,
                dtype="float32")
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n), "adapter never trained"
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    return model


def ids_of(folder: Path) -> torch.Tensor:
    tok = ChatTokenizer(folder)
    return torch.tensor([tok.chat_ids([{"role": "user", "content": "What is 4 plus 5?"}]) + tok.encode("4 plus 5")])


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], None)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return make_hf_folder(tmp_path_factory.mktemp("qwen2"))


def test_adapter_is_peft_format_and_loads_in_transformers_with_equal_logits(hf_folder, tmp_path):
    model = trained_lora(hf_folder, tmp_path / "train")
    lora.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "CAUSAL_LM", 4)

    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    ids = ids_of(hf_folder)
    with torch.no_grad():
        base = hf(input_ids=ids).logits
    theirs_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # peft itself, saving the adapter it loaded, writes exactly our tensor names and shapes.
    theirs_model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in resaved.items()} == {k: v.shape for k, v in ours.items()}
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    mine = our_logits(model, ids)
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the output: the comparison means something
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_adapter_made_by_peft_loads_here_with_equal_logits(hf_folder, tmp_path):
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = ids_of(hf_folder)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    model = lora.load_adapter(load_model(hf_folder, dtype=torch.float32), tmp_path / "adapter")
    torch.testing.assert_close(our_logits(model, ids), theirs, atol=1e-4, rtol=1e-4)


def test_merge_equals_adapter_on_our_own_model_folder(tmp_path):
    folder = make_model_folder(tmp_path / "run", tie=True)  # what `pocketr1 run` saves (tied embeddings)
    model = trained_lora(folder, tmp_path / "train")
    lora.save_adapter(model, tmp_path / "adapter")
    ids = ids_of(folder)
    with_adapter = our_logits(model, ids)
    assert (with_adapter - our_logits(load_model(folder, dtype=torch.float32), ids)).abs().max() > 1e-3
    result = run_cli("merge", folder, tmp_path / "adapter", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-2000:]
    merged = load_model(tmp_path / "merged")  # a plain model folder: loads with no adapter code at all
    assert not any("lora" in k for k in load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert ChatTokenizer(tmp_path / "merged").vocab_size == ChatTokenizer(folder).vocab_size
    torch.testing.assert_close(our_logits(merged, ids), with_adapter, atol=1e-4, rtol=1e-4)


def test_lora_checkpoint_holds_only_the_adapter_and_resumes_exactly(hf_folder, tmp_path):
    whole = trained_lora(hf_folder, tmp_path / "a", checkpoint_every=2)  # leaves its step-2 checkpoint behind
    stored = load_file(str(tmp_path / "a" / "checkpoint" / "trainable.safetensors"))
    assert stored and all("lora_" in k for k in stored)  # the frozen base is not copied into every checkpoint
    shutil.copytree(tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint")
    # A differently initialised adapter: only the checkpoint's weights (then steps 3-4) can make it match.
    resumed = trained_lora(hf_folder, tmp_path / "b", checkpoint_every=2, seed=1)
    assert lora.adapter_state(resumed).keys() == lora.adapter_state(whole).keys()
    for k, v in lora.adapter_state(whole).items():
        torch.testing.assert_close(lora.adapter_state(resumed)[k], v, rtol=0, atol=1e-6)


def test_adapter_for_another_shape_is_a_user_error(hf_folder, tmp_path):
    model = trained_lora(hf_folder, tmp_path / "train", rank=2)
    lora.save_adapter(model, tmp_path / "adapter")
    other = make_hf_folder(tmp_path / "wider", hidden=48)
    with pytest.raises(UserError, match="does not fit"):
        lora.load_adapter(load_model(other, dtype=torch.float32), tmp_path / "adapter")
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        lora.load_adapter(load_model(other), tmp_path)
    with pytest.raises(UserError, match="no linear layers named"):
        lora.lora_config(model, targets=["qkv"])
