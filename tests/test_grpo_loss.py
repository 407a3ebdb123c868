"""GRPO advantages and loss against values worked out with plain Python floats."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pocketr1.train.grpo_loss import fill_informative, group_advantages, grpo_loss, informative_groups, overlong_penalty

# --- advantages ---------------------------------------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.0, 1.0,  # group 0: mean 0.5
           0.5, 0.5, 0.5, 0.5,  # group 1: all equal, nothing to learn
           1.0, 0.0, 0.0, 0.0]  # group 2: mean 0.25
G = 4


def test_grpo_advantages_are_normalised_by_the_unbiased_std():
    got = group_advantages(torch.tensor(REWARDS), G, "grpo").tolist()
    expected = []
    for g in range(3):
        group = REWARDS[g * G:(g + 1) * G]
        mean, std = sum(group) / G, statistics.stdev(group)  # stdev: divides by G - 1
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert got == pytest.approx(expected, abs=1e-6)
    # The same numbers written out: group 0 has std sqrt(1/3), group 2 has std 0.5.
    assert got[0] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), abs=1e-6)
    assert got[4:8] == [0.0] * 4
    assert got[8] == pytest.approx(0.75 / 0.5001, abs=1e-6)


def test_dapo_advantages_match_grpo():
    rewards = torch.tensor(REWARDS)
    assert torch.equal(group_advantages(rewards, G, "dapo"), group_advantages(rewards, G, "grpo"))


def test_dr_grpo_advantages_are_only_mean_centred():
    got = group_advantages(torch.tensor(REWARDS), G, "dr_grpo").tolist()
    assert got == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.75, -0.25, -0.25, -0.25], abs=1e-7)


# --- loss ---------------------------------------------------------------------------------------------------

EPS_LOW, EPS_HIGH, BETA, BUDGET = 0.2, 0.28, 0.1, 8
MASK = [[1, 1, 1],
        [1, 1, 0]]  # sequence 1 has two tokens; its third slot is padding
ADV = [1.0, -0.5]
LOGP = [[-1.0, -0.5, -2.0],
        [-0.3, -1.2, -9.0]]
RATIO = [[1.0, 1.5, 0.9],  # 1.5 with A > 0: above 1 + eps_high, the clip is active
         [0.5, 1.4, 7.0]]  # 0.5 with A < 0: below 1 - eps_low, active; 1.4 with A < 0: outside, inactive
OLD = [[lp - math.log(r) for lp, r in zip(row_lp, row_r, strict=True)]
       for row_lp, row_r in zip(LOGP, RATIO, strict=True)]
REF = [[-1.2, -0.4, -2.0],
       [-0.1, -1.0, 0.0]]


def token_loss(logp: float, old: float, ref: float, adv: float) -> tuple[float, float, bool]:
    """Per-token GRPO loss, its k3 KL, and whether the clipped term was taken."""
    ratio = math.exp(logp - old)
    unclipped = ratio * adv
    clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH) * adv
    d = ref - logp
    kl = math.exp(d) - d - 1
    return -min(unclipped, clipped) + BETA * kl, kl, clipped < unclipped


def expected(variant: str) -> tuple[float, float, float]:
    per_seq_sums, per_seq_lengths, kls, clips = [], [], [], []
    for i in range(2):
        total, n = 0.0, 0
        for t in range(3):
            if MASK[i][t]:
                loss, kl, clip = token_loss(LOGP[i][t], OLD[i][t], REF[i][t], ADV[i])
                total, n = total + loss, n + 1
                kls.append(kl)
                clips.append(clip)
        per_seq_sums.append(total)
        per_seq_lengths.append(n)
    if variant == "grpo":  # mean over each sequence's tokens, then over sequences
        value = sum(s / n for s, n in zip(per_seq_sums, per_seq_lengths, strict=True)) / 2
    elif variant == "dr_grpo":  # sum over tokens / the generation budget, then mean over sequences
        value = sum(s / BUDGET for s in per_seq_sums) / 2
    else:  # dapo: one mean over every token in the batch
        value = sum(per_seq_sums) / sum(per_seq_lengths)
    return value, sum(kls) / len(kls), sum(clips) / len(clips)


def call(variant: str, **overrides):
    args = dict(logp=torch.tensor(LOGP), old_logp=torch.tensor(OLD), ref_logp=torch.tensor(REF),
                advantages=torch.tensor(ADV), mask=torch.tensor(MASK, dtype=torch.float), variant=variant,
                eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, budget=BUDGET)
    return grpo_loss(**(args | overrides))


def test_the_example_exercises_both_clips():
    # Sanity of the hand-made batch: one active high clip, one active low clip, one inactive out-of-range.
    assert [token_loss(LOGP[i][t], OLD[i][t], REF[i][t], ADV[i])[2] for i, t in
            [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]] == [False, True, False, True, False]


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_loss_matches_hand_computation(variant):
    value, kl, clipped = expected(variant)
    parts = call(variant)
    assert parts.loss.item() == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert parts.kl == pytest.approx(kl, rel=1e-5)
    assert parts.clipped == pytest.approx(clipped)
    assert parts.clipped == pytest.approx(2 / 5)


def test_grpo_value_written_out():
    """The grpo case with every number spelled out, as a check on the helper above."""
    kl = lambda d: math.exp(d) - d - 1  # noqa: E731
    seq0 = [-1.0 * 1.0 + 0.1 * kl(-0.2),  # ratio 1: -ρA
            -1.28 * 1.0 + 0.1 * kl(0.1),  # ratio 1.5 clipped to 1.28
            -0.9 * 1.0 + 0.1 * kl(0.0)]  # ratio 0.9: inside the range
    seq1 = [-(0.8 * -0.5) + 0.1 * kl(0.2),  # ratio 0.5 clipped up to 0.8 (A < 0 takes the smaller)
            -(1.4 * -0.5) + 0.1 * kl(0.2)]  # ratio 1.4 with A < 0: the unclipped term is smaller
    value = (sum(seq0) / 3 + sum(seq1) / 2) / 2
    assert call("grpo").loss.item() == pytest.approx(value, rel=1e-5)


def test_masked_tokens_do_not_count():
    changed = [row[:] for row in LOGP]
    changed[1][2] = 5.0  # the padding slot: any value must give the same loss
    for variant in ("grpo", "dr_grpo", "dapo"):
        changed_loss = call(variant, logp=torch.tensor(changed)).loss.item()
        assert changed_loss == pytest.approx(call(variant).loss.item())


def test_no_kl_term_without_reference_or_beta():
    base = call("grpo", ref_logp=None)
    assert base.kl == 0.0
    assert call("grpo", beta=0.0).loss.item() == pytest.approx(base.loss.item())
    assert call("grpo").loss.item() > base.loss.item()  # k3 KL is non-negative and here positive


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="ppo"):
        call("ppo")


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_gradient_is_the_policy_gradient(variant):
    """On-policy (ρ = 1) and β = 0, d loss / d logp_t = -A_i / |o_i| / N for grpo (N sequences),
    -A_i / budget / N for dr_grpo and -A_i / (all tokens) for dapo; zero on padding."""
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.float)
    parts = grpo_loss(logp, logp.detach(), None, torch.tensor(ADV), mask, variant, EPS_LOW, EPS_HIGH,
                      beta=0.0, budget=BUDGET)
    parts.loss.backward()
    lengths = [sum(row) for row in MASK]
    want = []
    for i in range(2):
        denominator = {"grpo": lengths[i] * 2, "dr_grpo": BUDGET * 2, "dapo": sum(lengths)}[variant]
        want.append([-ADV[i] / denominator if MASK[i][t] else 0.0 for t in range(3)])
    torch.testing.assert_close(logp.grad, torch.tensor(want), atol=1e-7, rtol=1e-6)
    assert parts.clipped == 0.0


# --- DAPO's soft overlong penalty ---------------------------------------------------------------------------

@pytest.mark.parametrize(("length", "expected"), [
    (0, 0.0), (10, 0.0), (15, 0.0),  # up to budget - cache = 15 tokens: no penalty
    (16, -0.2), (18, -0.6), (19, -0.8),  # (15 - length) / 5 inside the last 5 tokens
    (20, -1.0),  # cut off at the budget
    (25, -1.0),  # never below -1
])
def test_overlong_penalty_by_hand(length, expected):
    assert overlong_penalty(length, budget=20, cache=5) == pytest.approx(expected)


def test_overlong_penalty_off_without_a_cache():
    assert [overlong_penalty(n, budget=20, cache=0) for n in (0, 19, 20, 40)] == [0.0] * 4


def test_shaped_reward_sums_the_terms():
    """accuracy + format_weight·format + language_weight·consistency + overlong penalty, on one sample."""
    from pocketr1.config import GRPOConfig
    from pocketr1.tasks.base import Problem
    from pocketr1.train.reward_shaping import shaped_reward

    problem = Problem("language", "Add 1 and 2. Think in English.", "3", {"terms": [1, 2], "script": "latin"})
    text = "one plus two is тхрее\n</think>\n<answer>3</answer>"  # 12 Latin letters, 5 Cyrillic
    gc = GRPOConfig(format_weight=0.1, language_weight=0.5, overlong_cache=4, max_new_tokens=20)
    reward, accuracy = shaped_reward(problem, text, finished=True, n_tokens=18, gc=gc)
    assert accuracy == 1.0
    assert reward == pytest.approx(1.0 + 0.1 * 1.0 + 0.5 * 12 / 17 + (16 - 18) / 4)
    plain = GRPOConfig(format_weight=0.1, max_new_tokens=20)  # both extra terms off
    assert shaped_reward(problem, text, True, 18, plain)[0] == pytest.approx(1.1)
    wrong = text.replace("<answer>3</answer>", "<answer>4</answer>")
    assert shaped_reward(problem, wrong, True, 18, gc) == (pytest.approx(0.1 + 0.5 * 12 / 17 - 0.5), 0.0)


# --- DAPO's dynamic sampling --------------------------------------------------------------------------------

def test_informative_groups_by_hand():
    # REWARDS: group 0 mixed, group 1 all 0.5, group 2 mixed
    assert informative_groups(torch.tensor(REWARDS), G).tolist() == [True, False, True]


def scripted_sampler(rounds: list[list[tuple[str, list[float]]]]):
    """Hands out the scripted rounds of (group name, rewards) and records how many groups each asked for."""
    asked: list[int] = []

    def sample_round(r: int, n: int):
        asked.append(n)
        return rounds[r][:n]

    return sample_round, asked


ROUNDS = [[("a", [1, 0]), ("b", [0, 0]), ("c", [1, 1]), ("d", [0, 1])],  # a, d informative
          [("e", [0, 0]), ("f", [1, 0])],  # f informative
          [("g", [0.5, 0]), ("h", [1, 0])]]  # g (only one is asked for)


def test_dynamic_sampling_refills_until_the_batch_is_full():
    sample_round, asked = scripted_sampler(ROUNDS)
    kept, stats = fill_informative(sample_round, needed=4, max_rounds=5)
    assert kept == ["a", "d", "f", "g"]
    assert asked == [4, 2, 1]  # each round asks only for the groups still missing
    assert stats == {"groups_drawn": 7, "groups_informative": 4, "rounds": 3}


def test_dynamic_sampling_stops_after_max_rounds():
    sample_round, asked = scripted_sampler(ROUNDS)
    kept, stats = fill_informative(sample_round, needed=4, max_rounds=2)
    assert kept == ["a", "d", "f"] and asked == [4, 2]
    assert stats == {"groups_drawn": 6, "groups_informative": 3, "rounds": 2}


def test_dynamic_sampling_without_any_informative_group_keeps_the_first_round():
    sample_round, _ = scripted_sampler([[("x", [0, 0]), ("y", [1, 1])], [("z", [1, 1])]])
    kept, stats = fill_informative(sample_round, needed=2, max_rounds=2)
    assert kept == ["x", "y"] and stats["groups_informative"] == 0
