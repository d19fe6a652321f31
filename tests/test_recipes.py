"""Recipes: every shipped recipe parses and validates; misspelt keys name the nearest valid key; overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm2diff.names import check_choice
from llm2diff.recipe import RecipeError, parse_recipe, valid_keys
from llm2diff.training.arguments import train_dataclasses

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


PRM_RECIPES = [p for p in RECIPES if p.stem.endswith(("prm", "rl"))]


@pytest.mark.parametrize("path", PRM_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_prm_and_rl_recipes_parse_and_name_their_launch_command(path):
    from llm2diff.prm.pipeline import prm_dataclasses
    from llm2diff.rl.pipeline import rl_dataclasses

    command = "prm" if path.stem.endswith("prm") else "rl"
    classes = prm_dataclasses() if command == "prm" else rl_dataclasses()
    args, trainer_args, recipe = parse_recipe(["--config", str(path)], classes=classes)
    assert (args.prm_policy if command == "prm" else args.rl_policy) and trainer_args.output_dir
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"llm2diff {command} --config {path.relative_to(ROOT)}" in line for line in header)


ROUNDS_RECIPES = [p for p in RECIPES if p.stem.endswith("rounds")]


@pytest.mark.parametrize("path", ROUNDS_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_rounds_recipe_parses_and_names_its_launch_command(path):
    from llm2diff.rl.rounds import rounds_dataclasses

    *_, rounds_args, recipe = parse_recipe(["--config", str(path)], classes=rounds_dataclasses())
    assert rounds_args.rounds >= 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"llm2diff rounds --config {path.relative_to(ROOT)}" in line for line in header)


@pytest.mark.parametrize("path", [p for p in RECIPES if p not in PRM_RECIPES + ROUNDS_RECIPES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_parses_and_names_its_launch_command(path):
    from llm2diff.star.config import star_dataclasses

    is_star = "star" in path.stem.split("-")  # quickstart-star, star-headroom
    classes = star_dataclasses() if is_star else train_dataclasses()
    model_args, data_args, train_args, *rest, recipe = parse_recipe(["--config", str(path)], classes=classes)
    assert model_args.model_name_or_path
    assert data_args.dataset_name
    assert train_args.block_size >= 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    command = "llm2diff star" if is_star else "llm2diff train"
    launch = [line for line in header if f"--config {path.relative_to(ROOT)}" in line]
    assert launch and any(command in line for line in launch), "header must carry the launch command"
    assert set(recipe) <= set(valid_keys(classes))
    if is_star:
        from llm2diff.star.rounds import check_task

        check_task(rest[0])  # the task exists and has a grader


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_misspelt_key_in_file_names_nearest(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\nblok_size: 4\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'blok_size' in .*r\.yaml; did you mean 'block_size'\?"):
        parse_recipe(["--config", path], classes=train_dataclasses())


def test_misspelt_key_on_command_line_names_nearest(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'learnig_rate' in the command line; did you mean 'learning_rate'\?"):
        parse_recipe(["--config", path, "--learnig_rate", "1e-4"], classes=train_dataclasses())


def test_check_choice_names_the_setting_the_options_and_the_nearest():
    check_choice("mode", "b", ("a", "b"))
    check_choice("mode", None, ("a", "b"), none_ok=True)
    with pytest.raises(ValueError, match=r"^unknown mode 'bb'; available: a, b\. Did you mean 'b'\?$"):
        check_choice("mode", "bb", ("a", "b"))
    with pytest.raises(ValueError, match=r"^unknown mode 'zzz'; available: aa, b\.$"):  # nothing near: no guess
        check_choice("mode", "zzz", ("aa", "b"))
    with pytest.raises(RecipeError, match=r"^unknown mode None; available: a, b\.$"):
        check_choice("mode", None, ("a", "b"), error=RecipeError)
    with pytest.raises(ValueError, match=r"available: a, b \(or none\)\."):
        check_choice("mode", "c", ("a", "b"), none_ok=True)


def test_command_line_overrides_file(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\nlearning_rate: 0.001\nblock_size: 8\noutput_dir: out\n")
    _, _, train_args, _, recipe = parse_recipe(["--config", path, "--learning_rate", "1e-4"],
                                               classes=train_dataclasses())
    assert train_args.learning_rate == pytest.approx(1e-4)
    assert train_args.block_size == 8
    assert recipe["learning_rate"] == pytest.approx(1e-4) and recipe["block_size"] == 8


def test_yaml_scientific_notation_is_converted(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the parser must still give a float
    path = _write(tmp_path, "model_name_or_path: x\nlearning_rate: 1e-4\n")
    _, _, train_args, _, _ = parse_recipe(["--config", path], classes=train_dataclasses())
    assert train_args.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("text,message", [
    ("block_size: 0\n", "block_size must be a positive integer"),
    ("block_size: 600\nmax_length: 512\n", "block_size=600 exceeds max_length=512"),
    ("t_min: 0.5\nt_max: 0.2\n", "noise window"),
    ("loss_weighting: sum\n", "loss_weighting must be one of elbo, mean, cart"),
    ("noise_order: semantic\n", "noise_order 'semantic' needs semantic_scorer"),
    ("semantic_scorer: idff\n", "unknown semantic_scorer 'idff'.*Did you mean 'idf'"),
    ("complementary_masks: true\n", "complementary_masks with loss_weighting 'elbo' needs t_max < 1"),
    ("noise_order: semantic\nsemantic_scorer: idf\nposition_masking_strength: 1.0\n", "use one of them"),
    ("block_size: 1\nattention_anneal_steps: 10\n", "attention_anneal_steps needs block_size > 1"),
    ("block_size: 1\nt_sampling: stratified\n", "causal-LM SFT"),
    ("noise_schedule: cosine-ish\n", "unknown noise_schedule 'cosine-ish'"),
    ("dtype: float8\n", "dtype must be"),
])
def test_impossible_settings_fail_clearly(tmp_path, text, message):
    path = _write(tmp_path, "model_name_or_path: x\n" + text)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(["--config", path], classes=train_dataclasses())


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file nope.yaml not found"):
        parse_recipe(["--config", "nope.yaml"], classes=train_dataclasses())


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        parse_recipe(["--config", _write(tmp_path, "- a\n- b\n")], classes=train_dataclasses())


def test_every_star_key_is_documented():
    import dataclasses

    from llm2diff.star.config import StarArguments

    docs = (ROOT / "docs" / "star.md").read_text()
    missing = [f.name for f in dataclasses.fields(StarArguments) if f"`{f.name}`" not in docs]
    assert not missing, f"document these STaR keys in docs/star.md: {missing}"


def test_every_prm_and_rl_key_is_documented():
    import dataclasses

    from llm2diff.prm.pipeline import PRMArguments
    from llm2diff.rl.grpo import DiffusionGRPOConfig
    from llm2diff.rl.pipeline import RLArguments
    from trl import GRPOConfig

    docs = (ROOT / "docs" / "prm.md").read_text()
    from llm2diff.rl.rounds import RoundsArguments

    own = [f.name for f in dataclasses.fields(PRMArguments) + dataclasses.fields(RLArguments)
           + dataclasses.fields(RoundsArguments)]
    own += [f.name for f in dataclasses.fields(DiffusionGRPOConfig) if f.name not in
            {g.name for g in dataclasses.fields(GRPOConfig)}]
    missing = [k for k in own if f"`{k}`" not in docs]
    assert not missing, f"document these keys in docs/prm.md: {missing}"


def test_every_llm2diff_recipe_key_is_documented():
    from trl import SFTConfig

    import dataclasses

    docs = (ROOT / "docs" / "recipes.md").read_text()
    trl_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    own = [k for k in valid_keys(train_dataclasses()) if k not in trl_fields]
    missing = [k for k in own if f"`{k}`" not in docs]
    assert not missing, f"document these recipe keys in docs/recipes.md: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[dev]" && python -m pytest'
    assert command in readme and command in ci


def test_null_on_the_command_line_unsets_an_optional_field(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\nfinal_eval_threshold: 0.9\n")
    *_, eval_args, recipe = parse_recipe(["--config", path, "--final_eval_threshold", "null"],
                                         classes=train_dataclasses())
    assert eval_args.final_eval_threshold is None and recipe["final_eval_threshold"] is None


def test_bad_value_names_the_argument_in_one_line(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\n")
    with pytest.raises(RecipeError, match=r"--max_steps.*invalid int value: 'ten'"):
        parse_recipe(["--config", path, "--max_steps", "ten"], classes=train_dataclasses())


DECODING_RECIPES = [p for p in RECIPES if any(line.startswith("decoding:") for line in p.read_text().splitlines())]


@pytest.mark.parametrize("path", DECODING_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_saved_decoding_runs_on_a_model_of_its_recipe(path):
    """The decoding a recipe saves with its model (what `generate` and `chat` use without flags) is one that model
    can run: a tiny model with the recipe's block size, token shift and clean attention decodes with it."""
    import yaml
    from conftest import make_model, make_tokenizer

    from llm2diff import adapt
    from llm2diff.sampling.config import DecodingConfig

    fields = yaml.safe_load(path.read_text())
    block = int(fields.get("block_size", 4))
    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=block, shift=fields.get("shift", True),
                clean_attention=fields.get("clean_attention", "block"))
    dlm.decoding = DecodingConfig.resolve(dlm.decoding, fields["decoding"])
    ids = torch.tensor([[5, 6, 7, 8]])
    out = dlm.generate(ids, torch.ones_like(ids), max_new_tokens=2 * block)
    assert not (out.sequences[:, 4:] == dlm.config.mask_token_id).any()
