"""The serving engine in-process: continuous batching gives each request exactly what a plain full-context
forward gives it (through joins, leaves, and the shared slot moving both ways), the queue is bounded, and
the text helpers (thinking split, streamed decoding) agree with their whole-text counterparts."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from pocketr1.engine.batcher import Batcher, Job, QueueFull
from pocketr1.model import load_model
from pocketr1.model.transformer import attention_mask, positions_for
from pocketr1.serve.toy import random_model
from pocketr1.thinking import ThinkSplit, split_thinking
from pocketr1.tokenizer import ChatTokenizer, StreamDecoder

CONTEXT = 96


def _toy(tmp_path_factory, model_type: str):
    folder = random_model(tmp_path_factory.mktemp("batcher") / model_type, context=CONTEXT, model_type=model_type)
    return load_model(folder, dtype=torch.float32), ChatTokenizer(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _toy(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module", params=["qwen2", "deepseek_v3"])
def any_family(request, tmp_path_factory):
    """Each family its own cache: Qwen2's keys and values, DeepSeek's MLA latent and rope key."""
    return _toy(tmp_path_factory, request.param)


class Collector:
    """Gathers a job's events; `wait` blocks until every choice is done."""

    def __init__(self, n: int = 1, on_text=None):
        self.text, self.reasons, self.errors = [""] * n, [None] * n, []
        self.left, self.done, self.on_text = n, threading.Event(), on_text

    def __call__(self, event) -> None:
        if event[0] == "text":
            self.text[event[1]] += event[2]
            if self.on_text:
                self.on_text(self)
        elif event[0] == "done":
            self.reasons[event[1]] = event[2]
            self.left -= 1
            if not self.left:
                self.done.set()
        else:
            self.errors.append(event[1])
            self.done.set()

    def wait(self) -> Collector:
        assert self.done.wait(60) and not self.errors, self.errors
        return self


@torch.inference_mode()
def reference(model, tok: ChatTokenizer, prompt: list[int], new: int) -> str:
    """Greedy by recomputing the whole context every step: no cache, no batch, no padding."""
    ids = list(prompt)
    for _ in range(new):
        n, zero = len(ids), torch.zeros(1, dtype=torch.long)
        logits = model(torch.tensor([ids]), positions_for(zero, 0, n), attention_mask(zero, n, n))
        ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids[len(prompt):])


def test_joins_and_leaves_match_a_plain_forward(any_family, monkeypatch):
    model, tok = any_family
    rng = random.Random(0)
    jobs = []
    for length in [3, 70, 1, *(rng.choice([3, 8, 20, 45, 70]) for _ in range(10))]:
        # Short and long prompts (a long one joining short ones), short and long replies (the slot reaching
        # the end of the context): the shared slot moves both ways.
        jobs.append(Job([rng.randrange(5, tok.vocab_size) for _ in range(length)],
                        max_tokens=rng.randint(1, CONTEXT - length), temperature=0))
    batcher = Batcher(model, tok, max_batch=4)
    moves = []
    real = batcher._relayout
    monkeypatch.setattr(batcher, "_relayout", lambda slot: (moves.append((batcher.slot, slot)), real(slot)))
    try:
        outs = [Collector() for _ in jobs]
        for job, out in zip(jobs, outs, strict=True):
            batcher.submit(job, out)
        for job, out in zip(jobs, outs, strict=True):
            assert out.wait().text[0] == reference(model, tok, job.prompt, job.max_tokens)
            assert out.reasons == ["length"]
    finally:
        batcher.close()
    assert any(new > old > 0 for old, new in moves), moves  # a long prompt joined: rows shifted right
    assert any(new < old for old, new in moves), moves  # the slot hit the context: rows shifted left


def test_queue_is_bounded_and_cancel_frees_the_row(toy):
    model, tok = toy
    batcher = Batcher(model, tok, max_batch=1, max_queue=1)
    try:
        started = threading.Event()
        first = Collector(on_text=lambda c: started.set())
        ticket = batcher.submit(Job(tok.prompt_ids("hi"), max_tokens=80), first)
        assert started.wait(30)
        second = Collector()
        batcher.submit(Job(tok.prompt_ids("hi"), max_tokens=3), second)
        with pytest.raises(QueueFull):
            batcher.submit(Job(tok.prompt_ids("hi"), max_tokens=3), Collector())
        with pytest.raises(ValueError):
            batcher.submit(Job(tok.prompt_ids("hi"), max_tokens=3, n=2), Collector())
        batcher.cancel(ticket)
        assert second.wait().reasons == ["length"]
        assert not first.done.is_set()  # a cancelled job is told nothing more: its client is gone
    finally:
        batcher.close()


def test_n_choices_share_one_prefill_and_sample_apart(toy):
    model, tok = toy
    batcher = Batcher(model, tok, max_batch=8)
    try:
        prompt = tok.prompt_ids("one two")
        both = Collector(3)
        batcher.submit(Job(prompt, max_tokens=12, n=3, temperature=1.0, top_p=1.0, seed=7), both)
        alone = [Collector() for _ in range(3)]
        for i, out in enumerate(alone):  # choice i samples as a single request with seed 7 + i
            batcher.submit(Job(prompt, max_tokens=12, temperature=1.0, top_p=1.0, seed=7 + i), out)
        assert both.wait().text == [out.wait().text[0] for out in alone]
        assert len(set(both.text)) == 3
    finally:
        batcher.close()


def test_think_split_streamed_equals_whole():
    rng = random.Random(1)
    for text in ["abc</think>\n\nanswer", "no tag </thi", "</think>", "a</think>b</think>c", "x<</think>\n"]:
        whole = split_thinking(text)
        for _ in range(30):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, 4)))
            split, got = ThinkSplit(), ["", ""]
            for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
                thought, answer = split.push(text[a:b])
                got = [got[0] + thought, got[1] + answer]
            assert (got[0] + split.finish(), got[1]) == whole
    assert split_thinking("abc</think>\n\nanswer") == ("abc", "answer")
    assert split_thinking("never closed") == ("never closed", "")


def test_stream_decoder_equals_whole_decode(toy):
    _, tok = toy
    ids = tok.encode("naïve café — 1+2=3 ✓ </think> done") + [250, 251, 252]
    decoder = StreamDecoder(tok)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == tok.decode(ids)
