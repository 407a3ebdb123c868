"""`pocketr1 chat` and `pocketr1 ask`: talk to a model in the terminal, streamed token by token.

Completions start inside the thinking block (R1's generation prompt ends in `<think>\\n`), so everything up
to `</think>` is thinking and is shown dimmed on a terminal; the answer follows in plain text. Earlier
assistant turns go back into the prompt whole: the chat template itself strips their thinking, as R1's does.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import TextIO

from pocketr1.errors import UserError
from pocketr1.thinking import THINK_END, ThinkSplit

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "/reset starts over, /exit or Ctrl-D quits"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "state.json").is_file()


def resolve_model_dir(path: Path) -> Path:
    """The model folder behind PATH: a run folder's RL model (else its base), or PATH itself."""
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    if is_run_folder(path):
        for name in ("rl", "base"):
            if _is_model_dir(path / name):
                return path / name
        raise UserError(f"run folder {path} has no trained model yet (no rl/ or base/ model folder).")
    if _is_model_dir(path):
        return path
    if (path / "config.json").is_file():  # names what the weights lack (e.g. only pickles, which are refused)
        from pocketr1.model.hf import _weight_files

        _weight_files(path)
    raise UserError(f"{path} is neither a run folder (config.json + state.json) nor a model folder "
                    "(config.json + model.safetensors).")


class ReplyPrinter:
    """Writes streamed text, splitting thinking from answer at `</think>` (see `pocketr1.thinking`).

    On a terminal the thinking is dimmed and the tag hidden; elsewhere the tag is kept so the boundary
    stays visible in a log or a pipe.
    """

    def __init__(self, out: TextIO, style: bool, thinking: bool = True):
        self.out, self.style = out, style
        self.split = ThinkSplit(trim=style) if thinking else None  # a styled answer starts on its own line
        self.saw_answer, self.line_start = not thinking, True
        if thinking and style:
            out.write(DIM)

    def write(self, piece: str) -> None:
        if self.split is None:
            self._emit(piece)
            return
        thought, answer = self.split.push(piece)
        self._emit(thought)
        if self.split.answering and not self.saw_answer:
            self.saw_answer = True
            if self.style:  # the answer goes on a fresh line, in plain text
                self.out.write(RESET + ("" if self.line_start else "\n"))
            else:
                self._emit(THINK_END)
        self._emit(answer)

    def finish(self) -> None:
        if self.split is not None:
            self._emit(self.split.finish())
        if self.style and not self.saw_answer:
            self.out.write(RESET)
            self.out.flush()

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.line_start = text.endswith("\n")


class Session:
    """A loaded model and tokenizer, the sampling settings, and one streamed reply at a time."""

    def __init__(self, args):
        from pocketr1.engine import SamplingParams
        from pocketr1.model import load_model
        from pocketr1.tokenizer import ChatTokenizer
        from pocketr1.train.common import pick_device

        _check_sampling(args)
        self.folder = resolve_model_dir(args.path)
        self.tok = ChatTokenizer(self.folder)
        self.model = load_model(self.folder, device=pick_device(args.device), int8=getattr(args, "int8", False))
        self.model = _packed_for_one_row(self.model)
        # Without --seed each reply draws fresh randomness; with it, a session replays exactly.
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        self.params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_tokens, seed)
        self.show_stats = getattr(args, "stats", False)

    def reply(self, ids: list[int], printer: ReplyPrinter, end: str = "\n") -> tuple[str, bool]:
        """Stream a completion of `ids` to `printer`, then `end`; its text and whether it finished."""
        from pocketr1.engine import generate
        from pocketr1.tokenizer import StreamDecoder

        decoder = StreamDecoder(self.tok)
        stamps: list[float] = []

        def on_token(_seq: int, token: int) -> None:
            stamps.append(time.perf_counter())
            printer.write(decoder.push(token))

        start = time.perf_counter()
        completion = generate(self.model, [ids], self.params, self.tok.stop_ids, pad_id=self.tok.pad_id,
                              on_token=on_token)[0]
        printer.finish()
        printer.out.write(end)
        printer.out.flush()
        self.params.seed += 1  # the next reply must not replay this one's draws
        if self.show_stats:
            _print_stats(start, stamps)
        return self.tok.decode(completion.ids), completion.finished


def _packed_for_one_row(model):
    """A 16-bit model on the CPU, swapped for its prepacked copy (and the original let go).

    The engine runs one row on the model as loaded, which is right in float32; in bf16/fp16 oneDNN would
    re-lay every weight out at every decode step, about 2x slower than the packed copy. The engine keeps
    both for batches (training needs the original); a chat needs only the copy, so memory stays ~1x."""
    import torch

    weight = model.model.embed_tokens.weight
    if model.quantization or weight.device.type != "cpu" or weight.dtype == torch.float32:
        return model
    return model.frozen(weight.dtype)


def _check_sampling(args) -> None:
    if args.temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or more.")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1].")
    if args.top_k < 0:
        raise UserError("--top-k must be 0 (off) or more.")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1.")


def _print_stats(start: float, stamps: list[float]) -> None:
    # Stats go to stderr so stdout keeps only what the model said.
    if not stamps:
        print("[no tokens generated]", file=sys.stderr)
        return
    first_ms = (stamps[0] - start) * 1000
    per_token = (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    rate = f", {1000 / per_token:.1f} tokens/s" if per_token else ""
    print(f"[first token {first_ms:.0f} ms, {per_token:.1f} ms/token over {len(stamps)} tokens{rate}, "
          f"peak RSS {_peak_rss_mb():.0f} MB]", file=sys.stderr)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (the model's weights, mapped or copied, and everything else)."""
    try:
        import resource
    except ImportError:  # (not on Windows)
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def _cut_off_note(finished: bool) -> None:
    # The limit is --max-tokens or what is left of the model's context, whichever came first.
    if not finished:
        print("[reply cut off at the token limit]", file=sys.stderr)


def ask(args) -> None:
    """One question, one streamed answer; `--raw` continues the text as-is and prints nothing else."""
    if not args.question.strip():
        raise UserError("the question is empty.")
    session = Session(args)
    out = sys.stdout
    if args.raw:
        printer = ReplyPrinter(out, style=False, thinking=False)
        # A terminal gets a final newline to keep the shell prompt off the last line; a pipe gets the
        # completion byte for byte, so scripts can compare outputs exactly.
        session.reply(session.tok.encode(args.question), printer, end="\n" if out.isatty() else "")
        return
    printer = ReplyPrinter(out, style=out.isatty())
    _, finished = session.reply(session.tok.chat_ids([{"role": "user", "content": args.question}]), printer)
    _cut_off_note(finished)


def chat(args) -> None:
    """An interactive conversation: one user line per turn, `/reset` and `/exit`, Ctrl-D to quit."""
    session = Session(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
        print(f"pocketr1 chat with {session.folder}: {HELP}")
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return
        except KeyboardInterrupt:  # at the prompt Ctrl-C clears the line, as in a shell
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                messages.clear()
                print("[conversation cleared]")
            else:
                print(f"unknown command {text}: {HELP}")
            continue
        messages.append({"role": "user", "content": text})
        _chat_turn(session, messages)


def _chat_turn(session: Session, messages: list[dict[str, str]]) -> None:
    """Answer the last user message; on failure or Ctrl-C drop it, so the history stays a valid dialogue."""
    out = sys.stdout
    printer = ReplyPrinter(out, style=out.isatty())
    try:
        text, finished = session.reply(session.tok.chat_ids(messages), printer)
    except UserError as e:  # most often: the conversation outgrew the model's context
        printer.finish()
        messages.pop()
        lead = "" if printer.line_start else "\n"
        print(f"{lead}[{e} Use /reset to start a new conversation.]")
        return
    except KeyboardInterrupt:
        printer.finish()
        messages.pop()
        print("\n[interrupted]")
        return
    _cut_off_note(finished)
    messages.append({"role": "assistant", "content": text})
