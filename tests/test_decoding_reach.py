"""Every `DecodingConfig` setting reaches every command from its one definition: the `generate`/`chat` flags, the
training recipe's saved `decoding`, the eval config, STaR's, the PRM's and GRPO's decoding keys, and lm-eval's
model arguments. A setting added to the config is available everywhere without further edits (this test
enumerates the fields, so it covers the new one too)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llm2diff.sampling.config import DecodingConfig

# a valid value of every setting (valid together: top_k/top_p with a temperature, a remask budget with its threshold)
EXAMPLE = {"mode": "block", "max_new_tokens": 8, "stop_strings": ["x"], "merge_lora": True, "commit_rule": "threshold",
           "tokens_per_step": 2, "threshold": 0.5, "significance_weight": 1.5, "confidence_floor": 0.2,
           "entropy_bound": 0.5, "sub_block_size": 2, "max_steps_per_block": 2, "latent_steps": 1, "remask_threshold": 0.3,
           "remask_budget": 1, "edit_threshold": 0.6, "edit_action": "remask", "reopen_threshold": 0.7, "reopen_budget": 1, "reopen_last": True,
           "reopen_last_below": 0.95, "reopen_tail": "redenoise",
           "temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 3, "parent_tail": 1,
           "use_cache": True, "static_cache": True, "compile": True, "fuse_commit": False, "drop_finished": False,
           "record_trajectory": True}
FIELDS = [f.name for f in dataclasses.fields(DecodingConfig)]


def test_the_example_covers_every_setting():
    assert sorted(EXAMPLE) == sorted(FIELDS)
    DecodingConfig.resolve(EXAMPLE)


def dotted(layer: str, settings=FIELDS) -> list[str]:
    return [arg for name in settings for arg in (f"--{layer}.{name}", json.dumps(EXAMPLE[name]))]


def expected(settings=FIELDS) -> dict:
    return {name: EXAMPLE[name] for name in settings}


def test_every_setting_is_a_flag_of_generate_and_chat():
    from llm2diff.cli_decode import NOT_FLAGS, _chat_parser, _generate_parser, _sampling_kwargs, decoding_flags

    assert sorted(name for name, _, _ in decoding_flags()) == sorted(set(FIELDS) - set(NOT_FLAGS))
    assert NOT_FLAGS == ("record_trajectory",)  # set by --show-steps / --save-trajectory instead
    for parser in (_generate_parser(), _chat_parser()):
        argv = ["--model", "m", "--prompt", "p"] if parser.prog.endswith("generate") else ["--model", "m"]
        for name, names, options in decoding_flags():
            value = EXAMPLE[name]
            if options.get("action") == "store_const":
                args = [names[0]] if options["const"] == value else []
            elif name == "stop_strings":
                args = [names[0], value[0]]
            else:
                args = [names[0], str(value)]
            argv += args
        given = _sampling_kwargs(parser.parse_args(argv))
        for name, _, options in decoding_flags():
            value = EXAMPLE[name]
            if options.get("action") == "store_const" and options["const"] != value:
                assert name not in given  # the flag only says the non-default value; the default is not given
            else:
                assert given[name] == value, name


def test_every_setting_is_a_key_of_the_training_recipe_eval_star_prm_and_grpo(tmp_path):
    from llm2diff.evaluation.runner import EvalConfig
    from llm2diff.prm.pipeline import prm_dataclasses
    from llm2diff.recipe import parse_recipe
    from llm2diff.rl.pipeline import rl_dataclasses
    from llm2diff.star.config import star_dataclasses
    from llm2diff.training.arguments import train_dataclasses

    out = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    train = parse_recipe(dotted("decoding") + out + ["--block_size", "4"], classes=train_dataclasses())
    assert train[3].decoding == expected()
    (cfg, _) = parse_recipe(dotted("decoding"), classes=(EvalConfig,))
    assert cfg.decoding == expected()
    star = parse_recipe(dotted("star_decoding") + dotted("star_eval_decoding") + out + ["--block_size", "4"],
                        classes=star_dataclasses())[3]
    assert star.star_decoding == expected() and star.star_eval_decoding == expected()
    prm = parse_recipe(dotted("prm_decoding") + dotted("prm_rollout_decoding") + out, classes=prm_dataclasses())[0]
    assert prm.prm_decoding == expected() and prm.prm_rollout_decoding == expected()
    # GRPO's rollouts are the block sampler with GRPO's own temperature, top_k, top_p, completion length and seed
    own = {"mode", "temperature", "top_k", "top_p", "max_new_tokens", "seed", "parent_tail"}
    rollout = [name for name in FIELDS if name not in own]
    grpo = parse_recipe(dotted("rollout_decoding", rollout) + out + ["--bf16", "false"], classes=rl_dataclasses())[1]
    assert grpo.rollout_decoding == expected(rollout)
    with pytest.raises(ValueError, match="rollout_decoding sets temperature, which GRPO decides itself"):
        parse_recipe(["--rollout_decoding.temperature", "0.5"] + out + ["--bf16", "false"], classes=rl_dataclasses())


def test_every_setting_is_an_lm_eval_model_argument(tmp_path):
    pytest.importorskip("lm_eval")
    from conftest import adapted_with_saved_base

    from llm2diff.lm_eval import LLM2DiffLM

    adapted_with_saved_base(tmp_path).save_pretrained(tmp_path / "dlm")
    text = ",".join(f"decoding.{name}={json.dumps(EXAMPLE[name]).replace(', ', ',')}" for name in FIELDS
                    if name != "stop_strings") + ",decoding.stop_strings=[x]"
    model = LLM2DiffLM.create_from_arg_string(f"pretrained={tmp_path / 'dlm'},{text}")
    assert model.decoding == expected()
