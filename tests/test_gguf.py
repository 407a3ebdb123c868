"""GGUF export against llama.cpp itself (llama-cpp-python): the exported file tokenizes as pocket-r1 does and
continues a prompt greedily with the same tokens, for Qwen2 (NEOX rope, untied head, padded vocabulary) and
Llama (interleaved rope: q/k rows re-ordered on export, tied head); plus the Modelfile, the HF export and
clear errors.

Each side runs the weights that are in the file: f32 as trained, f16 and q8_0 against pocket-r1 on the same
weights rounded through float16 / quantised and dequantised to Q8_0 by the `gguf` package (what llama.cpp
reads). What is left is llama.cpp's own arithmetic (f16 / 8-bit activations in its f16 / q8_0 dot products;
its KV cache is set to float32), so logits agree to a measured tolerance, and greedy tokens agree wherever the
top two logits are further apart than rounding can move them: for f32, at every step.
"""

from __future__ import annotations

import json

import gguf
import llama_cpp  # not importorskip: CI installs llama-cpp-python and this test must not pass silently
import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf import GGMLQuantizationType as Q
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pocketr1.engine import SamplingParams, generate
from pocketr1.errors import UserError
from pocketr1.model import ModelConfig, Transformer, load_model, save_model
from pocketr1.modify.export import QWEN2_REGEX, export_gguf, export_hf, gguf_name, pre_tokenizer_name
from pocketr1.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    SPECIAL_TOKENS,
    TEXT_TOKENS,
    USER,
    ChatTokenizer,
    save_tokenizer,
    train_tokenizer,
)

NEW = 16
LOGIT_TOL = {"f32": 1e-4, "f16": 0.02, "q8_0": 0.3}  # llama.cpp rounds activations to f16 / 8 bits
QUESTION = "What is 12 + 345?  Think  twice, don't guess."
# Digits (one per token in ours), runs of spaces, tabs and newlines, contractions, non-ASCII numerals and
# letters, and R1's special and text tokens inside text.
TEXTS = [QUESTION, "a  b\nc \t d  \n\n", "1234567 + 0.5 = x", "I'll say 2² ٣ héllo… <think>ok</think>",
         f"{USER}hi{ASSISTANT}<think>\n", "   leading and trailing   ", "x=(a+b)*[c-d];!?"]


def qwen2_style_tokenizer(texts: list[str]) -> Tokenizer:
    """A tokenizer pre-tokenized as Qwen2's (and R1-Distill-Qwen's): NFC, its split regex, byte-level."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    return tok


def make_folder(folder, tok: Tokenizer, arch: str) -> None:
    """A random model saved with `tok`: the qwen2 head untied and 11 embedding rows beyond the tokenizer's."""
    save_tokenizer(tok, folder.with_name(folder.name + "-tok"), 128)
    cfg = ModelConfig(model_type=arch, vocab_size=tok.get_vocab_size() + 11, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=arch == "llama", attention_bias=True,
                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    tok_dir = folder.with_name(folder.name + "-tok")
    save_model(model, folder, {f: tok_dir / f for f in ("tokenizer.json", "tokenizer_config.json")})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """qwen2 and llama folders with pocket-r1's tokenizer; a qwen2 folder with a Qwen2-style tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    texts = [f"Question {i}: what is {i * 7} + {i % 13}? Let's think.\nThe answer is {i * 7 + i % 13}.  Done."
             for i in range(300)]
    ours = train_tokenizer(texts, 400)
    for arch in ("qwen2", "llama"):
        make_folder(root / arch, ours, arch)
    make_folder(root / "qwen2-regex", qwen2_style_tokenizer(texts), "qwen2")
    return {name: root / name for name in ("qwen2", "llama", "qwen2-regex")}


def open_llama(path) -> llama_cpp.Llama:
    # A float32 KV cache (llama.cpp's default is f16): f32 weights then run in float32 end to end, as ours do.
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, n_batch=128, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_greedy(llm: llama_cpp.Llama, prompt: list[int], new: int) -> list[int]:
    """llama.cpp's own greedy continuation of token ids."""
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(new):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if len(tokens) < new:
            llm.eval([tokens[-1]])
    return tokens


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:llm.n_tokens])


def as_stored(folder, kind: str) -> Transformer:
    """Our model on the weights the GGUF file holds: matrices rounded as `kind` stores them."""
    model = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and kind == "f16":
                p.copy_(p.half().float())
            elif p.ndim == 2 and kind == "q8_0":
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), Q.Q8_0), Q.Q8_0)))
    return model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_llama_cpp_continues_like_pocketr1(folders, tmp_path, arch, kind):
    """Greedy tokens agree up to the first step where our top two logits are closer than twice the logit
    tolerance (there rounding may pick either, and the two continuations part); f32 must agree throughout."""
    path = export_gguf(folders[arch], tmp_path / f"{arch}.gguf", kind)
    prompt = ChatTokenizer(folders[arch]).prompt_ids(QUESTION)
    model = as_stored(folders[arch], kind)
    ours = generate(model, [prompt], SamplingParams(temperature=0.0, max_new_tokens=NEW), stop_ids=[],
                    dtype=torch.float32)[0].ids
    ids = prompt + ours[:-1]
    with torch.no_grad():
        our_logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0].numpy()
    llm = open_llama(path)
    try:
        theirs = llama_greedy(llm, prompt, NEW)
        their_logits = llama_logits(llm, ids)  # on the same tokens as ours, whatever each side chose
    finally:
        llm.close()
    assert their_logits.shape == our_logits.shape
    assert np.abs(their_logits - our_logits).max() < LOGIT_TOL[kind]
    top2 = np.sort(our_logits[len(prompt) - 1:], axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= 2 * LOGIT_TOL[kind]
    agree = NEW if decisive.all() else int(np.argmin(decisive))
    assert theirs[:agree] == ours[:agree]
    # Same tokens in, same argmax out wherever the choice is decisive, and at nearly every position (prompt
    # included) even for q8_0, whose 8-bit activations leave few choices decisive by the bound above.
    assert (their_logits[len(prompt) - 1:].argmax(-1) == ours)[decisive].all()
    assert (their_logits.argmax(-1) == our_logits.argmax(-1)).mean() >= 0.9
    if kind == "f32":
        assert agree == NEW and theirs == ours


@pytest.mark.parametrize(("name", "pre"), [("qwen2", "command-r"), ("qwen2-regex", "qwen2")])
def test_llama_cpp_tokenizes_like_pocketr1(folders, tmp_path, name, pre):
    tok = ChatTokenizer(folders[name])
    path = export_gguf(folders[name], tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    llm = open_llama(path)
    try:
        texts = TEXTS + [tok.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": t},
                                     {"role": "assistant", "content": "<think>hm</think>42"}]) for t in TEXTS]
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
        ids = tok.encode(TEXTS[3])
        assert llm.detokenize(ids).decode() == tok.decode(ids)
        # llama-cpp-python's chat completions render the file's template as we do (what it then tokenizes).
        assert llm.chat_format == "chat_template.default"
        messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>hm</think>4"},
                    {"role": "user", "content": "3+3?"}]
        bos, eos = (llm.detokenize([t], special=True).decode() for t in (llm.token_bos(), llm.token_eos()))
        assert (bos, eos) == (tok.bos_token, tok.eos_token)
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                        add_generation_prompt=True)
        assert formatter(messages=messages).prompt == tok.render(messages)
    finally:
        llm.close()


def test_gguf_metadata_and_modelfile(folders, tmp_path):
    path = export_gguf(folders["qwen2"], tmp_path / "r1.gguf", "q8_0")
    fields = gguf.GGUFReader(path).fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert value("general.architecture") == "qwen2"
    assert value("tokenizer.ggml.pre") == "command-r"
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.chat_template") == json.loads((folders["qwen2"] / "tokenizer_config.json").read_text())[
        "chat_template"]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["blk.0.attn_q.bias"] == Q.F32
    assert "output.weight" in types  # the qwen2 model's head is untied
    lines = (tmp_path / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "FROM ./r1.gguf"
    assert {f'PARAMETER stop "{t}"' for t in (BOS, EOS, USER, ASSISTANT)} <= set(lines)
    assert {"PARAMETER temperature 0.6", "PARAMETER top_p 0.95"} <= set(lines)
    template = (tmp_path / "Modelfile").read_text(encoding="utf-8").split('"""')[1]
    assert template.startswith(BOS) and template.endswith(f"{ASSISTANT}<think>\n")
    assert f"{USER}{{{{ .Content }}}}" in template and f"{ASSISTANT}{{{{ .Content }}}}{EOS}" in template


@pytest.mark.slow  # ~10 s: a CLI process and transformers
def test_hf_export_loads_in_transformers(folders, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = run_cli("export", folders["llama"], "--hf", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_model(folders["llama"], dtype=torch.float32)
    ids = torch.tensor([ChatTokenizer(tmp_path / "hf").prompt_ids(QUESTION)])
    with torch.no_grad():
        expected = ours(ids, torch.arange(ids.shape[1])[None], None)
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_export_errors(folders, tmp_path):
    result = run_cli("export", tmp_path / "missing", "--gguf", tmp_path / "x.gguf")
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match=r"\.gguf"):
        export_gguf(folders["qwen2"], tmp_path / "model.bin")
    with pytest.raises(UserError, match="model folder itself"):
        export_hf(folders["qwen2"], folders["qwen2"])
    with pytest.raises(UserError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"type": "Whitespace"})
    with pytest.raises(UserError, match="no place in llama.cpp"):  # never silently dropped
        gguf_name("model.layers.0.mlp.experts.0.up_proj.weight")
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "config.json").write_text(json.dumps({"quantization_config": {"bits": 8}}))
    with pytest.raises(UserError, match="int8"):
        export_hf(tmp_path / "int8", tmp_path / "hf")
    deepseek = ModelConfig(model_type="deepseek_v3", vocab_size=16, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "config.json").write_text(json.dumps(deepseek.to_hf()))
    with pytest.raises(UserError, match="deepseek_v3"):
        export_gguf(tmp_path / "ds", tmp_path / "ds.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "Modelfile").exists()  # nothing half-written
