"""The tree-packed GRPO update (each prompt once, no padding) against the padded one it replaced: the same
log-probabilities, and the same losses and gradients for every variant, with a KL term and minibatches."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from pocketr1.config import build
from pocketr1.model import ModelConfig, Transformer, build_model
from pocketr1.model.transformer import attention_mask, positions_for
from pocketr1.train import grpo_batch, grpo_update
from pocketr1.train.grpo import Rollout
from pocketr1.train.grpo_batch import pack_groups
from pocketr1.train.grpo_loss import VARIANTS
from pocketr1.train.grpo_update import completion_logprobs, update

PAD, G, T = 0, 3, 7
# Groups 0 and 2 ask the same question (a duplicate draw): they may share one copy of the prompt.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [5, 6, 7], [13, 14]]
# Completion lengths: empty ones, full-width ones (unfinished), and everything between.
LENGTHS = [4, 0, 7, 1, 7, 3, 2, 5, 6, 0, 0, 3]


def padded_logprobs(model, batch: Rollout, rows: torch.Tensor, tree=None) -> torch.Tensor:
    """The padded implementation: the whole left-padded rectangle through the model, head on every slot (a
    packed `tree` is ignored)."""
    ids, pad_left = batch.ids[rows], batch.pad_left[rows]
    length = ids.shape[1]
    positions, mask = positions_for(pad_left, 0, length), attention_mask(pad_left, length, length)
    logits = model(ids, positions, mask)[:, batch.prompt_len - 1:-1].float()
    targets = ids[:, batch.prompt_len:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def tiny_model(seed: int, family: str = "qwen2") -> Transformer:
    model = build_model(ModelConfig(model_type=family, vocab_size=40, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64))
    model.init_weights(seed)
    return model


def make_rollout(seed: int = 0) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    prompt_len = max(map(len, PROMPTS))
    n = len(PROMPTS) * G
    ids = torch.full((n, prompt_len + T), PAD, dtype=torch.long)
    mask, pad_left = torch.zeros(n, T), torch.zeros(n, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        prompt = PROMPTS[i // G]
        pad_left[i] = prompt_len - len(prompt)
        ids[i, pad_left[i]:prompt_len] = torch.tensor(prompt)
        ids[i, prompt_len:prompt_len + length] = torch.randint(1, 40, (length,), generator=gen)
        mask[i, :length] = 1.0
    rewards = torch.rand(n, generator=gen)
    rewards[3 * G:] = 0.5  # the last group's rewards are all equal: DAPO drops it
    return Rollout(ids, pad_left, mask, prompt_len, rewards, rewards.clone(), mask.sum(1), torch.zeros(n),
                   [""] * n)


def _real_slots(tree) -> int:
    """Slots that take part in attention beyond themselves (padding sees and is seen by itself only)."""
    mask = tree.mask[:, 0]
    return int(((mask.sum(-1) > 1) | (mask.sum(-2) > 1)).sum())


@pytest.mark.parametrize("row_length", [0, 12], ids=["roomy-rows", "split-groups"])
@pytest.mark.parametrize("rows", [list(range(12)), [4, 5, 6, 7, 8], [11, 0, 6, 3, 7]],
                         ids=["all", "a-minibatch", "out-of-order"])
def test_packed_logprobs_equal_the_padded_ones(rows, row_length, monkeypatch):
    monkeypatch.setattr(grpo_batch, "ROW_LENGTH", row_length or grpo_batch.ROW_LENGTH)
    model, batch, rows = tiny_model(1), make_rollout(), torch.tensor(rows)
    got = completion_logprobs(model, batch, rows)
    want = padded_logprobs(model, batch, rows) * batch.mask[rows]
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert (got[batch.mask[rows] == 0] == 0).all()


def test_packed_logprobs_equal_the_padded_ones_for_deepseek_v3():
    """MLA attention and routed experts (each token routed on its own) see the same contexts packed."""
    model, batch, rows = tiny_model(4, "deepseek_v3"), make_rollout(seed=5), torch.arange(12)
    torch.testing.assert_close(completion_logprobs(model, batch, rows),
                               padded_logprobs(model, batch, rows) * batch.mask, atol=2e-6, rtol=1e-5)


def test_packing_lays_each_prompt_out_once_without_padding():
    batch = make_rollout()
    tree = pack_groups(batch.ids, batch.pad_left, batch.mask, batch.prompt_len, torch.arange(12))
    assert len(tree.targets) == int(batch.mask.sum())  # every completion token predicted once
    prompts = sum(len(p) for p in {tuple(p) for p in PROMPTS})  # 3 distinct prompts
    needed = prompts + sum(max(n - 1, 0) for n in LENGTHS)  # a completion's last token predicts nothing
    assert tree.ids.shape[0] == 1 and _real_slots(tree) == needed
    # Completion token j of sequence i sits at position len(prompt) + j and is predicted from the one before.
    seq, j = tree.dest // T, tree.dest % T
    prompt_lens = torch.tensor([len(PROMPTS[i // G]) for i in range(len(LENGTHS))])
    assert torch.equal(tree.positions.flatten()[tree.source], prompt_lens[seq] + j - 1)
    assert torch.equal(tree.targets, batch.ids[seq, batch.prompt_len + j])
    # Rows shorter than a group: the group's prompt is repeated in each row its completions spill into, and
    # rows stay as full as first fit gets them.
    short = pack_groups(batch.ids, batch.pad_left, batch.mask, batch.prompt_len, torch.arange(12), length=12)
    assert short.ids.shape[1] == 12 and _real_slots(short) > needed
    assert short.ids.numel() < batch.ids.numel() * 0.75


def _run_update(policy, reference, batch, cfg) -> tuple[list[list[torch.Tensor]], object]:
    """update() with plain SGD (gradients pass through linearly), recording each minibatch's gradients."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    grads: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(lambda opt, *_: grads.append([p.grad.clone() for p in policy.parameters()]))
    return grads, update(policy, reference, optimizer, batch, cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_matches_the_padded_update(variant, monkeypatch):
    """Loss, diagnostics and every minibatch's gradients equal the padded implementation's; with β > 0 and
    two minibatches, so the reference, the old-policy log-probs and the ratio's clip all take part."""
    cfg = build("tiny", [f"grpo.variant={variant}", "grpo.beta=0.05", "grpo.minibatches=2", f"grpo.group_size={G}",
                         "grpo.eps_high=0.28", f"grpo.max_new_tokens={T}", "dtype=float32"])
    batch, base = make_rollout(seed=2), tiny_model(3)
    reference = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():  # a policy that has drifted from the reference: the KL is not zero
        for p in base.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    runs = {}
    for name in ("padded", "packed"):
        with monkeypatch.context() as patch:
            if name == "padded":
                patch.setattr(grpo_update, "completion_logprobs", padded_logprobs)
            policy = copy.deepcopy(base)
            runs[name] = (*_run_update(policy, reference, batch, cfg), policy)
    (grads_a, parts_a, policy_a), (grads_b, parts_b, policy_b) = runs["padded"], runs["packed"]
    assert len(grads_a) == len(grads_b) == 2
    torch.testing.assert_close(parts_b.loss, parts_a.loss, atol=1e-6, rtol=1e-5)
    assert parts_b.kl == pytest.approx(parts_a.kl, rel=1e-4, abs=1e-8) and parts_a.kl > 0
    assert parts_b.clipped == pytest.approx(parts_a.clipped) and parts_b.tokens == parts_a.tokens
    for step_a, step_b in zip(grads_a, grads_b):
        assert any(g.abs().sum() > 0 for g in step_a)
        for ga, gb in zip(step_a, step_b):
            torch.testing.assert_close(gb, ga, atol=1e-6, rtol=1e-4)
    for pa, pb in zip(policy_a.parameters(), policy_b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pass_tokens", [0, 6], ids=["one-pass", "passes-of-6-tokens"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_split_over_threads_matches_one_thread(variant, pass_tokens, monkeypatch):
    """On two intra-op threads the update runs each minibatch as two halves on two Python threads and sums their
    gradients (grpo_update.py): loss, diagnostics and gradients equal one thread's whole-minibatch backward.
    With `grpo.pass_tokens` the minibatch runs in passes of at most that many tokens, on either path."""
    one_pass = build("tiny", [f"grpo.variant={variant}", "grpo.beta=0.05", "grpo.minibatches=2",
                              f"grpo.group_size={G}", f"grpo.max_new_tokens={T}", "dtype=float32"])
    cfg = build("tiny", [f"grpo.variant={variant}", "grpo.beta=0.05", "grpo.minibatches=2", f"grpo.group_size={G}",
                         f"grpo.max_new_tokens={T}", "dtype=float32", f"grpo.pass_tokens={pass_tokens}"])
    batch, base = make_rollout(seed=5), tiny_model(6)
    reference = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
    seen: set[str] = set()
    calls: list[float] = []  # completion tokens of each rows_loss call
    rows_loss = grpo_update.rows_loss

    def recording(*args, **kwargs):
        seen.add(threading.current_thread().name)
        calls.append(float(args[2].mask[args[3]].sum()))  # (policy, reference, batch, rows, ...)
        return rows_loss(*args, **kwargs)

    monkeypatch.setattr(grpo_update, "rows_loss", recording)
    runs, tokens = {}, {}
    before = torch.get_num_threads()
    try:
        for threads, config in ((0, one_pass), (1, cfg), (2, cfg)):  # 0: one thread, the whole minibatch at once
            torch.set_num_threads(max(threads, 1))
            policy = copy.deepcopy(base)
            calls.clear()
            runs[threads] = (*_run_update(policy, reference, batch, config), policy)
            tokens[threads] = list(calls)
    finally:
        torch.set_num_threads(before)
    assert {"grpo-update-0", "grpo-update-1"} <= seen and threading.main_thread().name in seen
    assert len(tokens[0]) == 2  # one call per minibatch
    if pass_tokens:  # smaller passes, covering every token once
        for threads in (1, 2):
            assert len(tokens[threads]) >= 2 * threads and max(tokens[threads]) < max(tokens[0]) / 2
            assert sum(tokens[threads]) == sum(tokens[0])
    for threads in (1, 2):
        _compare(runs[0], runs[threads])


def _compare(run_a, run_b) -> None:
    """Loss, diagnostics, every minibatch's gradients and the weights after of two update runs agree."""
    (grads_1, parts_1, policy_1), (grads_2, parts_2, policy_2) = run_a, run_b
    torch.testing.assert_close(parts_2.loss, parts_1.loss.detach(), atol=1e-6, rtol=1e-5)
    assert parts_2.kl == pytest.approx(parts_1.kl, rel=1e-4) and parts_1.kl > 0
    assert parts_2.clipped == pytest.approx(parts_1.clipped) and parts_2.tokens == parts_1.tokens
    for step_1, step_2 in zip(grads_1, grads_2, strict=True):
        for g1, g2 in zip(step_1, step_2):
            torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4)
    for p1, p2 in zip(policy_1.parameters(), policy_2.parameters()):
        torch.testing.assert_close(p2, p1, atol=1e-6, rtol=1e-4)


def test_balanced_shares_split_tokens_evenly_in_contiguous_runs():
    tokens = torch.tensor([10.0, 10, 10, 50, 5, 5, 30, 2])
    shares = grpo_update.balanced_shares(tokens, 2)
    assert torch.equal(torch.cat(shares), torch.arange(len(tokens)))  # every row once, in order
    sums = [float(tokens[s].sum() + len(s)) for s in shares]
    assert abs(sums[0] - sums[1]) <= 50 + 1  # no better cut exists than one row's cost away
    assert [len(s) for s in grpo_update.balanced_shares(torch.ones(128), 2)] == [64, 64]
    assert all(len(s) for s in grpo_update.balanced_shares(torch.tensor([100.0, 1, 1]), 3))  # never an empty share
