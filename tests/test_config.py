"""Run configs: presets, `section.key=value` overrides, and the saved-config round trip."""

from __future__ import annotations

import json

import pytest

from pocketr1 import config
from pocketr1.errors import UserError


def test_presets_exist_and_build():
    assert {"tiny", "default", "small"} <= set(config.PRESETS)
    for name in config.PRESETS:
        cfg = config.build(name)
        assert cfg.preset == name
        assert cfg.model.head_dim == cfg.model.hidden_size // cfg.model.num_attention_heads


def test_tiny_preset_is_smaller_than_default():
    tiny, default = config.build("tiny"), config.build("default")
    assert tiny.pretrain.steps < default.pretrain.steps
    assert tiny.model.hidden_size < default.model.hidden_size
    assert tiny.model.hidden_size == config.PRESETS["tiny"]["model"]["hidden_size"]


def test_override_applies_on_top_of_the_preset():
    cfg = config.build("tiny", ["grpo.beta=0.01", "grpo.variant=dapo", "pretrain.loss_on_prompt=true",
                                "data.families=countdown", "data.difficulty.arithmetic.min_terms=6"])
    assert cfg.grpo.beta == 0.01 and isinstance(cfg.grpo.beta, float)
    assert cfg.grpo.variant == "dapo"
    assert cfg.pretrain.loss_on_prompt is True
    assert cfg.data.families == ["countdown"]
    assert cfg.data.difficulty == {"arithmetic": {"min_terms": 6}}
    assert cfg.grpo.steps == config.PRESETS["tiny"]["grpo"]["steps"]  # the rest of the preset stays
    assert config.build("tiny").grpo.beta == config.GRPOConfig().beta  # and nothing leaks between builds


def test_presets_are_not_mutated_by_builds():
    before = json.dumps(config.PRESETS, sort_keys=True)
    config.build("tiny", ["model.hidden_size=128", "grpo.steps=9"])
    assert json.dumps(config.PRESETS, sort_keys=True) == before


@pytest.mark.parametrize("override, named", [
    ("grpo.nope=1", "grpo.nope"),  # unknown key
    ("nope.steps=1", "nope"),  # unknown section
    ("grpo.steps=abc", "grpo.steps"),  # wrong type: int
    ("grpo.beta=high", "grpo.beta"),  # wrong type: float
    ("pretrain.loss_on_prompt=maybe", "pretrain.loss_on_prompt"),  # wrong type: bool
    ("grpo=1", "grpo"),  # a section, not a value
    ("grpo.steps.x=1", "grpo.steps"),  # below a plain value
    ("grpo.steps", "grpo.steps"),  # no value at all
])
def test_bad_overrides_are_user_errors_naming_the_key(override, named):
    with pytest.raises(UserError) as err:
        config.build("tiny", [override])
    assert named in str(err.value)


def test_unknown_preset_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="nope"):
        config.build("nope")


def test_model_override_that_breaks_the_architecture_is_a_user_error():
    with pytest.raises(UserError):
        config.build("tiny", ["model.num_key_value_heads=3"])  # 4 heads are not a multiple of 3
    with pytest.raises(UserError):
        config.build("tiny", ["model.num_attention_heads=0"])


def test_hidden_size_override_rederives_head_dim():
    cfg = config.build("tiny", ["model.hidden_size=128"])
    assert cfg.model.hidden_size == 128
    assert cfg.model.head_dim == 128 // cfg.model.num_attention_heads
    explicit = config.build("tiny", ["model.hidden_size=128", "model.head_dim=16"])
    assert explicit.model.head_dim == 16


def test_to_dict_from_dict_round_trip_through_json():
    cfg = config.build("tiny", ["grpo.beta=0.01", "model.hidden_size=96", "model.num_attention_heads=6",
                                "data.difficulty.countdown.numbers=4", "seed=5"])
    saved = json.loads(json.dumps(config.to_dict(cfg)))  # as config.json stores it
    again = config.from_dict(saved)
    assert config.to_dict(again) == config.to_dict(cfg)
    assert again.model.head_dim == 16
    assert again.grpo.beta == 0.01 and again.seed == 5


def test_from_dict_refuses_unknown_keys():
    saved = config.to_dict(config.build("tiny"))
    saved["grpo"]["nope"] = 1
    with pytest.raises(UserError, match="nope"):
        config.from_dict(saved)
