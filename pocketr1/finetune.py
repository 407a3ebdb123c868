"""`pocketr1 finetune MODEL DATA.jsonl` (LoRA or full SFT of any model folder) and `pocketr1 merge`.

    pocketr1 finetune runs/latest data.jsonl --lora --rank 16 --out my-adapter     # a peft adapter folder
    pocketr1 finetune ~/models/R1-Distill-Qwen-1.5B data.jsonl --full --out tuned sft.lr=2e-5
    pocketr1 finetune MODEL data.jsonl --lora --out my-adapter --resume             # after a crash or Ctrl-C
    pocketr1 merge MODEL my-adapter merged/                                         # a plain model folder
    torchrun --nproc-per-node 2 -m pocketr1 finetune MODEL data.jsonl --out tuned   # DDP (--fsdp: FSDP2)

While training, OUT holds `finetune.json` (the resolved config), `metrics.jsonl` and `checkpoint/`; at the
end OUT is swapped, in one step, for the finished adapter (adapter_config.json + adapter_model.safetensors)
or model folder, with the config and metrics beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pocketr1 import config as config_mod
from pocketr1.errors import UserError
from pocketr1.fsutil import check_writable, read_json, write_json
from pocketr1.model import load_model, save_model
from pocketr1.model.hf import DTYPES, refuse_quantized
from pocketr1.modify import lora
from pocketr1.tokenizer import ChatTokenizer
from pocketr1.train import distributed
from pocketr1.train.common import Metrics, pick_device, set_threads
from pocketr1.train.sft import load_chat_jsonl, sft

CONFIG_FILE = "finetune.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOP_LEVEL = ("seed", "dtype", "threads", "device")  # overrides besides sft.*


def resolve_settings(args, out: Path) -> dict:
    """The fine-tune's settings: from the command line for a new one, from OUT/finetune.json on --resume."""
    from pocketr1.chat import resolve_model_dir

    model_dir, data = resolve_model_dir(args.model).resolve(), Path(args.data).resolve()
    saved = out / CONFIG_FILE
    if args.resume:
        if not saved.is_file():
            raise UserError(f"{out} holds no fine-tune to resume (no {CONFIG_FILE}).")
        if args.overrides:
            raise UserError("a fine-tune resumes with its saved config; drop the overrides (or use a new --out).")
        settings = read_json(saved)
        if settings.get("finished"):
            raise UserError(f"the fine-tune in {out} has finished; choose another --out for a new one.")
        if (settings["base_model"], settings["data"]) != (str(model_dir), str(data)):
            raise UserError(f"{out} fine-tunes {settings['base_model']} on {settings['data']}; resume it with "
                            "the same MODEL and DATA.")
        return settings
    if saved.exists() or (out / lora.CONFIG_FILE).exists() or (out / "model.safetensors").exists():
        raise UserError(f"{out} already holds a fine-tune; use --resume to continue it or choose another --out.")
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith("sft.") and key not in TOP_LEVEL:
            raise UserError(f"finetune takes sft.* overrides (and {', '.join(TOP_LEVEL)}), not '{key}'.")
    cfg = config_mod.build(args.preset, args.overrides)
    if args.device:
        cfg.device = args.device
    method = "full" if args.full or not (args.lora or getattr(args, "lora_default", True)) else "lora"
    return {"base_model": str(model_dir), "data": str(data), "method": method, "preset": args.preset,
            "lora": {"rank": args.rank, "alpha": args.alpha if args.alpha is not None else 2 * args.rank,
                     "dropout": args.dropout, "targets": args.targets} if method == "lora" else None,
            "seed": cfg.seed, "dtype": cfg.dtype, "threads": cfg.threads, "device": cfg.device,
            "sft": dataclasses.asdict(cfg.sft), "finished": False}


def finetune_command(args) -> None:
    out: Path = args.out
    device = distributed.init(pick_device(args.device or "auto"), args.dist_timeout)
    settings = resolve_settings(args, out)
    distributed.barrier()  # every rank has read OUT before rank 0 writes into it
    device = distributed.local_device(pick_device(settings["device"]))
    set_threads(settings["threads"])
    model_dir = Path(settings["base_model"])
    refuse_quantized(model_dir, "fine-tuning")
    tok = ChatTokenizer(model_dir)
    examples = load_chat_jsonl(settings["data"])  # bad data fails before OUT is touched
    if distributed.is_main():
        check_writable(out)
        write_json(out / CONFIG_FILE, settings)
    model = load_model(model_dir, device=device, dtype=torch.float32)
    if settings["method"] == "lora":
        lc = settings["lora"]
        lora.add_lora(model, lora.lora_config(model, lc["rank"], lc["alpha"], lc["dropout"], lc["targets"],
                                              str(model_dir)), settings["seed"])
    cfg = config_mod.SFTConfig(**settings["sft"])
    model = sft(model, tok, examples, cfg, out / "checkpoint", Metrics(out / "metrics.jsonl"), device,
                settings["seed"], settings["dtype"], fsdp=args.fsdp, stage="finetune")
    if not distributed.is_main():
        return
    final = out / f".{CONFIG_FILE}.final"  # goes into the swapped-in folder as finetune.json, then is gone
    write_json(final, settings | {"finished": True})
    beside = {CONFIG_FILE: final} | ({"metrics.jsonl": out / "metrics.jsonl"} if (out / "metrics.jsonl").exists()
                                     else {})
    if settings["method"] == "lora":
        lora.save_adapter(model, out, beside)  # the checkpoint goes with the swap: the fine-tune is done
        what = "adapter"
    else:
        original = read_json(model_dir / "config.json")
        dtype = DTYPES.get(original.get("torch_dtype") or original.get("dtype"), torch.float32)
        tokenizer = {name: model_dir / name for name in TOKENIZER_FILES if (model_dir / name).exists()}
        save_model(model.to(dtype), out, tokenizer | beside)
        what = "model"
    print(f"pocketr1: fine-tuned {what} written to {out}")


def merge_command(args) -> None:
    """Fold ADAPTER into MODEL and write OUT: a plain model folder with MODEL's tokenizer and dtype."""
    from pocketr1.chat import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    original = read_json(model_dir / "config.json")
    dtype = DTYPES.get(original.get("torch_dtype") or original.get("dtype"), torch.float32)
    model = load_model(model_dir, dtype=torch.float32)  # merge in float32, store in the original dtype
    lora.merge(lora.load_adapter(model, args.adapter))
    check_writable(args.out.parent if args.out.parent != Path("") else Path("."))
    tokenizer = {name: model_dir / name for name in TOKENIZER_FILES if (model_dir / name).exists()}
    save_model(model.to(dtype), args.out, tokenizer)
    print(f"pocketr1: merged model written to {args.out}")
