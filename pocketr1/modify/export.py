"""Export a model folder for other runtimes: GGUF for llama.cpp (with an Ollama `Modelfile` beside it), or a
clean Hugging Face folder for transformers and vLLM.

GGUF layout follows llama.cpp's `qwen2` and `llama` architectures. Both keep HF's tensors (transposed only by
ggml's reversed shape order), with one difference: llama.cpp's `llama` rotates interleaved pairs, HF's Llama
rotates halves, so the q/k rows of each head are re-ordered (half i, half d/2+i -> pair i); `qwen2` rotates
halves in llama.cpp too (NEOX style) and its weights go in unchanged.

The tokenizer goes in as llama.cpp's byte-level BPE ("gpt2"): every token, its type, the merges, and a
`tokenizer.ggml.pre` name whose pre-tokenizer regexes split text exactly as the HF tokenizer does (see
`PRE_TOKENIZERS`); a pre-tokenizer llama.cpp has no match for is refused rather than exported to tokenize
differently. BOS is not added by llama.cpp (`add_bos_token` false): R1's chat template writes it, as
pocket-r1's own tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pocketr1.errors import UserError
from pocketr1.fsutil import atomic_path, read_json, write_text
from pocketr1.model.hf import load_model, read_config, save_model
from pocketr1.tokenizer import ASSISTANT, CHAT_TEMPLATE, USER, ChatTokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCHS = {"qwen2": "qwen2", "llama": "llama"}  # HF model_type -> llama.cpp architecture
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

# HF pre-tokenizer regexes (as tokenizer.json stores them) of the llama.cpp `pre` types that split the same way.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _byte_level(p: dict, use_regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == use_regex


def _split(p: dict, regex: str) -> bool:
    return p.get("type") == "Split" and p.get("pattern", {}).get("Regex") == regex and \
        p.get("behavior") == "Isolated" and not p.get("invert")


def pre_tokenizer_name(pre: dict | None) -> str:
    """The llama.cpp `tokenizer.ggml.pre` value that pre-tokenizes as this HF pre-tokenizer does.

    pocket-r1's own (every digit on its own, then GPT-2's byte-level regex) is llama.cpp's `command-r`: a
    `\\p{N}` split, then GPT-2's regex, and no clean-up of spaces when decoding (as our tokenizer_config says).
    """
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    if len(parts) == 1 and _byte_level(parts[0], use_regex=True):
        return "gpt-2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and _byte_level(parts[1], use_regex=True):
        return "command-r"
    if len(parts) == 2 and _byte_level(parts[1], use_regex=False):
        for regex, name in ((QWEN2_REGEX, "qwen2"), (LLAMA3_REGEX, "llama-bpe")):
            if _split(parts[0], regex):
                return name
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp equivalent; "
                    "exporting it would make llama.cpp split text differently.")


def gguf_vocab(folder: Path, vocab_size: int) -> dict:
    """Tokens (byte-level strings, padded to the model's embedding rows), their llama.cpp types and the merges."""
    import gguf

    data = read_json(folder / "tokenizer.json")
    model = data.get("model", {})
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer; only those export to GGUF.")
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC: Qwen2's; llama.cpp skips it, as its own converter does
        raise UserError(f"the tokenizer's normalizer '{normalizer}' has no llama.cpp equivalent.")
    ids = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    ids.update({t["content"]: i for i, t in added.items()})
    if max(ids.values(), default=-1) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(ids.values())}, beyond the model's {vocab_size} "
                        "embedding rows.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # unused rows, as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in ids.items():
        tokens[i] = text
        special = added.get(i, {}).get("special")
        types[i] = gguf.TokenType.NORMAL if i not in added else \
            gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(data.get("pre_tokenizer"))}


def gguf_name(hf: str) -> str:
    """llama.cpp's name for an HF tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<proj>.<weight|bias>
    rest = ".".join(parts[3:])
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for proj in "qkv":
        for kind in ("weight", "bias"):
            per_layer[f"self_attn.{proj}_proj.{kind}"] = f"attn_{proj}.{kind}"
    if parts[:2] != ["model", "layers"] or rest not in per_layer:
        raise UserError(f"the model has a tensor '{hf}' with no place in llama.cpp's layout.")
    return f"blk.{parts[2]}.{per_layer[rest]}"


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named float tensors: an int8 folder's matrices (`pocketr1 quantize`) times their scales."""
    state = model.state_dict()
    out = {}
    for name, tensor in state.items():
        scale = state.get(name + "_scale")
        if name.endswith("_scale"):
            continue
        out[name] = tensor if scale is None else tensor.float() * scale.float()[:, None]
    return out


def rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from HF's rotate-half order to llama.cpp's interleaved pairs (weights or biases)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _ggml_type(shape: tuple[int, ...], kind: str):
    """The ggml type a tensor is stored in: 1-D tensors stay float32 (llama.cpp wants norms and biases so)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or kind == "f32":
        return Q.F32
    if kind == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16  # f16, or q8_0 rows that are not a whole number of 32-value blocks (as llama.cpp's converter)


def _encode(w: torch.Tensor, qtype) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = w.detach().float().cpu().numpy()
    return {Q.F32: lambda: a, Q.F16: lambda: a.astype(np.float16),
            Q.Q8_0: lambda: gguf.quants.quantize(a, Q.Q8_0)}[qtype]()


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1])) * shape[-1] // block * size


def export_gguf(src: str | Path, out: str | Path, kind: str = "f16") -> Path:
    """Write `out` (.gguf) from the model folder `src`, and an Ollama `Modelfile` beside it. Returns `out`."""
    import gguf

    src, out = Path(src), Path(out)
    if kind not in GGUF_TYPES:
        raise UserError(f"GGUF type '{kind}' is not supported (choose {', '.join(GGUF_TYPES)}).")
    if out.suffix != ".gguf":
        raise UserError(f"the GGUF output {out} should end in .gguf.")
    cfg = read_config(src)
    if cfg.model_type not in ARCHS:
        raise UserError(f"GGUF export supports {', '.join(ARCHS)} models, not {cfg.model_type} "
                        "(llama.cpp's deepseek2 layout is not written yet).")
    tok = ChatTokenizer(src)
    vocab = gguf_vocab(src, cfg.vocab_size)
    model = load_model(src)
    arch = ARCHS[cfg.model_type]

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(src.resolve().name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        if kind == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, cfg)
        _add_tokenizer(w, vocab, tok, src)
        state = float_state(model)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # llama.cpp reads the embeddings as the head when `output` is absent
        names = {name: gguf_name(name) for name in state}
        # The header first (sizes are known from shapes), then one tensor at a time, converted as it is written:
        # the whole model never sits in memory twice.
        for name, target in names.items():
            shape = tuple(state[name].shape)
            qtype = _ggml_type(shape, kind)
            w.add_tensor_info(target, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rope_heads = {".attn_q.": cfg.num_attention_heads, ".attn_k.": cfg.num_key_value_heads}
        for name, target in tqdm(names.items(), desc=f"GGUF {kind}", unit="tensor", leave=False):
            tensor = state[name]
            heads = next((n for key, n in rope_heads.items() if key in target), None)
            if arch == "llama" and heads:
                tensor = rope_pairs(tensor, heads)
            w.write_tensor_data(_encode(tensor, _ggml_type(tuple(tensor.shape), kind)))
        w.close()
    write_text(out.with_name("Modelfile"), modelfile(out.name, tok))
    return out


def _add_hparams(w, cfg) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:  # llama.cpp's default is hidden / heads
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def _add_tokenizer(w, vocab: dict, tok: ChatTokenizer, folder: Path) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for add, token in ((w.add_bos_token_id, tok.bos_token), (w.add_eos_token_id, tok.eos_token),
                       (w.add_pad_token_id, tok.pad_token)):
        if token and tok.token_id(token) is not None:
            add(tok.token_id(token))
    w.add_add_bos_token(False)  # the chat template writes BOS itself
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template(folder))


def chat_template(folder: Path) -> str | list:
    """The folder's chat template as tokenizer_config.json stores it (R1's when it has none, as ChatTokenizer)."""
    path = folder / "tokenizer_config.json"
    return (read_json(path) if path.is_file() else {}).get("chat_template") or CHAT_TEMPLATE


def modelfile(gguf_file: str, tok: ChatTokenizer) -> str:
    """An Ollama Modelfile: R1's chat template in Go-template syntax, R1's stop tokens and sampling defaults.

    It renders what `tokenizer.CHAT_TEMPLATE` does: BOS, the system text, `<｜User｜>` turns, `<｜Assistant｜>`
    turns closed by the end token, then `<｜Assistant｜><think>` and a newline. (Ollama hands assistant turns
    over without their thinking already, so there is no `</think>` to cut.)
    """
    bos, eos = tok.bos_token, tok.eos_token
    template = (
        bos + '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}'
        '{{ range .Messages }}{{ if eq .Role "user" }}' + USER + '{{ .Content }}'
        '{{ else if eq .Role "assistant" }}' + ASSISTANT + '{{ .Content }}' + eos + '{{ end }}{{ end }}'
        + ASSISTANT + "<think>\n")
    stops = [t for t in dict.fromkeys((bos, eos, USER, ASSISTANT)) if t and tok.token_id(t) is not None]
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    lines += ["PARAMETER temperature 0.6", "PARAMETER top_p 0.95"]
    return "\n".join(lines) + "\n"


def export_hf(src: str | Path, out: str | Path) -> Path:
    """A clean HF folder (config, safetensors, tokenizer and generation config) that transformers/vLLM load."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise UserError(f"the output folder {out} is the model folder itself; choose another.")
    if "quantization_config" in read_json(src / "config.json"):
        raise UserError(f"{src} holds pocket-r1's own int8 format, which transformers does not read; export the "
                        "float model it was quantized from (or export this one to GGUF).")
    model = load_model(src)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json to export with the weights.")
    save_model(model, out, {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()})
    return out


def export_command(args) -> None:
    """`pocketr1 export MODEL --gguf OUT.gguf [--type f16]` or `pocketr1 export MODEL --hf OUTDIR`."""
    from pocketr1.chat import resolve_model_dir

    src = resolve_model_dir(args.path)
    if args.gguf:
        out = export_gguf(src, args.gguf, args.type)
        print(f"wrote {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB) and {out.with_name('Modelfile')}")
        print(f"  llama.cpp: llama-cli -m {out}    Ollama: cd {out.parent} && ollama create NAME -f Modelfile")
    else:
        print(f"wrote {export_hf(src, args.hf)} (a Hugging Face folder: transformers, vLLM)")
