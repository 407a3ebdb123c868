"""GRPO's update batch without padding or repeated prompts.

A rollout holds G completions of each prompt, left-padded into one rectangle (about half of it padding),
with the prompt repeated in every row. Here each group is laid out once as
`[prompt, completion 1, completion 2, ...]`: every completion attends to the prompt and to itself only (a
"tree" mask), and its positions continue from the prompt's end, so each token sees exactly the context it
was sampled in and the log-probabilities equal the padded batch's. The last token of each completion is
left out of the input: it only ever predicts past the end. Rows have a fixed length (`ROW_LENGTH`): a
group longer than that is split over several, its prompt repeated; shorter ones share a row. For the
default GRPO batch (16 prompts x 8, ~20-token prompts and completions) that is ~30% of the rectangle's
positions, and the model's head runs only where a completion token is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Row length (slots; longer when one prompt + completion needs it). Attention costs each row's length
# squared (the CPU kernels compute the masked-out scores too), everything else costs slots, and shorter
# rows repeat prompts more often: 128 was the fastest of 96-400 for the default GRPO batch on CPU.
ROW_LENGTH = 128


@dataclass(slots=True)
class TreeBatch:
    ids: torch.Tensor  # [rows, length]
    positions: torch.Tensor  # [rows, length]
    mask: torch.Tensor  # [rows, 1, length, length] boolean, True = may attend
    source: torch.Tensor  # [n] flat slot (row * length + column) whose state predicts each completion token
    targets: torch.Tensor  # [n] the completion tokens
    dest: torch.Tensor  # [n] flat index of each token in the [sequences, T] output
    shape: tuple[int, int]  # (sequences, T): the padded layout the log-probabilities are returned in


def pack_groups(ids: torch.Tensor, pad_left: torch.Tensor, completion_mask: torch.Tensor, prompt_len: int,
                seqs: torch.Tensor, length: int = 0) -> TreeBatch:
    """Tree-pack sequences `seqs` of a left-padded batch (`ids` [N, prompt_len + T], `completion_mask`
    [N, T] with each row's tokens first) into rows of `length` slots (0: `ROW_LENGTH`, or the longest
    prompt + completion if that is longer). Sequences with the same prompt tokens share a copy of it."""
    ids_l, pad_l = ids[seqs].tolist(), pad_left[seqs].tolist()
    counts = completion_mask[seqs].sum(dim=1).long().tolist()
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt tokens -> output rows (positions in `seqs`)
    for out_row, (row, pad) in enumerate(zip(ids_l, pad_l)):
        groups.setdefault(tuple(row[pad:prompt_len]), []).append(out_row)
    inputs = [max(n - 1, 0) for n in counts]  # a completion's last token predicts nothing: not an input
    length = max(length or ROW_LENGTH, *(len(p) + inputs[r] for p, members in groups.items() for r in members))
    # A segment is a prompt and some of its completions, at most a row long: a group longer than a row is
    # split and its prompt repeated. Segments, then rows, are filled first fit, longest first.
    segments: list[tuple[tuple[int, ...], list[int], int]] = []
    for prompt, members in groups.items():
        parts = _first_fit(members, [inputs[r] for r in members], length - len(prompt))
        segments += [(prompt, part, len(prompt) + sum(inputs[r] for r in part)) for part in parts]
    rows = _first_fit(segments, [size for *_, size in segments], length)
    return _lay_out(rows, ids_l, counts, prompt_len, length, completion_mask.shape[1], ids.device)


def _first_fit(items: list, sizes: list[int], capacity: int) -> list[list]:
    """Bins of at most `capacity` (first fit, largest first; an item never fits a bin in part)."""
    bins: list[list] = []
    room: list[int] = []
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):
        fit = next((b for b, free in enumerate(room) if free >= sizes[i]), None)
        if fit is None:
            bins.append([])
            room.append(capacity)
            fit = len(bins) - 1
        bins[fit].append(items[i])
        room[fit] -= sizes[i]
    return bins


def _lay_out(rows: list, ids_l: list[list[int]], counts: list[int], prompt_len: int, length: int, width: int,
             device: torch.device) -> TreeBatch:
    tokens = [[0] * length for _ in rows]
    positions = [[0] * length for _ in rows]
    segment_of = [[-1] * length for _ in rows]  # which segment a slot belongs to (-1: padding)
    branch = [[-1] * length for _ in rows]  # 0: the prompt, k: the segment's k-th completion
    source, targets, dest = [], [], []
    n_segment = 0
    for b, segments in enumerate(rows):
        col = 0
        for prompt, members, _ in segments:
            p = len(prompt)
            tokens[b][col:col + p] = prompt
            positions[b][col:col + p] = range(p)
            segment_of[b][col:col + p] = [n_segment] * p
            branch[b][col:col + p] = [0] * p
            last_prompt, col = b * length + col + p - 1, col + p
            for k, out_row in enumerate(members, start=1):
                n = counts[out_row]
                if not n:
                    continue
                completion = ids_l[out_row][prompt_len:prompt_len + n]
                tokens[b][col:col + n - 1] = completion[:-1]
                positions[b][col:col + n - 1] = range(p, p + n - 1)
                segment_of[b][col:col + n - 1] = [n_segment] * (n - 1)
                branch[b][col:col + n - 1] = [k] * (n - 1)
                # Token 0 is predicted by the prompt's last state, token j by the completion's token j-1.
                source += [last_prompt, *range(b * length + col, b * length + col + n - 1)]
                targets += completion
                dest += range(out_row * width, out_row * width + n)
                col += n - 1
            n_segment += 1
    segment_t, branch_t = torch.tensor(segment_of), torch.tensor(branch)
    slot = torch.arange(length)
    causal = slot[None, :] <= slot[:, None]  # [query, key]
    same = (segment_t[:, :, None] == segment_t[:, None, :]) & (segment_t[:, :, None] >= 0)
    on_path = (branch_t[:, None, :] == 0) | (branch_t[:, :, None] == branch_t[:, None, :])
    # A padding query sees only itself: a row with nothing to attend to would give NaNs.
    mask = (same & on_path & causal) | torch.eye(length, dtype=torch.bool)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return TreeBatch(as_long(tokens), as_long(positions), mask[:, None].to(device), as_long(source),
                     as_long(targets), as_long(dest), (len(ids_l), width))


def scatter_logprobs(tree: TreeBatch, logp: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities [n] back into the padded [sequences, T] layout (zeros elsewhere)."""
    out = logp.new_zeros(tree.shape[0] * tree.shape[1]).scatter(0, tree.dest, logp)
    return out.view(tree.shape)

