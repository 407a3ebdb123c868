"""The `pocketr1` command: one small function per verb. User errors print one sentence and exit 1."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from pocketr1 import config as config_mod
from pocketr1.errors import UserError

RUNS = Path("runs")
ARCHS = {"qwen2": "qwen2", "llama": "llama", "deepseek": "deepseek_v3"}  # --arch NAME -> model.model_type
RUN_EPILOG = """examples:
  pocketr1 run                                  the default: about 5 minutes on a 2-core laptop
  pocketr1 run --preset tiny --out /tmp/demo    a one-minute miniature
  pocketr1 run grpo.variant=dapo grpo.eps_high=0.28 grpo.beta=0
  pocketr1 run --resume                         continue runs/latest after a crash or Ctrl-C
  pocketr1 run --recipe r1                      R1's stages: cold start, RL, rejection SFT, RL, distill (~11 min)
  pocketr1 config --preset small                every config key and its value"""


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. grpo.steps=100 grpo.variant=dr_grpo model.hidden_size=256")
    p.add_argument("--preset", default="default", help="size dial: tiny (a minute), default, small (longer)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<preset>-<time>)")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--arch", choices=ARCHS, help="model family: qwen2 (default), llama, deepseek (MLA + MoE); "
                                                 "the same as model.model_type=...")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the processes (FSDP2) instead of replicating it (DDP)")
    p.add_argument("--recipe", choices=config_mod.RECIPES,
                   help="r1zero (default): pretrain, then GRPO | r1: cold-start SFT, reasoning RL, rejection-sampling "
                        "SFT, RL on all tasks, distillation, comparisons (the same as recipe=...)")
    p.add_argument("--grpo-preset", choices=list(config_mod.GRPO_PRESETS),
                   help="GRPO settings over the size preset: r1 (G=16, beta=0.001, scaled reference resets), grpo, "
                        "dr_grpo, dapo (the same as grpo_preset=...)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for a silent process before failing")


def lazy(target: str):
    """The verb's function, `module:function`, imported only when that verb runs: `pocketr1 --help` and
    every other verb start without loading torch, transformers or the server."""

    def run(args) -> None:
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(args)

    return run


def _open_run(args, continuing: bool):
    """The run at --out (or runs/latest) when continuing, else a new run from --preset and overrides."""
    from pocketr1.run import Run, latest_link
    from pocketr1.train import distributed
    from pocketr1.train.common import pick_device

    distributed.init(pick_device(args.device or "auto"), args.dist_timeout)  # a no-op without torchrun
    if continuing:
        if args.overrides or args.arch or args.recipe or args.grpo_preset:
            raise UserError("a run continues with its saved config; drop the overrides (or start a new --out).")
        run = Run.open(args.out or RUNS / "latest")
        run.fsdp = args.fsdp
        return run
    arch = [f"model.model_type={ARCHS[args.arch]}"] if args.arch else []
    arch += [f"recipe={args.recipe}"] if args.recipe else []
    arch += [f"grpo_preset={args.grpo_preset}"] if args.grpo_preset else []
    cfg = config_mod.build(args.preset, arch + args.overrides)
    if args.device:
        cfg.device = args.device
    if args.out is None and distributed.world() > 1:
        raise UserError("under torchrun give every process the same --out (a timestamped default would differ).")
    run = Run.create(args.out or RUNS / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", cfg)
    run.fsdp = args.fsdp
    if args.out is None:
        latest_link(RUNS, run.folder)
    return run


def cmd_run(args) -> None:
    from pocketr1.report import print_summary
    from pocketr1.train import distributed

    run = _open_run(args, continuing=args.resume)
    run.run()
    if distributed.is_main():
        print_summary(run)


def cmd_stage(args) -> None:
    """One stage (after any earlier one not done yet), in the run at --out if it exists, else a new run."""
    continuing = args.resume or (args.out is not None and (args.out / "config.json").exists())
    run = _open_run(args, continuing)
    run.run(until=args.command, redo=args.command == "report")


def cmd_config(args) -> None:
    import json

    print(json.dumps(config_mod.to_dict(config_mod.build(args.preset, args.overrides)), indent=2))


def cmd_info(args) -> None:
    from pocketr1.chat import resolve_model_dir
    from pocketr1.model.info import describe

    print(describe(resolve_model_dir(args.path)))


def _int8_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8", action="store_true", help="quantize the weights to int8 while loading (CPU; about half "
                                                       "the memory, faster decoding); `pocketr1 quantize` saves them")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketr1",
        description="Grow, run and modify DeepSeek-R1-style reasoning models offline on one computer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="grow a reasoning model from nothing (R1-Zero): data, tokenizer, base, GRPO, "
                                    "eval, report",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (--out, or runs/latest)")
    p.set_defaults(func=cmd_run)

    for stage, text in (("corpus", "write the task corpus"), ("tokenizer", "train the BPE tokenizer"),
                        ("pretrain", "pretrain the base model"), ("grpo", "run GRPO from the base model"),
                        ("report", "write report.md, plots and summary.json")):
        p = sub.add_parser(stage, help=f"{text} (and any earlier stage not done yet) in a run folder")
        _common_run_args(p)
        p.add_argument("--resume", action="store_true", help="continue this stage from its checkpoint")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("sample", help="rejection sampling: many completions per training prompt, keep the verified, "
                                      "readable ones as chat JSONL with provenance",
                       epilog="example:\n  pocketr1 sample runs/latest --prompts 128 --per-prompt 8 --out traces.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run folder (its RL model, else its base) or a model folder")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write (loadable by finetune / sft)")
    p.add_argument("--families", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="task families, comma-separated (default: the run's, else arithmetic,countdown)")
    p.add_argument("--difficulty", action="append", metavar="FAMILY:key=value,...",
                   help="difficulty knobs of one family (repeatable; default: the run's)")
    p.add_argument("--prompts", type=int, default=64, help="training problems per family (default 64)")
    p.add_argument("--per-prompt", type=int, default=8, help="completions sampled per problem (default 8)")
    p.add_argument("--keep", type=int, default=2, help="distinct verified traces kept per problem (default 2)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-language", type=float, default=0.9,
                   help="least share of the thinking in the prompt's script (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lazy("pocketr1.train.sample:sample_command"))

    p = sub.add_parser("distill", help="SFT a smaller student on a teacher's verified traces, against the same "
                                       "student trained by GRPO alone for the same compute",
                       epilog="example:\n  pocketr1 distill --teacher runs/latest --student-preset tiny "
                              "--out runs/student",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="over the student preset, e.g. pretrain.steps=1500 r1.rejection_prompts=128")
    p.add_argument("--teacher", type=Path, required=True,
                   help="a run folder (its RL model and tasks) or a model folder")
    p.add_argument("--student-preset", default="tiny", help="the student's size and schedules (default tiny)")
    p.add_argument("--out", type=Path, help="output folder (default runs/distill-<time>); rerun to resume")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=lazy("pocketr1.train.distill:distill_command"))

    p = sub.add_parser("compare", help="short GRPO runs from a run's model: grpo vs dr_grpo vs dapo, and the language "
                                       "reward without and with; results go into the run's report")
    p.add_argument("path", type=Path, help="a run folder")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. r1.compare_steps=40")
    p.set_defaults(func=lazy("pocketr1.train.compare:compare_command"))

    p = sub.add_parser("info", help="a model folder at a glance: family, parameters, dtype, KV-cache bytes per token")
    p.add_argument("path", type=Path, help="a run folder (its RL model, else its base) or a model folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the resolved config of a preset with overrides (every key you can set)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--preset", default="default")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="pass@1 over k samples, cons@k, greedy, on held-out problems")
    p.add_argument("path", type=Path, help="a run folder or a model folder")
    p.add_argument("--task", action="append", help="task family (repeatable; default: all of the run's)")
    p.add_argument("--difficulty", default="", help="knobs as key=value,... e.g. min_terms=6,max_terms=8")
    ec = config_mod.EvalConfig()  # the same defaults as a run's own evaluation
    p.add_argument("--k", type=int, default=ec.k, help=f"samples per problem (default {ec.k})")
    p.add_argument("--problems", type=int, default=ec.problems, help=f"held-out problems per task (default "
                                                                      f"{ec.problems})")
    p.add_argument("--temperature", type=float, default=ec.temperature)
    p.add_argument("--top-p", type=float, default=ec.top_p)
    p.add_argument("--max-tokens", type=int, default=ec.max_new_tokens)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    _int8_arg(p)
    p.add_argument("--refusals", nargs="?", const="", metavar="FILE",
                   help="also measure the refusal rate: on the forbidden topic's held-out questions (the censored "
                        "demo), or on the prompts in FILE (one per line, or .jsonl)")
    p.set_defaults(func=lazy("pocketr1.cli_eval:evaluate_command"))

    p = sub.add_parser("chat", help="talk to a model in the terminal; thinking shown dimmed, then the answer")
    p.add_argument("path", type=Path, help="a run folder (uses its RL model) or a model folder")
    _sampling_args(p)
    p.add_argument("--stats", action="store_true", help="show first-token and per-token latency")
    _int8_arg(p)
    p.set_defaults(func=lazy("pocketr1.chat:chat"))

    p = sub.add_parser("ask", help="one question, one streamed answer")
    p.add_argument("path", type=Path, help="a run folder or a model folder")
    p.add_argument("question")
    _sampling_args(p)
    p.add_argument("--raw", action="store_true", help="send the text as-is (no chat template); print only the "
                                                    "completion")
    p.add_argument("--stats", action="store_true", help="show first-token and per-token latency (on stderr)")
    _int8_arg(p)
    p.set_defaults(func=lazy("pocketr1.chat:ask"))

    p = sub.add_parser("serve", help="OpenAI/DeepSeek-compatible API and a web chat page, for many users at once")
    p.add_argument("path", type=Path, help="a run folder (uses its RL model) or a model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    p.add_argument("--api-key", help="require the key on every route but /health: `Authorization: Bearer KEY` "
                                         "from API clients; the browser asks for it (as a password) for the page")
    p.add_argument("--max-batch", type=int, default=32, help="sequences generated together")
    p.add_argument("--queue", type=int, default=256, help="requests that may wait for a free row (then 429)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="float32 (default): a seeded reply is the same alone or in any batch")
    p.add_argument("--keepalive", type=float, default=10.0, help="seconds between SSE keep-alive comments")
    p.add_argument("--device", default="auto")
    _int8_arg(p)
    p.set_defaults(func=lazy("pocketr1.serve.main:serve_command"))

    from pocketr1.cli_modify import add_modify_verbs

    add_modify_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills `overrides` with the positionals before the first option; key=value after options
    # (`finetune MODEL DATA --out X sft.lr=1e-4`) arrive here and belong there too.
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in x and not x.startswith("-")
                                                                           for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from pocketr1.train import distributed

    try:
        args.func(args)
    except UserError as e:
        print(f"pocketr1: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # a training loop's Interrupted says where it stopped and saved
        print(f"\npocketr1: {e}" if str(e) else "\npocketr1: interrupted.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        message = distributed.failure(e)
        if message is None:
            raise
        print(f"pocketr1: error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.teardown()
