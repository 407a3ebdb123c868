"""The generation engine against `transformers` (greedy parity on a left-padded batch) and the sampler's
contract: seeded reproducibility, stop tokens, top-k and top-p."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pocketr1.engine import SamplingParams, generate, sample_next  # noqa: E402
from pocketr1.engine.generate import BATCH_ROWS  # noqa: E402
from pocketr1.model import load_model  # noqa: E402

VOCAB = 97
PAD = 0
# Different lengths (left padding), and enough rows for the batched path (the model's frozen copy).
PROMPTS = [[5, 17, 33, 2, 9, 41, 60, 7], [12, 80], [3, 3, 50, 22, 91], [44, 45, 46, 47],
           [70, 8, 19, 23, 5, 6]]
NEW = 12
assert len(PROMPTS) >= BATCH_ROWS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random Qwen2 (biases and norms randomized too: HF zero-initialises biases) and our load."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=1, pad_token_id=PAD)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # larger than HF's 0.02 init so next-token logits are decisive, not near-ties
                p.normal_(0.0, 0.3 if name.endswith("bias") else 0.15)
    folder = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(folder)
    return hf, load_model(folder, dtype=torch.float32)


def hf_greedy(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=PAD)
    return out[:, longest:].tolist()


def ours(model, prompts=PROMPTS, stop_ids=(), dtype=torch.float32, **kw) -> list:
    n = kw.pop("n", 1)
    params = SamplingParams(**({"temperature": 0.0, "max_new_tokens": NEW} | kw))
    return generate(model, prompts, params, list(stop_ids), n=n, pad_id=PAD, dtype=dtype)


def test_greedy_matches_transformers_on_left_padded_batch(models):
    hf, model = models
    got = ours(model)
    assert [c.ids for c in got] == hf_greedy(hf, PROMPTS, NEW)
    assert not any(c.finished for c in got)
    # One prompt at a time runs on the model itself rather than the batch's frozen copy: same tokens.
    assert [ours(model, [p])[0].ids for p in PROMPTS] == [c.ids for c in got]


def test_bf16_follows_float32_greedy(models):
    _, model = models
    got = ours(model, dtype=torch.bfloat16)
    # bf16 rounding may flip a near-tie late in a sequence, not the first decisive tokens.
    assert [c.ids[:3] for c in got] == [c.ids[:3] for c in ours(model)]
    assert all(len(c.ids) == NEW for c in got)


def test_frozen_copy_follows_weight_updates(models):
    """A GRPO policy changes in place between rollouts: the engine must not generate from stale weights."""
    _, base = models
    model = copy.deepcopy(base)
    before = [c.ids for c in ours(model)]
    with torch.no_grad():  # what an optimizer step does: in place, same tensors
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = [c.ids for c in ours(model)]
    assert after != before
    assert after == [ours(model, [p])[0].ids for p in PROMPTS]  # single rows use the model directly



def test_frozen_copy_follows_an_optimizer_step(models):
    """Training's AdamW (fused where it can be) writes the weights in its own kernel; the step must still
    count as a change of the weights, or a GRPO policy would sample from its first copy forever."""
    from pocketr1.train.common import make_optimizer

    _, base = models
    model = copy.deepcopy(base)
    before = [c.ids for c in ours(model)]
    optimizer = make_optimizer(model, lr=0.05, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    after = [c.ids for c in ours(model)]
    assert after != before
    assert after == [ours(model, [p])[0].ids for p in PROMPTS]


def test_shrinking_batch_runs_in_few_shapes():
    """A batch sheds finished rows only down to the next of a few sizes, each large enough for the rows left."""
    from pocketr1.engine.generate import batch_size

    sizes = {batch_size(n) for n in range(1, 257)}
    assert sizes == {1, 2, 3, 4, 6, 8, 12, 16, *range(24, 257, 8)}
    assert all(n <= batch_size(n) < 2 * n and batch_size(n) - n < 8 for n in range(1, 257))

def test_seeded_samples_are_reproducible(models):
    _, model = models
    first = ours(model, temperature=1.0, seed=7, n=3)
    assert len(first) == 3 * len(PROMPTS)
    assert [c.ids for c in first] == [c.ids for c in ours(model, temperature=1.0, seed=7, n=3)]
    assert [c.ids for c in first] != [c.ids for c in ours(model, temperature=1.0, seed=8, n=3)]
    # The n samples of one prompt share its prefill but are drawn independently.
    assert len({tuple(c.ids) for c in first[:3]}) > 1


def test_prompt_seeded_samples_do_not_depend_on_the_rest_of_the_batch(models):
    """With `prompt_seeds` each sample draws from its own stream: a prompt's samples are the same alone, in a
    batch, in another order (data-parallel GRPO relies on it), and differ between the samples of one prompt."""
    _, model = models
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW)

    def sample(prompts, seeds):
        done = generate(model, prompts, params, [], n=3, pad_id=PAD, dtype=torch.float32, prompt_seeds=seeds)
        return [[c.ids for c in done[i * 3:(i + 1) * 3]] for i in range(len(prompts))]

    together = sample(PROMPTS, [10, 11, 12, 13, 14])
    assert sample([PROMPTS[2]], [12]) == [together[2]]
    assert sample([PROMPTS[4], PROMPTS[0]], [14, 10]) == [together[4], together[0]]
    assert len({tuple(ids) for ids in together[0]}) > 1
    assert sample([PROMPTS[2]], [99]) != [together[2]]


def test_stop_token_ends_sequence_and_is_not_returned(models):
    _, model = models
    free = [c.ids for c in ours(model)]
    stop = free[0][3]
    got = ours(model, stop_ids=[stop])
    assert sum(stop in row for row in free) < len(free), "some rows must outlive row 0 for this test"
    for row, c in zip(free, got, strict=True):
        # Each row stops at its own first stop token (others keep going after row 0 leaves the batch).
        cut = row.index(stop) if stop in row else len(row)
        assert c.ids == row[:cut]
        assert c.finished == (stop in row)
    assert got[0].finished and len(got[0].ids) == free[0].index(stop)


def test_top_k_one_is_greedy(models):
    _, model = models
    assert [c.ids for c in ours(model, temperature=1.0, top_k=1, seed=3)] == [c.ids for c in ours(model)]


def test_top_p_keeps_only_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    rows = 4000
    logits = torch.log(torch.tensor([0.05, 0.9, 0.05])).expand(rows, 3)
    assert (sample_next(logits, 1.0, top_p=0.5, generator=gen) == 1).all()
    # Mass 0.6 + 0.3 reaches top_p=0.8: tokens 0 and 1 are drawn in about a 2:1 ratio, never token 2.
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(rows, 3)
    counts = torch.bincount(sample_next(logits, 1.0, top_p=0.8, generator=gen), minlength=3)
    assert counts[2] == 0
    assert abs(counts[0] / rows - 2 / 3) < 0.04
    # Without top_p every token keeps its share.
    counts = torch.bincount(sample_next(logits, 1.0, generator=gen), minlength=3)
    assert abs(counts[2] / rows - 0.1) < 0.03
