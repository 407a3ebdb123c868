"""Splitting a streamed R1 completion into its thinking and its answer, for `chat` and `serve` alike.

R1's generation prompt ends in `<think>\\n`, so a completion starts inside the thinking block: text before
`</think>` is reasoning, text after it is the answer, and a completion that never closes the block is all
reasoning (vLLM's R1 parser rule). Text arrives in pieces and the tag may be split across them, so a tail
that could still become `</think>` is held back until the next piece (or the end) decides it.
"""

from __future__ import annotations

THINK_END = "</think>"


def partial_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (what must be held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplit:
    """Feed pieces of a completion; get back (reasoning, answer) pieces, never the tag itself.

    `trim`: drop the newlines that open the answer (R1 writes `</think>\\n\\n`), as an API or a styled
    terminal shows the answer on its own; a plain-text log keeps them.
    """

    def __init__(self, trim: bool = True):
        self.pending = ""
        self.answering = False  # `</think>` has been seen
        self.trim = trim

    def push(self, piece: str) -> tuple[str, str]:
        if self.answering:
            return "", self._answer(piece)
        self.pending += piece
        if THINK_END not in self.pending:
            cut = len(self.pending) - partial_tail(self.pending, THINK_END)
            thought, self.pending = self.pending[:cut], self.pending[cut:]
            return thought, ""
        thought, _, rest = self.pending.partition(THINK_END)
        self.pending, self.answering = "", True
        return thought, self._answer(rest)

    def finish(self) -> str:
        """The reasoning still held back (a tail that turned out not to be the tag)."""
        thought, self.pending = self.pending, ""
        return thought

    def _answer(self, piece: str) -> str:
        if self.trim:
            piece = piece.lstrip("\n")
            self.trim = not piece  # keep trimming until the answer's first real character
        return piece


def split_thinking(text: str, trim: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a whole completion, exactly as streaming it through `ThinkSplit` gives."""
    split = ThinkSplit(trim)
    thought, answer = split.push(text)
    return thought + split.finish(), answer
