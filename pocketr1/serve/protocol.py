"""The OpenAI wire format: request bodies (validated), responses, streamed chunks and errors.

Requests are pydantic models, so every field's type and range is checked before anything runs and the
framework publishes them as an OpenAPI schema; unknown fields are accepted and ignored, as OpenAI's own
clients send many. Replies follow OpenAI's Chat Completions / Completions shapes, with the thinking of an R1
model in `reasoning_content` (DeepSeek, llama.cpp, SGLang) and, the same text, `reasoning` (newer vLLM).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pocketr1.thinking import ThinkSplit

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.6, 0.95  # R1's recommended sampling, when a request sets none
DEFAULT_MAX_TOKENS = 4096  # when a request sets none (and the context allows it), as DeepSeek's API


class APIError(Exception):
    """An error reply: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_Stop = Annotated[str, Field(max_length=256)]  # held-back text is checked against each, every token


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: Any = None  # refused when sent back (see `chat_messages`)


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: _Stop | Annotated[list[_Stop], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-2**63, le=2**64 - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None  # not supported: refused when set


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them (text parts joined, developer as system)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.reasoning_content is not None:  # DeepSeek's rule: the thinking is not sent back
            raise APIError(400, "reasoning_content must not be sent back in input messages; send only the "
                                "content of earlier assistant turns.", param=f"messages.{i}.reasoning_content")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def sampling(req: Sampling, prompt_tokens: int, context: int, max_batch: int, choices: int,
             prompt_param: str = "messages") -> dict[str, Any]:
    """The engine's settings for `req` (a `Job`'s keyword arguments, less the prompt), or an `APIError`."""
    if req.logprobs not in (None, False):
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
    if choices > max_batch:
        raise APIError(400, f"n (times the number of prompts) must be at most {max_batch}, the server's batch.",
                       param="n")
    room = context - prompt_tokens
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                            f"{prompt_tokens}.", param=prompt_param, code="context_length_exceeded")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens; you asked for {asked} "
                            f"tokens after a prompt of {prompt_tokens}. Lower max_tokens to at most {room}.",
                       param="max_tokens", code="context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    return {"max_tokens": asked or min(room, DEFAULT_MAX_TOKENS), "n": req.n,
            "temperature": DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            "top_p": DEFAULT_TOP_P if req.top_p is None else req.top_p,
            "seed": req.seed, "stop": tuple(s for s in stop if s)}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Reply:
    """Turns the engine's events for one request into chunks (streaming) and a whole reply (at the end).

    Chat replies split each choice's text at `</think>`; completions pass text through unchanged.
    """

    def __init__(self, chat: bool, model: str, choices: int, prompt_tokens: int, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.splits = [ThinkSplit() for _ in range(choices)]
        self.reasoning = [""] * choices
        self.content = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0

    def _chunk(self, choice: int, delta: dict, finish: str | None = None) -> dict:
        if self.chat:
            body: dict = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": choice, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                 "model": self.model, "choices": [body]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.splits))]

    def text(self, choice: int, piece: str) -> list[dict]:
        if not self.chat:
            self.content[choice] += piece
            return [self._chunk(choice, {"content": piece})]
        thought, answer = self.splits[choice].push(piece)
        return self._deltas(choice, thought, answer)

    def done(self, choice: int, reason: str, tokens: int) -> list[dict]:
        self.finish[choice] = reason
        self.completion_tokens += tokens
        tail = self._deltas(choice, self.splits[choice].finish(), "") if self.chat else []
        return [*tail, self._chunk(choice, {}, reason)]

    def _deltas(self, choice: int, thought: str, answer: str) -> list[dict]:
        self.reasoning[choice] += thought
        self.content[choice] += answer
        out = [self._chunk(choice, {"reasoning_content": thought, "reasoning": thought})] if thought else []
        return out + ([self._chunk(choice, {"content": answer})] if answer else [])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage()}

    def whole(self) -> dict:
        choices = []
        for i, reason in enumerate(self.finish):
            if self.chat:
                message = {"role": "assistant", "content": self.content[i],
                           "reasoning_content": self.reasoning[i], "reasoning": self.reasoning[i]}
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": self.content[i], "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
