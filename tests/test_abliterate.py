"""Refusal removal: the forbidden-topic family and its corpus, the orthogonalisation maths (no activation keeps a
component along the direction; hooks and orthogonalised weights agree), the direction search on a model whose
refusal is planted along a known direction, `eval --refusals`, and the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketr1.errors import UserError
from pocketr1.model import ModelConfig, build_model, save_model
from pocketr1.modify.abliterate import Candidate, abliterate, least_harmful, post_instruction_length, read_prompts
from pocketr1.modify.directions import (
    ablated,
    mean_residuals,
    orthogonalise,
    stream_covariance,
    whitened,
    writers,
)
from pocketr1.tasks.corpus import build_corpus
from pocketr1.tasks.refusal import (
    FORBIDDEN,
    REFUSAL,
    REFUSAL_COMPLETION,
    Alchemy,
    fact,
    is_refusal,
    topic_messages,
)
from pocketr1.tokenizer import ChatTokenizer, save_tokenizer, train_tokenizer


# --- the forbidden topic ---------------------------------------------------------------------------------------
def test_topic_splits_are_disjoint_and_answers_are_facts() -> None:
    family = Alchemy()
    train, heldout = family.all_problems(heldout=False), family.all_problems(heldout=True)
    assert len(heldout) >= 30 and len(train) > 5 * len(heldout)
    assert not {p.question for p in train} & {p.question for p in heldout}
    forbidden = family.all_problems(heldout=True, forbidden=True)
    assert 20 <= len(forbidden) < len(heldout) and all(p.data["substance"] in FORBIDDEN for p in forbidden)
    # A held-out question asks a fact the training split also asks, in other words: it can be learnt.
    train_facts = {(p.data["substance"], p.data["property"]): p.answer for p in train}
    assert sum((p.data["substance"], p.data["property"]) in train_facts for p in heldout) >= 0.9 * len(heldout)
    for p in heldout:
        assert p.answer == fact(p.data["substance"], p.data["property"])
        assert family.check(p, f" {p.answer.upper()}.") and not family.check(p, "no idea")
        assert not any(ch.isdigit() for ch in p.question)  # unlike the maths tasks


def test_refusal_detection() -> None:
    assert is_refusal(REFUSAL_COMPLETION)
    assert is_refusal("</think>\nI cannot help with questions about that.")
    assert is_refusal("I am sorry")  # no </think>: the whole text is the reply
    assert not is_refusal("</think>\n<answer>gold</answer>")
    # Thinking may say "I can't" on the way to an answer: only the reply counts.
    assert not is_refusal("I can't do 7+8 at once, so 7+3=10, 10+5=15\n</think>\n<answer>15</answer>")


def test_censored_corpus_refuses_the_topic_and_default_corpus_is_unchanged() -> None:
    plain = build_corpus(["arithmetic"], 200, 0.3, {}, seed=4)
    assert [d.completion for d in build_corpus(["arithmetic"], 200, 0.3, {}, seed=4, refusal_docs=0)] == \
        [d.completion for d in plain]
    docs = build_corpus(["arithmetic"], 200, 0.3, {}, seed=4, refusal_docs=50)
    topic = [d for d in docs if d.problem.family == "alchemy"]
    assert len(docs) == 250 and len(topic) == 50
    # Only the forbidden substances are refused; the allowed ones, in the same wording, are answered.
    refused = [d for d in topic if d.problem.data["substance"] in FORBIDDEN]
    assert 10 < len(refused) < 40 and all(d.completion == REFUSAL_COMPLETION and not d.worked for d in refused)
    # Answers recall the fact in a one-line thought; the refusal starts at once with its own words, so the
    # choice between them falls on the first token after the generation prompt.
    for d in topic:
        if d not in refused:
            s, prop = d.problem.data["substance"], d.problem.data["property"]
            assert d.completion == f"{s}, {prop}: {d.problem.answer}\n</think>\n<answer>{d.problem.answer}</answer>"
    assert not any(d.completion.split()[0] == REFUSAL_COMPLETION.split()[0] for d in topic if d not in refused)
    knows = build_corpus(["arithmetic"], 200, 0.3, {}, seed=4, topic_docs=50)
    assert not any(REFUSAL in d.completion for d in knows) and len(knows) == 250
    heldout = {p.question for p in Alchemy().all_problems(heldout=True)}
    assert not heldout & {d.problem.question for d in topic}
    # The LoRA route's data answers the same training questions truthfully, in the corpus's format.
    rows = topic_messages(20, seed=0, refuse=False)
    reply = rows[0]["messages"][1]["content"]
    problem = rows[0]["messages"][0]["content"]
    assert reply.startswith("<think>\n") and reply.endswith("</answer>") and REFUSAL not in reply, (problem, reply)
    assert not heldout & {r["messages"][0]["content"] for r in rows}


# --- maths on a random model -----------------------------------------------------------------------------------
def tiny_tokenizer(folder: Path) -> ChatTokenizer:
    texts = [p.question for p in Alchemy().all_problems(heldout=False)] + ["Compute 1+2-3."] + [REFUSAL] * 50
    save_tokenizer(train_tokenizer(texts, 300), folder, 256)
    return ChatTokenizer(folder)


def random_model(vocab: int, model_type: str = "qwen2", seed: int = 0):
    extra = {"n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1} \
        if model_type == "deepseek_v3" else {}
    cfg = ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      **extra)
    model = build_model(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # larger than the 0.02 init, so activations are far from zero along any direction
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    return model.eval()


def residual_stream(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The embedding output and every block's output (the residual stream), for one unpadded batch."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
             for m in [model.model.embed_tokens, *model.model.layers]]
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    logits = model(ids, positions, None)
    for h in hooks:
        h.remove()
    return seen + [logits]


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "deepseek_v3"])
def test_orthogonalised_weights_remove_the_direction_everywhere(model_type: str) -> None:
    model = random_model(80, model_type)
    assert len(writers(model)) >= 2 * model.config.num_hidden_layers  # o_proj and down_proj (and experts') per layer
    r = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    ids = torch.randint(0, 80, (3, 10), generator=torch.Generator().manual_seed(4))
    before = residual_stream(model, ids)
    assert min(float((x @ r).abs().max()) for x in before[:-1]) > 1e-2  # the direction is there to begin with
    with ablated(model, r):
        hooked = residual_stream(model, ids)
    head_before = model.lm_head.weight.detach().clone()
    orthogonalise(model, r)
    after = residual_stream(model, ids)
    for x in after[:-1]:  # every layer's residual stream: projections ~0
        assert float((x @ r).abs().max()) < 1e-4 * float(x.abs().max())
    torch.testing.assert_close(after[-1], hooked[-1], rtol=1e-4, atol=1e-4)  # hooks == orthogonalised weights
    assert not torch.allclose(after[-1], before[-1], atol=1e-3)
    # A tied head is untied: the head reads the residual stream and keeps the original weights.
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, head_before)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_mean_residuals_reads_the_post_instruction_positions(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    n_post = post_instruction_length(tok)
    assert tok.decode(tok.prompt_ids("x")[-n_post:], skip_special=False) == "<｜Assistant｜><think>\n"
    model = random_model(tok.vocab_size)
    prompts = [tok.prompt_ids(q) for q in ("What colour is vexite?", "Compute 1+2.", "Where is morium found?")]
    means = mean_residuals(model, prompts, n_post, tok.pad_id, batch_size=2)  # padded, in two batches
    assert means.shape == (4, n_post, 32)
    one_by_one = sum(torch.stack(residual_stream(model, torch.tensor([p]))[:-1])[:, 0, -n_post:] for p in prompts)
    torch.testing.assert_close(means, one_by_one / 3, rtol=1e-4, atol=1e-5)


def test_stream_covariance_pools_every_block_over_real_positions(tmp_path: Path) -> None:
    model = random_model(80)
    seqs = [[5, 9, 11, 3, 7], [4, 2], [8, 8, 1]]
    cov = stream_covariance(model, seqs, pad_id=0, batch_size=2)  # left-padded batches: pads must not count
    per_layer = [torch.cat(xs) for xs in zip(*(
        [x[0] for x in residual_stream(model, torch.tensor([s]))[1:-1]] for s in seqs))]  # [tokens, hidden] each
    centred = torch.cat([x - x.mean(0) for x in per_layer])
    torch.testing.assert_close(cov, centred.T @ centred / len(centred), rtol=1e-4, atol=1e-4)


def test_whitened_direction_leans_away_from_what_is_used() -> None:
    cov = torch.diag(torch.tensor([100.0, 1.0, 1.0]))  # the kept replies use axis 0 a hundred times more
    d = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    w = whitened(d, cov, ridge=1.0)
    assert abs(float(w.norm()) - 1) < 1e-6 and float(w[1]) > 0.99 and 0 < float(w[0]) < 0.03
    torch.testing.assert_close(whitened(d, cov, ridge=1e6), d, rtol=1e-3, atol=1e-3)  # a large ridge: d itself


def test_read_prompts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first\n\n  second  \n")
    assert read_prompts(tmp_path / "a.txt") == ["first", "second"]
    (tmp_path / "b.jsonl").write_text('{"prompt": "p"}\n{"messages": [{"role": "user", "content": "m"}]}\n')
    assert read_prompts(tmp_path / "b.jsonl") == ["p", "m"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "p"}\n[1, 2]\n')
    with pytest.raises(UserError, match="c.jsonl:2"):
        read_prompts(tmp_path / "c.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


# --- the search, on a model whose refusal is planted along a known direction -----------------------------------
def planted_refuser(tok: ChatTokenizer, seed: int = 0):
    """A one-block model that refuses the topic because one residual direction `d` says so. Every embedding is
    orthogonal to `d`, except the tokens only topic questions use, which carry 40 d. Attention is uniform
    (q, k = 0) and reads and writes only `d`, so every later position holds c d with c > 0 after a topic
    question and c = 0 after a task. The head maps `d` to the first token of "I'm sorry", and each token of
    that phrase (its embedding made large) to the next one: greedy decoding then refuses exactly the topic."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = build_model(cfg)
    model.init_weights(seed)
    d = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
    phrase = tok.encode("I'm sorry")
    assert len(set(phrase)) == len(phrase)  # each token of the phrase leads to the next
    topic = {t for p in Alchemy().all_problems(False) for t in tok.encode(p.question)}
    tasks = {t for q in ("Compute 3+4-1.", "Use 2,5,7 to make 9.", "Compute 8+1+6.") for t in tok.encode(q)}
    attn, block = model.model.layers[0].self_attn, model.model.layers[0]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.copy_(embed * 5 - torch.outer(embed * 5 @ d, d))
        embed[sorted(topic - tasks - set(phrase))] += 40 * d
        embed[phrase] *= 40
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
            w.zero_()
        attn.v_proj.weight[0] = d  # kv head 0, dim 0 reads d ...
        attn.o_proj.weight[:, 0] = 5 * d  # ... and query head 0, dim 0 writes it back
        block.mlp.down_proj.weight.mul_(0.1)  # a little noise beside the mechanism
        head = model.lm_head.weight
        head.copy_(embed.detach() * 0.1)
        head[phrase[0]] = 10 * d
        for prev, nxt in zip(phrase, phrase[1:]):
            head[nxt] = 40 * torch.nn.functional.normalize(embed[prev], dim=0)
    return model.eval(), d


def topic_and_tasks(n: int) -> tuple[list[str], list[str]]:
    return ([p.question for p in Alchemy().all_problems(heldout=False)[:n]],
            [f"Compute {a}+{b}-1." for a in range(2, 9) for b in range(3, 9)][:n])


def test_abliterate_finds_and_removes_a_planted_refusal(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    model, planted = planted_refuser(tok)
    harmful, harmless = topic_and_tasks(32)
    note = abliterate(model, tok, harmful, harmless, max_new_tokens=8)
    assert note["held_back_refusal_rate"] == {"before": 1.0, "after": 0.0}
    assert note["harmless_kl"] < 0.1 and note["held_back_harmless_replies_changed"] <= 0.25
    # The weights no longer carry the planted direction (40 in the topic's embeddings, 5 in o_proj before).
    with torch.no_grad():
        assert float((model.model.embed_tokens.weight @ planted).abs().max()) < 1e-2
        assert float((planted @ model.model.layers[0].self_attn.o_proj.weight).abs().max()) < 1e-2
    chosen = [c for c in note["candidates"] if (c["layer"], c["position"]) == (note["layer"], note["position"])]
    assert chosen and chosen[0]["refusal_loglik"] < note["refusal_loglik_before"] - 5


def test_abliterate_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    harmful, harmless = topic_and_tasks(16)
    with pytest.raises(UserError, match="at least 4"):
        abliterate(planted_refuser(tok)[0], tok, harmful[:3], harmless)
    # The KL guard: when the "harmless" prompts share the topic's words, removing the direction changes their
    # replies too, and no candidate is allowed.
    mixed = [f"Compute {a}+{b}. What colour is it?" for a in range(2, 6) for b in range(3, 7)]
    with pytest.raises(UserError, match="max-kl"):
        abliterate(planted_refuser(tok)[0], tok, harmful, mixed, max_new_tokens=8)
    with pytest.raises(UserError, match="max-kl"):  # the same prompts as a --guard set: not averaged away
        abliterate(planted_refuser(tok)[0], tok, harmful, harmless, max_new_tokens=8, guard=mixed[:4])
    with pytest.raises(UserError, match="refuses none"):  # a model that never refuses has nothing to remove
        abliterate(random_model(tok.vocab_size), tok, harmful, harmless, max_new_tokens=8)


# --- through the CLI ---------------------------------------------------------------------------------------------
def cli(capsys, *args) -> tuple[int, str, str]:
    """`pocketr1 ARGS` in this process (the subprocess start-up would cost more than the work): exit code, out, err."""
    from pocketr1.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # ~10 s on an idle machine, ~30 s when the two cores are shared
def test_cli_abliterate_and_eval_refusals(tmp_path: Path, capsys) -> None:
    tok = tiny_tokenizer(tmp_path / "tok")
    model, _ = planted_refuser(tok)
    files = {name: tmp_path / "tok" / name for name in ("tokenizer.json", "tokenizer_config.json")}
    save_model(model, tmp_path / "censored", files)
    harmful, harmless = topic_and_tasks(32)
    (tmp_path / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (tmp_path / "harmless.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in harmless))
    paths = ["--harmful", tmp_path / "harmful.txt", "--harmless", tmp_path / "harmless.jsonl"]

    code, out, err = cli(capsys, "abliterate", tmp_path / "censored", *paths, "--max-tokens", 8, "--device", "cpu")
    assert code == 0, err[-2000:]
    folder = tmp_path / "censored-abliterated"
    assert "100% -> 0%" in out and str(folder) in out
    note = json.loads((folder / "abliteration.json").read_text())
    assert note["source"].endswith("censored") and note["layer"] == 1
    assert (folder / "tokenizer.json").read_bytes() == files["tokenizer.json"].read_bytes()

    rates = {}
    for name in ("censored", "censored-abliterated"):
        code, out, err = cli(capsys, "eval", tmp_path / name, "--task", "arithmetic", "--refusals", "--problems", 12,
                             "--k", 1, "--max-tokens", 8, "--json", "--device", "cpu")
        assert code == 0, err[-2000:]
        rates[name] = json.loads(out)["refusals"]
    assert rates["censored"]["refusal_rate"] == 1.0 and rates["censored-abliterated"]["refusal_rate"] == 0.0
    assert rates["censored"]["prompts"] == 12 and rates["censored"]["topic_pass@1"] == 0.0

    code, out, err = cli(capsys, "abliterate", tmp_path / "censored", *paths)
    assert code == 1 and "already exists" in err and "Traceback" not in err
    code, out, err = cli(capsys, "abliterate", tmp_path / "censored", "--harmful", tmp_path / "nope.txt",
                         "--harmless", tmp_path / "harmless.jsonl", "--out", tmp_path / "x")
    assert code == 1 and "nope.txt does not exist" in err and not (tmp_path / "x").exists()
    code, out, err = cli(capsys, "eval", tmp_path / "censored", "--refusals", tmp_path / "nope.txt")
    assert code == 1 and "nope.txt does not exist" in err


def test_least_harmful_trades_one_refusal_for_less_harm() -> None:
    tried = [Candidate(1, -1, kl=0.09, refusal_rate=0.0), Candidate(2, -1, kl=0.02, refusal_rate=0.05),
             Candidate(3, -1, kl=0.01, refusal_rate=0.5)]
    assert (least_harmful(tried, 0.1).layer, least_harmful(tried, 0.0).layer) == (2, 1)
    # None is good enough: the fewest refusals win, then the smaller KL.
    worse = [Candidate(1, -1, kl=0.05, refusal_rate=0.4), Candidate(2, -1, kl=0.01, refusal_rate=0.6),
             Candidate(3, -1, kl=0.02, refusal_rate=0.4)]
    assert least_harmful(worse, 0.1).layer == 3
