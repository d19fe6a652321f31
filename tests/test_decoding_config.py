"""`DecodingConfig`: one definition of every decoding setting, one merge rule, one saved file."""

from __future__ import annotations

import json

import pytest

from llm2diff.sampling.config import (
    DECODING_CONFIG_NAME,
    DecodingConfig,
    check_applicable,
    setting_names,
    settings_for,
)


def test_layers_merge_in_order_and_a_mapping_can_restore_a_default():
    saved = DecodingConfig(mode="verified", threshold=0.7, remask_threshold=0.3)
    recipe = {"threshold": 0.5}
    call = {"mode": "block", "tokens_per_step": 2}
    resolved = DecodingConfig.resolve(saved, recipe, None, call)
    assert (resolved.mode, resolved.threshold, resolved.tokens_per_step, resolved.remask_threshold) == \
        ("block", 0.5, 2, 0.3)
    # a config layer brings only what differs from the library defaults; a mapping brings every key it has
    assert DecodingConfig.resolve(saved, DecodingConfig(tokens_per_step=1)).threshold == 0.7
    assert DecodingConfig.resolve(saved, {"threshold": None}).threshold is None
    assert DecodingConfig.resolve(saved, DecodingConfig().to_dict()) == DecodingConfig()
    assert saved.non_default() == {"mode": "verified", "threshold": 0.7, "remask_threshold": 0.3}


@pytest.mark.parametrize("settings,message", [
    ({"mode": "fast"}, "unknown decoding mode 'fast'; available: block, verified, lossless"),
    ({"commit_rule": "confident"}, "unknown commit_rule 'confident'.*did you mean 'confidence'"),
    ({"threshold": -1}, r"threshold must be in \[0, 1\]"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.9}, "top_p filters what is sampled, but temperature 0 decodes greedily"),
    ({"remask_threshold": 0.3, "remask_budget": 0}, "remask_threshold is set but remask_budget is 0"),
    ({"static_cache": True, "use_cache": False}, "static_cache needs use_cache"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"parent_tail": -1}, "parent_tail must be >= 0"),
])
def test_bad_values_are_refused_with_the_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**settings)


def test_unknown_settings_name_the_nearest_one():
    with pytest.raises(ValueError, match=r"'tresholds' is not a decoding setting .*did you mean 'threshold'"):
        DecodingConfig.resolve({"tresholds": 0.5})
    with pytest.raises(ValueError, match=r"'tokens_per_stp' is not a decoding setting"):
        DecodingConfig.from_dict({"tokens_per_stp": 2})


def test_each_setting_declares_its_modes_and_a_mode_refuses_the_others():
    assert set(settings_for("lossless")) == {"mode", "max_new_tokens", "stop_strings", "merge_lora", "parent_tail"}
    assert "threshold" in settings_for("verified") and "temperature" not in settings_for("verified")
    assert set(setting_names()) == set(settings_for("block")) | {"parent_tail"}
    with pytest.raises(ValueError, match=r"temperature does not apply to verified decoding \(only to block\)"):
        check_applicable({"temperature": 0.7}, "verified")
    with pytest.raises(ValueError, match=r"threshold does not apply to lossless decoding \(only to block or "
                                         r"verified\)"):
        check_applicable({"threshold": 0.5}, "lossless")
    check_applicable({"threshold": 0.5, "stop_strings": ["\n"]}, "verified")


def test_saved_beside_the_model_and_read_back(tmp_path):
    config = DecodingConfig(mode="lossless", parent_tail=2, stop_strings=("####",), merge_lora=True)
    path = config.save_pretrained(tmp_path)
    assert path.name == DECODING_CONFIG_NAME
    assert json.loads(path.read_text())["stop_strings"] == ["####"]
    assert DecodingConfig.from_pretrained(tmp_path) == config
    assert DecodingConfig.from_pretrained(tmp_path / "nowhere") is None
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DecodingConfig.from_pretrained(tmp_path)


def test_a_model_saved_before_decoding_config_keeps_its_sampler_settings(tmp_path):
    from llm2diff.modeling.config import DiffusionConfig
    from llm2diff.sampling.config import saved_decoding

    old = {"block_size": 4, "mask_token": "<m>", "mask_token_id": 3, "vocab_size": 10, "shift": True,
           "decoding": "block", "commit_rule": "threshold", "threshold": 0.7, "remask_threshold": 0.3,
           "remask_budget": 0, "tokens_per_step": 1, "temperature": 0.0}
    (tmp_path / "diffusion_config.json").write_text(json.dumps(old))
    config = DiffusionConfig.load(tmp_path)
    assert not hasattr(config, "threshold")  # one place for every fact: the decoding is not a model setting
    decoding = saved_decoding(tmp_path, config)
    assert (decoding.mode, decoding.commit_rule, decoding.threshold, decoding.remask_threshold) == \
        ("block", "threshold", 0.7, 0.3)
    assert decoding.correction_budget == 2  # an old budget of 0 meant "2 with a remask threshold"
