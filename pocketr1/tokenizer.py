"""Tokenizer: byte-level BPE trained with HF `tokenizers` (digits split one per token, as Qwen2 does),
R1's special tokens, and R1's chat template stored in `tokenizer_config.json` and rendered with Jinja,
the same way `transformers` renders it, so one template serves our models and the checkpoints users bring.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pocketr1.errors import UserError
from pocketr1.fsutil import atomic_path, read_json, write_json

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, PAD]
# Not special (as in R1-Distill): they survive skip_special_tokens and are ordinary text to the template.
TEXT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# R1's chat template: system text first, user turns, assistant turns keeping only the text after the
# last </think>, and a generation prompt that opens the thinking block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    folder = Path(folder)
    with atomic_path(folder / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    })


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ChatTokenizer:
    """A model folder's tokenizer and chat template, as pocket-r1 uses them everywhere."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{folder} has no tokenizer.json.")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise UserError(f"{path} is not a valid tokenizer file ({e}).") from None
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        if not isinstance(config, dict):
            raise UserError(f"{folder / 'tokenizer_config.json'} must hold a JSON object.")
        self.bos_token = _token_text(config.get("bos_token")) or ""
        self.eos_token = _token_text(config.get("eos_token")) or EOS
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        template = config.get("chat_template") or CHAT_TEMPLATE
        if isinstance(template, list):  # some folders store several named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template in {folder} does not parse ({e}).") from None
        self.eos_id = self.token_id(self.eos_token)
        self.pad_id = self.token_id(self.pad_token) if self.pad_token else self.eos_id
        gen = folder / "generation_config.json"
        eos = read_json(gen).get("eos_token_id") if gen.exists() else None
        extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = sorted({self.eos_id, *extra} - {None})

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def prompt_ids(self, question: str) -> list[int]:
        return self.chat_ids([{"role": "user", "content": question}])


def _raise_template_error(message: str):
    raise UserError(f"chat template error: {message}")


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of a character not yet complete.

    Each push decodes only a short window: the ids not yet shown, after the ones shown last time (kept as
    context, so decoders that treat a leading space specially stay right). A long reply costs linear
    time, not the quadratic of re-decoding everything per token.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: shown, kept as context; ids[read:]: not shown yet

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character shows as U+FFFD, as `decode` gives)."""
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(shown):]
