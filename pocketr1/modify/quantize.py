"""int8 weight quantization: symmetric, one scale per output channel, for every projection of the decoder
layers and for an untied `lm_head`.

Stored as `<linear>.weight` (int8, [out, in]) + `<linear>.weight_scale` (float32, [out]) in an ordinary model
folder whose `config.json` carries a `quantization_config`; `load_model` reads such folders back, and
`load_model(..., int8=True)` quantizes a float checkpoint while it loads, one matrix at a time.

Embeddings stay in the checkpoint's dtype: a lookup reads one row per token, so int8 would not speed decoding,
and the table stays memory-mapped, so rows no prompt uses never become resident.

The matmul: at batch 1 decoding is memory bound, so what matters is reading each int8 weight once, fast. On
x86 that is fbgemm's packed int8 GEMM (`quantized.linear_dynamic`, VNNI): about 3x a bf16 matrix-vector
product here, where `aten._weight_int8pack_mm` (weight-only) is no faster than bf16. fbgemm also rounds the
activations to 8 bits, as llama.cpp's Q8_0 does (the quality figure includes that rounding). Each activation
row is first mapped affinely onto exactly [-1, 1], so its 8-bit grid spans its own range whatever other rows
share the batch: a row's result never depends on its batch-mates, and a long prompt's outlier token does not
coarsen the others. Where fbgemm is missing, `_weight_int8pack_mm` runs instead.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pocketr1.errors import UserError

METHOD = "pocketr1-int8"
CONFIG = {"quant_method": METHOD, "bits": 8, "symmetric": True, "granularity": "per_channel",
          "scale_suffix": "_scale", "modules": "decoder projections and an untied lm_head"}
# HF names of a block's projections, grouped as generation fuses them (one matmul per group).
GROUPS = {"self_attn": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",)},
          "mlp": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}}
SUPPORTED = ("qwen2", "llama")
TINY = torch.finfo(torch.float32).tiny


def quantize_weight(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and their float32 scales: row r is approximately `q[r] * scale[r]`. Works `rows` at a time,
    so the float temporaries stay small even for a 151936-row head."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows].detach().float()
        s = scale[start:start + rows] = (w.abs().amax(dim=1) / 127).clamp_min(TINY)
        q[start:start + rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
    return q, scale


def _fbgemm_ready() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def _vnni() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))


class Int8Linear(nn.Module):
    """A frozen linear layer over int8 weights with per-output-channel scales (see the module docstring).

    `parts` names the HF projections stacked in it, with their row counts, so `state_dict` writes them back
    under their own names; an empty `parts` writes nothing (a tied head, which the embedding rebuilds)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 parts: list[tuple[str, int]], kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.parts = parts
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.kernel = ("fbgemm" if _fbgemm_ready() else "int8pack") if kernel == "auto" else kernel
        if self.kernel == "fbgemm":
            self.reduce_range = not _vnni()  # without VNNI, 8-bit activations could saturate int16 sums
            # The affine map of each row to [-1, 1] adds offset * (row sums of the weight): precompute them.
            self.register_buffer("row_sums", q.sum(dim=1, dtype=torch.int32).float() * self.scale)
            engine = torch.backends.quantized.engine  # (the packing engine is global state: borrow it)
            with warnings.catch_warnings():  # quantized tensors are deprecated but are fbgemm's only door
                warnings.simplefilter("ignore")
                zeros = torch.zeros(len(scale), dtype=torch.long)
                qweight = torch._make_per_channel_quantized_tensor(q.contiguous(), self.scale.double(), zeros, 0)
                try:
                    torch.backends.quantized.engine = "fbgemm"
                    self.packed = torch.ops.quantized.linear_prepack(qweight, None)
                finally:
                    torch.backends.quantized.engine = engine
            self.qweight = None
        else:  # (a copy: the loader releases the pages of the tensor it passed in)
            self.qweight = q.clone(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm":
            y = self._fbgemm(rows.float())
        else:
            compute = rows.dtype if rows.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch.ops.aten._weight_int8pack_mm(rows.to(compute), self.qweight, self.scale.to(compute))
            if self.bias is not None:
                y = y + self.bias.to(compute)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # Map every row onto exactly [-1, 1] (both ends pinned by the clamp: the slope is a hair steep), so
        # fbgemm's per-tensor 8-bit grid is the same in any batch; multiply; undo the map:
        # x = lo + (unit + 1) * step  =>  W x = step * W unit + (lo + step) * W 1.
        # One code path for any batch size, so a row's result is bit-identical alone or in a batch.
        if x.shape[0] == 1:  # (min and max are exact however they are reduced: one reduction when decoding)
            lo, hi = (v.view(1, 1) for v in torch.aminmax(x))
        else:
            lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        slope = (hi - lo).clamp_min_(TINY).reciprocal_().mul_(2 * (1 + 2**-20))
        unit = (x - lo).mul_(slope).sub_(1).clamp_(-1, 1)
        step = slope.reciprocal_()
        y = torch.ops.quantized.linear_dynamic(unit, self.packed, self.reduce_range)
        y = y.mul_(step).addcmul_(lo.add_(step), self.row_sums)
        return y if self.bias is None else y.add_(self.bias)

    def int8_weight(self) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # `prefix` ends in this module's own name (e.g. "...self_attn.qkv_proj."); its parts live beside it.
        if not self.parts:
            return
        parent = prefix[:prefix.rstrip(".").rfind(".") + 1]
        q, start = self.int8_weight(), 0
        for name, rows in self.parts:
            part = slice(start, start + rows)
            destination[f"{parent}{name}.weight"] = q[part]
            destination[f"{parent}{name}.weight_scale"] = self.scale[part]
            if self.bias is not None:
                destination[f"{parent}{name}.bias"] = self.bias[part]
            start += rows

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def drop_pages(tensor: torch.Tensor) -> None:
    """Tell Linux we are done with a memory-mapped tensor's pages, so they stop counting as resident.

    safetensors maps a whole file once and every tensor read from it shares that mapping, which lives until
    the last of them dies: without this, each matrix read while quantizing would stay resident beside its
    int8 copy. Only whole pages inside the tensor are dropped, so neighbours are untouched; call it only on
    clean (never written) mapped tensors, since dropping a private page discards writes to it."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.numel():
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc). Quantizing leaves holes between the packed
    matrices where each one's float temporaries were; without this they pile up as resident memory."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def scale_names(model: nn.Module) -> dict[str, torch.Size]:
    """The `weight_scale` tensors a stored int8 folder holds for `model` (a meta-device model), with shapes."""
    shapes = {}
    for i, block in enumerate(model.model.layers):
        for owner, groups in GROUPS.items():
            for names in groups.values():
                for name in names:
                    rows = getattr(getattr(block, owner), name).weight.shape[0]
                    shapes[f"model.layers.{i}.{owner}.{name}.weight_scale"] = torch.Size([rows])
    if not model.config.tie_word_embeddings:
        shapes["lm_head.weight_scale"] = torch.Size([model.config.vocab_size])
    return shapes


def install_int8(model: nn.Module, state: dict[str, torch.Tensor], stored: bool, kernel: str = "auto") -> None:
    """Replace `model`'s (meta-device) projections by `Int8Linear`s built from `state`, consuming their
    entries: int8 weights + scales when `stored`, else float weights quantized here, one matrix at a time."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UserError(f"int8 quantization supports {', '.join(SUPPORTED)} models, not {cfg.model_type}.")

    def take(prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        weight, bias = state.pop(prefix + "weight"), state.pop(prefix + "bias", None)
        if stored:
            if weight.dtype != torch.int8:
                raise UserError(f"'{prefix}weight' is {weight.dtype}, but an int8 folder stores int8 weights.")
            scale = state.pop(prefix + "weight_scale").float()
            if not torch.isfinite(scale).all() or (scale <= 0).any():
                raise UserError(f"'{prefix}weight_scale' holds scales that are not positive finite numbers.")
            return weight, scale, bias
        q, scale = quantize_weight(weight)
        drop_pages(weight)  # (read straight from the file: nothing was written to it)
        return q, scale, bias

    # The head first: the biggest matrix's temporaries then come and go before the rest is resident.
    if cfg.tie_word_embeddings:  # the head is the embedding table: quantize it here, store nothing extra
        q, scale = quantize_weight(state["model.embed_tokens.weight"])
        model.lm_head = Int8Linear(q, scale, None, [], kernel)
    else:
        q, scale, _ = take("lm_head.")
        model.lm_head = Int8Linear(q, scale, None, [("lm_head", q.shape[0])], kernel)
        if stored:
            drop_pages(q)
    del q
    trim_heap()
    for i, block in enumerate(model.model.layers):
        for owner, groups in GROUPS.items():
            module = getattr(block, owner)
            for fused, names in groups.items():
                pieces = [take(f"model.layers.{i}.{owner}.{name}.") for name in names]
                biases = [b for _, _, b in pieces if b is not None]
                linear = Int8Linear(pieces[0][0] if len(pieces) == 1 else torch.cat([q for q, _, _ in pieces]),
                                    torch.cat([s for _, s, _ in pieces]),
                                    torch.cat(biases).float() if biases else None,
                                    [(name, q.shape[0]) for name, (q, _, _) in zip(names, pieces, strict=True)],
                                    kernel)
                for name in names:
                    delattr(module, name)
                setattr(module, fused, linear)
                if stored:  # the int8 matrices were copied into the kernel's layout: release the file's pages
                    for q, _, _ in pieces:
                        drop_pages(q)
                del pieces
                trim_heap()
    model.quantization = dict(CONFIG)


# Prompts for the quality figure: the kinds of questions pocket-r1's models see, in the chat template.
PROMPTS = ["What is 17 * 23?", "Compute 48 + 75 - 19.", "Use 3, 7 and 25 to make 46 with + - * /.",
           "If Anna has 12 apples and gives away 5, how many are left?", "Is 91 a prime number?",
           "Write a Python function that reverses a string.", "Explain why the sky is blue in one sentence.",
           "A knight always tells the truth and a knave always lies. A says: B is a knave. B says: we are both "
           "knights. Who is who?"]


@dataclass(slots=True)
class Quality:
    kl: float  # mean KL(reference || quantized) of the next-token distributions, in nats
    agreement: float  # share of positions where both models' most likely next token is the same
    positions: int

    def __str__(self) -> str:
        return f"logit KL {self.kl:.2e} nats/token, greedy-token agreement {self.agreement:.1%} " \
               f"over {self.positions} positions"


@torch.inference_mode()
def compare(reference: nn.Module, quantized: nn.Module, sequences: list[list[int]]) -> Quality:
    """Both models score the same token sequences (teacher forcing): the quantized model is judged on exactly
    the contexts the reference saw, so one early disagreement does not derail the rest."""
    kl, agree, count = 0.0, 0, 0
    for seq in sequences:
        ids = torch.tensor([seq])
        positions = torch.arange(len(seq))[None]
        ref = reference(ids, positions, None)[0].float().log_softmax(-1)
        out = quantized(ids, positions, None)[0].float().log_softmax(-1)
        kl += (ref.exp() * (ref - out)).sum().item()
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        count += len(seq)
    if not count:
        raise UserError("no tokens to compare the models on.")
    return Quality(kl / count, agree / count, count)


def quality(reference: nn.Module, quantized: nn.Module, tok, prompts: int = 8, tokens: int = 32) -> Quality:
    """`compare` over `prompts` chat prompts, each followed by the reference's own greedy continuation of up
    to `tokens` tokens (so the figure covers the text the model writes, not only what it reads)."""
    from pocketr1.engine import SamplingParams, generate

    greedy = SamplingParams(temperature=0.0, max_new_tokens=max(tokens, 1))
    sequences = []
    for i in range(prompts):
        ids = tok.chat_ids([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        if tokens:  # one prompt at a time: a single row decodes on the loaded model, without a packed copy
            ids = ids + generate(reference, [ids], greedy, tok.stop_ids, pad_id=tok.pad_id)[0].ids
        sequences.append(ids[:reference.config.max_position_embeddings])
    return compare(reference, quantized, sequences)


def quantize_command(args) -> None:
    """`pocketr1 quantize MODEL OUT`: write the int8 folder, then print how far it drifts from the original."""
    from pocketr1.chat import resolve_model_dir
    from pocketr1.fsutil import write_json
    from pocketr1.model.hf import load_model, save_model, stored_quantization
    from pocketr1.tokenizer import ChatTokenizer

    source = resolve_model_dir(args.path)
    if stored_quantization(source):
        raise UserError(f"{source} is already quantized.")
    if args.prompts < 0 or args.tokens < 0:
        raise UserError("--prompts and --tokens must be 0 or more.")
    if args.out.exists() and (args.out.resolve() == source.resolve() or any(args.out.iterdir())):
        raise UserError(f"{args.out} already exists; choose a new folder for the int8 model.")
    model = load_model(source, device="cpu", int8=True)
    extra = {p.name: p for p in sorted(source.iterdir()) if p.name.startswith(("tokenizer", "special_tokens"))}
    save_model(model, args.out, extra)
    sizes = [sum(p.stat().st_size for p in f.glob("*.safetensors")) / 2**20 for f in (source, args.out)]
    print(f"wrote {args.out}: {sizes[1]:,.0f} MB of weights (from {sizes[0]:,.0f} MB)")
    if not args.prompts:
        return
    print(f"comparing with {source} on {args.prompts} prompts ...", file=sys.stderr, flush=True)
    figure = quality(load_model(source, device="cpu"), load_model(args.out, device="cpu"),
                     ChatTokenizer(source), args.prompts, args.tokens)
    print(figure)
    write_json(args.out / "quantization.json", {"source": str(source), "prompts": args.prompts,
                                                "tokens": args.tokens, **asdict(figure)})
