"""The verbs that change a model: finetune / sft, merge, quantize, export, abliterate, diff."""

from __future__ import annotations

import argparse
from pathlib import Path

from pocketr1.cli import lazy
from pocketr1.config import EvalConfig

FINETUNE_EPILOG = """examples:
  pocketr1 finetune runs/latest data.jsonl --lora --rank 16 --out adapter   a peft adapter folder
  pocketr1 finetune MODEL data.jsonl --full --out tuned sft.lr=2e-5          a new model folder
  pocketr1 finetune MODEL data.jsonl --out adapter --resume                  after a crash or Ctrl-C
  pocketr1 merge MODEL adapter merged                                         fold the adapter in
  torchrun --nproc-per-node 2 -m pocketr1 finetune MODEL data.jsonl --out adapter   (DDP; --fsdp: FSDP2)"""


def add_modify_verbs(sub) -> None:
    """Their parsers, in the order `pocketr1 --help` lists them."""
    ec = EvalConfig()  # the same defaults as a run's own evaluation
    p = sub.add_parser("abliterate", help="remove a refusal: find the refusal direction and project it out of the "
                                          "weights (a new model folder)",
                       epilog="example:\n  pocketr1 abliterate runs/censored --harmful topic.txt --harmless tasks.txt "
                              "--out abliterated/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a run folder (its RL model, else its base) or a model folder")
    p.add_argument("--harmful", type=Path, required=True, help="prompts the model refuses (one per line, or .jsonl)")
    p.add_argument("--harmless", type=Path, required=True, help="prompts it answers (one per line, or .jsonl)")
    p.add_argument("--out", type=Path, help="new model folder (default: MODEL-abliterated beside it)")
    p.add_argument("--guard", type=Path, help="more prompts whose replies must not change, e.g. the tasks "
                                              "(up to 64 join the KL guard)")
    p.add_argument("--max-kl", type=float, default=0.1,
                   help="largest KL allowed on the harmless prompts' replies when choosing a direction (default 0.1)")
    p.add_argument("--skip-last", type=float, default=0.2,
                   help="share of the last layers not searched for a direction (default 0.2)")
    p.add_argument("--max-tokens", type=int, default=48, help="reply length when checking refusals (default 48)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lazy("pocketr1.modify.abliterate:abliterate_command"))

    p = sub.add_parser("diff", help="compare two models: per-layer weight change, logit KL, task accuracy")
    p.add_argument("a", type=Path, help="the first model (a run folder or a model folder)")
    p.add_argument("b", type=Path, help="the second model, of the same architecture and tokenizer")
    p.add_argument("--task", action="append", help="task family (repeatable; default: A's run tasks, else all)")
    p.add_argument("--prompts", type=Path, help="extra prompt file for the KL (one per line, or .jsonl)")
    p.add_argument("--problems", type=int, default=50, help="held-out problems per task (default 50)")
    p.add_argument("--kl-prompts", type=int, default=32, help="prompts per set for the KL (default 32)")
    p.add_argument("--k", type=int, default=2, help="samples per problem for pass@1 (default 2)")
    p.add_argument("--max-tokens", type=int, default=ec.max_new_tokens)
    p.add_argument("--refusals", action="store_true", help="also compare refusal rates on the forbidden topic")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=lazy("pocketr1.modify.diff:diff_command"))

    p = sub.add_parser("quantize", help="int8 weights with per-channel scales (a new model folder), and how far "
                                        "its logits drift from the original's")
    p.add_argument("path", type=Path, help="a run folder (uses its RL model) or a model folder")
    p.add_argument("out", type=Path, help="the int8 model folder to write")
    p.add_argument("--prompts", type=int, default=8, help="prompts for the quality figure (0: skip it)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens of the original per prompt, scored by both")
    p.set_defaults(func=lazy("pocketr1.modify.quantize:quantize_command"))

    p = sub.add_parser("export", help="write a GGUF file (llama.cpp, with an Ollama Modelfile) or a clean HF folder",
                       epilog="examples:\n  pocketr1 export runs/latest --gguf r1.gguf --type q8_0\n"
                              "  pocketr1 export runs/latest --hf exported/   (transformers, vLLM)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder (uses its RL model) or a model folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gguf", type=Path, metavar="OUT.gguf", help="GGUF file to write; a Modelfile goes beside it")
    where.add_argument("--hf", type=Path, metavar="OUTDIR", help="Hugging Face folder to write")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16",
                   help="GGUF weight type (default f16); norms and biases stay f32")
    p.set_defaults(func=lazy("pocketr1.modify.export:export_command"))

    for verb, text in (("finetune", "SFT a model on chat JSONL: a LoRA adapter (peft format) or full weights"),
                       ("sft", "supervised fine-tuning of every weight on chat JSONL (R1's cold start and "
                               "rejection-sampling SFT): `finetune --full`")):
        p = sub.add_parser(verb, help=text, epilog=FINETUNE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _finetune_parser(p, lora_default=verb == "finetune")

    p = sub.add_parser("merge", help="fold a LoRA adapter into its model and write a plain model folder")
    p.add_argument("model", type=Path, help="the model the adapter was trained on (model or run folder)")
    p.add_argument("adapter", type=Path, help="a peft LoRA adapter folder (adapter_config.json + weights)")
    p.add_argument("out", type=Path, help="the model folder to write")
    p.set_defaults(func=lazy("pocketr1.finetune:merge_command"))


def _finetune_parser(p: argparse.ArgumentParser, lora_default: bool) -> None:
    p.add_argument("model", type=Path, help="a model folder, or a run folder (its RL model, else its base)")
    p.add_argument("data", type=Path, help='JSONL rows {"messages": [{"role", "content"[, "reasoning_content"]}]}; '
                                           "loss on the assistant turns, thinking included")
    p.add_argument("overrides", nargs="*", metavar="sft.key=value", help="e.g. sft.epochs=3 sft.lr=2e-4 seed=1")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--lora", action="store_true", help="train a LoRA adapter" + (" (the default)" if lora_default
                                                                                 else ""))
    how.add_argument("--full", action="store_true", help="train every weight; OUT becomes a model folder"
                     + ("" if lora_default else " (the default)"))
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t], metavar="q_proj,v_proj,...",
                   help="LoRA target modules (default: every linear layer in the blocks)")
    p.add_argument("--out", type=Path, required=True, help="the adapter (or model) folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune in --out")
    p.add_argument("--preset", default="default", help="sft section preset: tiny, default, small")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for a silent process before failing")
    p.set_defaults(func=lazy("pocketr1.finetune:finetune_command"), lora_default=lora_default)
