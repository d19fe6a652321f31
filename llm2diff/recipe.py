"""Recipes: flat YAML whose keys are the fields of a few typed dataclasses, with command-line overrides.

    llm2diff train --config recipes/quickstart.yaml --learning_rate 1e-4

The dataclasses of the `train` recipe: `ModelArguments` (below), `llm2diff.training.data.DataArguments`,
`llm2diff.training.config.DiffusionSFTConfig` (TRL's SFTConfig plus the diffusion fields) and
`FinalEvalArguments` (below). A key that belongs to none of them fails with its name and the nearest valid key,
whether it comes from the YAML file or from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe or command line that cannot be used; the message says what to change."""


@dataclass
class ModelArguments:
    """Which model to adapt and how (recipe keys)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model: a hub id, a local directory, or a built-in alias (smollm2-135m-instruct)."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention backend: sdpa or eager."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (PEFT); false = full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules to adapt: 'all-linear' or a comma-separated list such as 'q_proj,k_proj,v_proj,o_proj'."})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise RecipeError(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")

    def lora_config(self):
        """The PEFT `LoraConfig`, or None for full fine-tuning."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")


@dataclass
class FinalEvalArguments:
    """After training: exact-match accuracy on held-out problems, diffusion model next to its AR parent; and the
    sampler defaults saved with the model (`sampler_*`)."""

    final_eval_samples: int = field(default=0, metadata={
        "help": "Held-out problems to grade after training (0 = skip). Uses the eval split, else the built-in task."})
    final_eval_max_new_tokens: int = field(default=96, metadata={"help": "Token budget per answer."})
    final_eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    final_eval_tokens_per_step: int = field(default=1, metadata={"help": "Sampler: tokens committed per step."})
    final_eval_threshold: float | None = field(default=None, metadata={
        "help": "If set, grade the diffusion model a second time committing every token above this confidence."})
    final_eval_compare_parent: bool = field(default=True, metadata={
        "help": "Also grade the untuned AR parent (adapter off, greedy generate) on the same problems."})
    # the sampler defaults saved with the model (diffusion_config.json); unset keys keep the library's defaults
    sampler_commit_rule: str | None = field(default=None, metadata={
        "help": "Saved default commit rule: confidence, threshold, margin, entropy, random or coarse_to_fine."})
    sampler_tokens_per_step: int | None = field(default=None, metadata={
        "help": "Saved default: tokens committed per step (the minimum under a threshold)."})
    sampler_threshold: float | None = field(default=None, metadata={
        "help": "Saved default: commit every token whose confidence (margin, for the margin rule) exceeds this."})
    sampler_entropy_bound: float | None = field(default=None, metadata={
        "help": "Saved default for the entropy rule: summed entropy (nats) committed per step."})
    sampler_sub_block_size: int | None = field(default=None, metadata={
        "help": "Saved default: decode each block left to right in sub-blocks of this size (divides block_size)."})
    sampler_max_steps_per_block: int | None = field(default=None, metadata={
        "help": "Saved default: cap on denoising steps per block (the last step commits what is left)."})
    sampler_remask_threshold: float | None = field(default=None, metadata={
        "help": "Saved default for correction: remask committed tokens whose probability fell below this."})
    sampler_remask_budget: int | None = field(default=None, metadata={
        "help": "Saved default for correction: remasks allowed per block and row."})

    def sampler_defaults(self) -> dict[str, Any]:
        """The `sampler_*` keys that are set, as `DiffusionConfig` field names."""
        return {f.name.removeprefix("sampler_"): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("sampler_") and getattr(self, f.name) is not None}


def recipe_dataclasses() -> tuple[type, ...]:
    from llm2diff.training.config import DiffusionSFTConfig
    from llm2diff.training.data import DataArguments

    return (ModelArguments, DataArguments, DiffusionSFTConfig, FinalEvalArguments)


def valid_keys(classes: tuple[type, ...]) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.init})


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/recipes.md for the valid keys"
    return f"unknown recipe key {key!r} in {where}{hint}"


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def _cli_keys(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def parse_recipe(argv: list[str] | None = None, classes: tuple[type, ...] | None = None) -> tuple[Any, ...]:
    """Parse `--config recipe.yaml` plus `--key value` overrides into one instance of each recipe dataclass.

    Returns the dataclass instances followed by the merged raw recipe (a dict: file values updated by overrides),
    which is recorded with every output.
    """
    from transformers import HfArgumentParser

    classes = classes or recipe_dataclasses()
    argv = list(sys.argv[1:] if argv is None else argv)
    valid = valid_keys(classes)
    recipe: dict[str, Any] = {}
    where = "the command line"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a recipe file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
        recipe = read_recipe_file(config_path)
        for key in recipe:
            if key not in valid:
                raise RecipeError(unknown_key_message(key, valid, config_path))
        where = f"the command line (recipe {config_path})"
    for key in _cli_keys(argv):
        if key.replace("-", "_") not in valid and key not in ("help",):
            raise RecipeError(unknown_key_message(key, valid, "the command line"))

    # `--key null` / `--key none` sets an optional field to None (argparse cannot express that)
    unset = []
    for i in range(len(argv) - 1, 0, -1):
        if argv[i - 1].startswith("--") and "=" not in argv[i - 1] and argv[i].lower() in ("none", "null"):
            unset.append(argv[i - 1][2:].replace("-", "_"))
            del argv[i - 1 : i + 1]

    parser = HfArgumentParser(classes)

    def fail(message: str):  # one line naming the problem instead of argparse's full usage dump
        raise RecipeError(f"bad value on {where}: {message}")

    parser.error = fail
    for action in parser._actions:
        if action.dest in recipe:
            action.default = recipe[action.dest]
            action.required = False
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"invalid recipe value: {err}") from err
    *instances, remaining = parsed
    if remaining:
        raise RecipeError(f"unexpected arguments {remaining} on the command line; use --key value")
    for key in unset:
        for instance in instances:
            if hasattr(instance, key):
                setattr(instance, key, None)
    merged = dict(recipe)
    overridden = set(_cli_keys(argv)) | set(unset)
    for instance in instances:
        for f in dataclasses.fields(instance):
            if f.name in overridden:
                merged[f.name] = getattr(instance, f.name)
    return (*instances, merged)
