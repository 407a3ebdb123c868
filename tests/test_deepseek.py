"""DeepSeek-V3 (MLA + DeepSeekMoE) against `transformers`' DeepseekV3ForCausalLM: logits both ways on a
left-padded batch, greedy generation through our MLA cache, absorbed decode equal to the expanded path, the
balancing bias, `pocketr1 info`, and a tiny pretrain whose folder transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402

from pocketr1.engine import SamplingParams, generate  # noqa: E402
from pocketr1.model import ModelConfig, build_model, load_model, save_model  # noqa: E402
from pocketr1.model.deepseek import MLA, DeepseekV3, MLACache  # noqa: E402
from pocketr1.model.transformer import attention_mask, positions_for  # noqa: E402

VOCAB = 96
# 8 experts in 4 groups, tokens routed to 2 groups: group-limited routing really limits; rms_norm_eps is not
# 1e-6 so a norm built with the wrong eps shows; rope_theta is not the default.
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=0, eos_token_id=1)
PAD_LEFT = [0, 3, 5]
LENGTH = 12


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and the balancing bias random: a zero bias or unit norm would hide a missing one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary" in name or "rope_" in name:
                continue
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise if "bias" in name else 0.2 * noise)


def hf_model(q_lora_rank: int | None, interleave: bool, seed: int = 0):
    cfg = transformers.DeepseekV3Config(**SIZES, q_lora_rank=q_lora_rank, rope_interleave=interleave,
                                        num_key_value_heads=4, tie_word_embeddings=False,
                                        attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    randomize(model, seed)
    return model


def ours_model(q_lora_rank: int, seed: int = 1) -> DeepseekV3:
    cfg = ModelConfig(model_type="deepseek_v3", **SIZES, q_lora_rank=q_lora_rank, tie_word_embeddings=True)
    model = build_model(cfg).eval()
    randomize(model, seed)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(PAD_LEFT), LENGTH), generator=gen)
    for row, n in enumerate(PAD_LEFT):
        ids[row, :n] = 2
    return ids, torch.tensor(PAD_LEFT)


def compare(ours, theirs, seed: int) -> None:
    ids, pad_left = batch(seed)
    positions = positions_for(pad_left, 0, LENGTH)
    with torch.no_grad():
        got = ours(ids, positions, attention_mask(pad_left, LENGTH, LENGTH))
        mask = (torch.arange(LENGTH)[None, :] >= pad_left[:, None]).long()
        want = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, n in enumerate(PAD_LEFT):
        torch.testing.assert_close(got[row, n:], want[row, n:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_lora_rank, interleave", [(None, True), (16, False)])
def test_transformers_checkpoint_loads_with_equal_logits(q_lora_rank, interleave, tmp_path):
    reference = hf_model(q_lora_rank, interleave)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    assert isinstance(ours, DeepseekV3) and ours.config.q_lora_rank == (q_lora_rank or 0)
    assert ours.config.rope_interleave == interleave and not ours.config.tie_word_embeddings
    compare(ours, reference, seed=0)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_pocketr1_checkpoint_loads_in_transformers_with_equal_logits(q_lora_rank, tmp_path):
    ours = ours_model(q_lora_rank)
    save_model(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_v3" and written["q_lora_rank"] == (q_lora_rank or None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    bias = theirs.model.layers[2].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, ours.model.layers[2].mlp.gate.e_score_correction_bias)
    compare(ours, theirs, seed=1)
    # And back: our own folder loads into the same model.
    again = load_model(tmp_path, dtype=torch.float32)
    compare(again, theirs, seed=2)


PROMPTS = [[5, 17, 33, 2, 9, 41, 60, 7], [12, 80], [3, 3, 50, 22, 91], [44, 45, 46, 47], [70, 8, 19, 23]]
NEW = 10


def test_cached_greedy_generation_matches_transformers(tmp_path):
    reference = hf_model(16, True, seed=3)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        want = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                                  min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[:, longest:].tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    got = generate(ours, PROMPTS, params, [], pad_id=0, dtype=torch.float32)
    assert [c.ids for c in got] == want
    assert [generate(ours, [p], params, [], dtype=torch.float32)[0].ids for p in PROMPTS] == want


def test_absorbed_decode_equals_expanded_and_cache_holds_only_latent():
    model = ours_model(16, seed=4)
    ids, pad_left = batch(seed=4)
    cfg = model.config

    def decode(absorb: bool) -> torch.Tensor:
        MLA.absorb = absorb
        try:
            cache = model.new_cache(len(PAD_LEFT), LENGTH + 4, torch.float32, "cpu")
            out = [model(ids, positions_for(pad_left, 0, LENGTH), attention_mask(pad_left, LENGTH, LENGTH),
                         cache)[:, -1]]
            for _ in range(4):
                slot = cache.length
                cache.reserve(slot + 1)
                k_idx = torch.arange(cache.capacity)
                mask = ((k_idx >= pad_left[:, None]) & (k_idx <= slot))[:, None, None]
                token = out[-1].argmax(-1)[:, None]
                out.append(model(token, (slot - pad_left)[:, None], mask, cache)[:, -1])
            assert isinstance(cache, MLACache)
            assert cache.latent.shape[::4] == (cfg.num_hidden_layers, cfg.kv_lora_rank)
            assert cache.k_rope.shape[2:] == (1, cache.capacity, cfg.qk_rope_head_dim)
            return torch.stack(out)
        finally:
            MLA.absorb = True

    with torch.no_grad():
        torch.testing.assert_close(decode(True), decode(False), atol=1e-5, rtol=1e-5)


def test_balancing_bias_moves_against_the_load():
    model = ours_model(0, seed=5).train()
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.weight.zero_()
        router.weight[3] = 5.0  # expert 3 wins every token whose hidden state sums positive
    x = torch.ones(32, SIZES["hidden_size"])
    _, index = router(x)  # a training forward (with gradients): counted
    assert (index == 3).any(dim=-1).all()
    model.balance(0.01)
    bias = router.e_score_correction_bias
    assert bias[3] < 0 and (bias[[i for i in range(8) if i != 3]] >= -0.01).all()
    assert router.load is None  # reset for the next step
    eval_model = ours_model(0, seed=5).eval()
    eval_model.model.layers[1].mlp.gate(x)
    assert eval_model.model.layers[1].mlp.gate.load is None  # generation does not count
    with torch.no_grad():
        router(x)
    assert router.load is None  # nor do scoring passes without gradients (GRPO's reference, old policy)


def test_info_prints_kv_bytes_per_token(tmp_path):
    save_model(ours_model(0), tmp_path / "ds")
    qwen = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save_model(build_model(qwen), tmp_path / "qwen")
    out = {}
    for name in ("ds", "qwen"):
        result = run_cli("info", tmp_path / name)
        assert result.returncode == 0, result.stderr
        out[name] = result.stdout
        assert "KV cache bytes per token" in result.stdout
    # MLA: (24 latent + 8 rope) float32 values per layer = 128 B, 3 layers 384 B. GQA: (K, V) x 2 heads x 16 x 4 B
    # = 256 B per layer, 768 B per token: what the deepseek folder also prints as its same-width comparison.
    assert "MLA" in out["ds"] and "384 B per token (3 layers), 128 B per layer" in out["ds"]
    assert "deepseek_v3" in out["ds"] and "GQA of the same width (2 KV heads x 16): 768 B per token" in out["ds"]
    assert "768 B per token (3 layers), 256 B per layer" in out["qwen"] and "qwen2" in out["qwen"]


def test_tiny_pretrain_with_deepseek_saves_a_folder_transformers_loads(tmp_path):
    overrides = ["data.train_docs=200", "pretrain.steps=3", "pretrain.rows=2", "pretrain.seq_len=64",
                 "pretrain.log_every=1", "model.num_hidden_layers=2", "model.hidden_size=32"]
    result = run_cli("pretrain", "--preset", "tiny", "--arch", "deepseek", "--out", tmp_path / "run",
                     "--device", "cpu", *overrides, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "run" / "base"
    info = run_cli("info", tmp_path / "run")  # a run folder: its base model
    assert info.returncode == 0 and "deepseek_v3" in info.stdout and "MLA" in info.stdout, info.stderr
    saved = load_model(folder, dtype=torch.float32)
    assert isinstance(saved, DeepseekV3)
    biases = torch.stack([r.e_score_correction_bias for r in saved.routers()])
    assert biases.abs().sum() > 0, "balancing never ran"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids, torch.arange(5)[None], None), theirs(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_run_config_derives_deepseek_sizes_from_the_width():
    from pocketr1 import config

    cfg = config.build("tiny", ["model.model_type=deepseek_v3", "model.hidden_size=128"]).model
    head = 128 // cfg.num_attention_heads
    assert (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) == (2 * head, head, head // 2)
    assert cfg.num_key_value_heads == cfg.num_attention_heads  # MLA: every head reads the shared latent
    assert config.build("tiny", ["model.model_type=deepseek_v3", "model.kv_lora_rank=40"]).model.kv_lora_rank == 40
    assert "q_lora_rank" not in config.build("tiny").model.to_hf()  # qwen2's config.json stays as it was


@pytest.mark.parametrize("change", [
    {"n_group": 3},  # 8 experts do not split into 3 groups
    {"topk_group": 5},  # more groups kept than exist
    {"num_experts_per_tok": 5, "topk_group": 2},  # more experts than 2 groups of 2 hold
    {"qk_rope_head_dim": 7},  # rope rotates pairs
    {"kv_lora_rank": -1},
    {"n_routed_experts": 10**8},  # absurd size: refused before anything is allocated
    {"rope_scaling": {"type": "yarn", "factor": 40}},  # not implemented: refused rather than run wrong
])
def test_nonsense_deepseek_config_is_a_user_error(change):
    from pocketr1.errors import UserError

    d = ModelConfig(model_type="deepseek_v3", **SIZES).to_hf() | change
    with pytest.raises(UserError):
        ModelConfig.from_hf(d)
