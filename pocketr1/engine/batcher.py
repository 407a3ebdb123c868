"""Continuous batching for serving: requests join the running batch at token boundaries and leave it the
moment they finish or their client goes away.

One engine thread owns the model and one cache buffer per cached tensor (keys and values, or MLA's latent
and rope key), each [layers, max_batch, heads, capacity, dim], whose first `n` rows are the running
sequences. As in `generate`, every row writes the cache at one shared slot:
a row's text ends at `slot`, and its `pad_left` = slot - its length hides what lies before it. A new
request is prefilled alone (batch 1, its own small cache) and its keys/values are copied into free rows so
its prompt ends at the current slot; its first token comes from that prefill. When the slot must move (a
prompt longer than the slot, or no room left to grow), every row is shifted by the same amount, which
changes no position and no attention pattern: a row's outputs depend only on its own tokens.

Each sequence samples with its own `torch.Generator` (seeded by the request), so a seeded request gives
the same text whatever else is in the batch.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pocketr1.engine.generate import decode_threads, weight_count
from pocketr1.engine.sampling import sample_next
from pocketr1.model.transformer import Transformer
from pocketr1.thinking import partial_tail
from pocketr1.tokenizer import ChatTokenizer, StreamDecoder

CHUNK = 32  # the buffer's capacity grows in steps of this many slots (a decode step attends over all of it)

# What a job's sink receives, from the engine thread:
#   ("text", choice, text)              a piece of a choice's completion
#   ("done", choice, reason, tokens)    reason "stop" or "length"; tokens generated for that choice
#   ("error", message)                  the job failed; nothing more follows
Event = tuple


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass(slots=True)
class Job:
    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None  # choice i samples with seed + i; None: fresh randomness
    stop: tuple[str, ...] = ()  # stop strings (the text stops before them); stop tokens come from the tokenizer


class Ticket:
    """A submitted job: the handle `cancel` takes."""

    def __init__(self, job: Job, sink: Callable[[Event], None]):
        self.job, self.sink = job, sink
        self.cancelled = False
        self.live = job.n  # choices not finished yet


class Seq:
    """One choice of a job, running in one cache row."""

    def __init__(self, ticket: Ticket, choice: int, pad_left: int, tokenizer: ChatTokenizer, device):
        job = ticket.job
        self.ticket, self.choice, self.pad_left = ticket, choice, pad_left
        seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed((seed + choice) % 2**64)
        self.greedy = job.temperature <= 0 or job.top_p <= 0
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""  # text held back: it may be the start of a stop string
        self.count = 0
        self.last = -1  # the token to feed at the next step


class Batcher:
    def __init__(self, model: Transformer, tokenizer: ChatTokenizer, max_batch: int = 32, max_queue: int = 256,
                 dtype: torch.dtype = torch.float32):
        self.model = model.frozen(dtype)  # fused, prepacked weights; the same kernels at every batch size
        self.weights = weight_count(model)  # decode steps below the threshold run on one thread, as generate's
        self.cfg, self.tok = model.config, tokenizer
        self.device = model.model.embed_tokens.weight.device
        self.dtype, self.max_batch, self.max_queue = dtype, max_batch, max_queue
        self.max_len = self.cfg.max_position_embeddings
        self.stops = set(tokenizer.stop_ids)
        self.seqs: list[Seq] = []  # seqs[i] runs in cache row i
        self.slot = 0
        # The model's own cache class says what it caches: name -> [layers, 0, heads, 0, dim].
        proto = self.model.new_cache(0, self.max_len, dtype, self.device)
        self.shapes = {name: getattr(proto, name).shape for name in proto.names}
        self.buf = self._buffer(0)
        self.waiting: deque[Ticket] = deque()
        self.generated = 0  # tokens generated since start (for /health)
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="pocketr1-engine", daemon=True)
        self.thread.start()

    # --- called from any thread -------------------------------------------------------------------------

    def submit(self, job: Job, sink: Callable[[Event], None]) -> Ticket:
        if not 1 <= job.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch}.")
        if not job.prompt or len(job.prompt) + job.max_tokens > self.max_len or job.max_tokens < 1:
            raise ValueError("the prompt and max_tokens must fit in the model's context.")
        ticket = Ticket(job, sink)
        with self.cond:
            if self.closing:
                raise QueueFull("the server is shutting down.")
            if len(self.waiting) >= self.max_queue:  # requests whose clients left do not count
                self.waiting = deque(t for t in self.waiting if not t.cancelled)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting.")
            self.waiting.append(ticket)
            self.cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a job now (its client left): its rows are free from the next token boundary on."""
        with self.cond:
            ticket.cancelled = True
            self.cond.notify()

    def stats(self) -> dict:
        return {"running": len(self.seqs), "waiting": len(self.waiting), "generated_tokens": self.generated}

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # --- the engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closing and not self.seqs and not self.waiting:
                    self.cond.wait()
                if self.closing:
                    break
            try:
                with torch.inference_mode():
                    self._drop([s for s in self.seqs if s.ticket.cancelled])
                    self._admit()
                    if self.seqs:
                        with decode_threads(self.weights, len(self.seqs)):
                            self._step()
            except Exception as e:  # e.g. out of memory: fail the running jobs, keep serving new ones
                for ticket in self._running_tickets():
                    ticket.sink(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.seqs, self.slot, self.buf = [], 0, self._buffer(0)
        with self.cond:
            for ticket in [*self.waiting, *self._running_tickets()]:
                ticket.sink(("error", "the server is shutting down."))
            self.waiting.clear()

    def _admit(self) -> None:
        """Move waiting jobs into free rows, first come first served, while their choices fit."""
        while True:
            with self.cond:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                if not self.waiting or self.waiting[0].job.n > self.max_batch - len(self.seqs):
                    return
                ticket = self.waiting.popleft()
            try:
                self._start(ticket)
            except Exception as e:  # this job alone fails (its rows were not taken yet)
                ticket.sink(("error", f"prefill failed: {type(e).__name__}: {e}"))

    def _running_tickets(self) -> list[Ticket]:
        return list({id(s.ticket): s.ticket for s in self.seqs}.values())

    def _start(self, ticket: Ticket) -> None:
        job, length = ticket.job, len(ticket.job.prompt)
        cache = self.model.new_cache(1, length, self.dtype, self.device)
        ids = torch.tensor([job.prompt], device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        # One unpadded row: plain causal attention (mask None), no [length, length] mask to build; a single
        # token goes the model's decode path, which takes an explicit mask.
        mask = None if length > 1 else torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        hidden = self.model.hidden(ids, positions, mask, cache)
        logits = self.model.lm_head(hidden[:, -1])
        if length > self.slot:  # the prompt must end at the shared slot: move every row right
            self._relayout(length)
        row, end = len(self.seqs), self.slot
        for name, buf in self.buf.items():
            buf[:, row:row + job.n, :, end - length:end] = getattr(cache, name)[:, :, :, :length]
        new = [Seq(ticket, i, end - length, self.tok, self.device) for i in range(job.n)]
        self.seqs.extend(new)
        self._sample(new, logits.expand(job.n, -1))

    def _step(self) -> None:
        if self.slot + 1 > self._capacity():  # no room for this step's keys
            lo = min(s.pad_left for s in self.seqs)
            # Shift everything left when that frees a chunk or more (or when the context is full), else grow.
            self._relayout(self.slot - lo if lo >= CHUNK or self.slot + 1 > self.max_len else self.slot)
        n, cap = len(self.seqs), self._capacity()
        cache = self.model.new_cache(0, self.max_len, self.dtype, self.device)
        # The cache views our first n rows: the model writes this step's keys straight into the buffers.
        for name, buf in self.buf.items():
            setattr(cache, name, buf[:, :n])
        cache.length = self.slot
        pad_left = torch.tensor([s.pad_left for s in self.seqs], device=self.device)
        k_idx = torch.arange(cap, device=self.device)
        mask = ((k_idx >= pad_left[:, None]) & (k_idx <= self.slot))[:, None, None]
        tokens = torch.tensor([[s.last] for s in self.seqs], device=self.device)
        logits = self.model(tokens, (self.slot - pad_left)[:, None], mask, cache)[:, -1]
        self.slot += 1
        self._sample(list(self.seqs), logits)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        """Draw each seq's next token from its row of `logits` (greedy rows in one go), then act on it."""
        groups: dict[tuple[float, float], list[int]] = {}  # rows with the same settings, sampled together
        for i, s in enumerate(seqs):
            job = s.ticket.job
            groups.setdefault((0.0, 1.0) if s.greedy else (job.temperature, job.top_p), []).append(i)
        tokens = [0] * len(seqs)
        for (temperature, top_p), rows in groups.items():
            # One generator per row: a row's draws do not depend on the rows it shares the batch with.
            picked = sample_next(logits[rows], temperature, top_p, 0, [seqs[i].generator for i in rows])
            for i, tok in zip(rows, picked.tolist(), strict=True):
                tokens[i] = tok
        self.generated += len(seqs)
        self._drop([s for s, tok in zip(seqs, tokens, strict=True) if not self._accept(s, tok)])

    def _accept(self, s: Seq, tok: int) -> bool:
        """Record `tok` for `s` and send its text on; False once `s` has finished."""
        if s.ticket.cancelled:
            return False
        if tok in self.stops:
            return self._finish(s, "stop")
        s.count += 1
        s.last = tok
        text = s.pending + s.decoder.push(tok)
        stops = s.ticket.job.stop
        hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
        if hits:
            s.pending = text[:min(hits)]
            return self._finish(s, "stop", flush=False)
        keep = max((partial_tail(text, stop) for stop in stops), default=0)
        s.pending = text[len(text) - keep:]
        if len(text) > keep:
            s.ticket.sink(("text", s.choice, text[:len(text) - keep]))
        # Fed next step, `tok` sits at position slot - pad_left: past the context it cannot go.
        if s.count >= s.ticket.job.max_tokens or self.slot - s.pad_left >= self.max_len:
            return self._finish(s, "length")
        return True

    def _finish(self, s: Seq, reason: str, flush: bool = True) -> bool:
        text = s.pending + (s.decoder.flush() if flush else "")  # not past a stop string
        if text:
            s.ticket.sink(("text", s.choice, text))
        s.ticket.sink(("done", s.choice, reason, s.count))
        s.ticket.live -= 1
        return False

    def _drop(self, gone: list[Seq]) -> None:
        """Free the rows of `gone`: the last running row moves into each hole, so rows stay packed."""
        for s in gone:
            row, last = self.seqs.index(s), len(self.seqs) - 1
            if row != last:
                for buf in self.buf.values():
                    buf[:, row] = buf[:, last]
                self.seqs[row] = self.seqs[last]
            self.seqs.pop()
        if not self.seqs:
            self.slot = 0

    def _buffer(self, capacity: int) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(layers, self.max_batch, heads, capacity, dim, dtype=self.dtype, device=self.device)
                for name, (layers, _, heads, _, dim) in self.shapes.items()}

    def _capacity(self) -> int:
        return next(iter(self.buf.values())).shape[3]

    def _relayout(self, slot: int) -> None:
        """Move the shared slot to `slot` (every row shifted alike) in a buffer sized for the next step."""
        capacity = min(self.max_len, -(-(slot + 1) // CHUNK) * CHUNK)
        new = self._buffer(capacity)
        if self.seqs:
            n, lo = len(self.seqs), min(s.pad_left for s in self.seqs)
            shift = slot - self.slot
            for name, buf in new.items():
                buf[:, :n, :, lo + shift:slot] = self.buf[name][:, :n, :, lo:self.slot]
            for s in self.seqs:
                s.pad_left += shift
        self.buf, self.slot = new, slot
