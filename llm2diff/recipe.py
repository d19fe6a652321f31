"""Recipes: flat YAML whose keys are the fields of a few typed dataclasses, with command-line overrides.

    llm2diff train --config recipes/quickstart.yaml --learning_rate 1e-4

The machinery every command's recipe shares: `parse_recipe` (the YAML file, then `--key value` flags), the
one-line error naming the nearest valid key for a key that belongs to none of the command's dataclasses (from
the YAML file or the command line), decoding layers (`decoding_field`: a mapping of decoding settings) and the
folding of deprecated keys into them. The dataclasses live beside their command: `llm2diff.training.arguments`
(`train`), `llm2diff.star.config`, `llm2diff.prm.pipeline`, `llm2diff.rl.pipeline`, `llm2diff.rl.rounds` and
`llm2diff.evaluation.runner.EvalConfig`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("llm2diff")


class RecipeError(ValueError):
    """A recipe or command line that cannot be used; the message says what to change."""


class DecodingLayer(dict):
    """The type of a recipe key that holds decoding settings (declare it with `decoding_field`)."""


def decoding_field(help: str) -> Any:
    """A recipe key holding decoding settings (a mapping of `DecodingConfig` fields, layered over the model's
    saved decoding), typed `DecodingLayer | None`: `key: {mode: verified, threshold: 0.7}` in YAML;
    `--key.threshold 0.7` or `--key '{"threshold": 0.7}'` on the command line. Every decoding setting is valid
    there, by its field name."""
    return field(default=None, metadata={"help": help})


def decoding_layer_keys(classes: tuple[type, ...]) -> list[str]:
    """The recipe keys of `classes` that hold decoding settings (fields typed `DecodingLayer | None`)."""
    return [f.name for cls in classes for f in dataclasses.fields(cls) if "DecodingLayer" in str(f.type)]


def check_decoding_layer(value: Any, key: str) -> dict[str, Any] | None:
    """A decoding layer as given in a recipe (a mapping, or JSON text from the command line), its setting names
    checked (the nearest one named); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{key} must be a mapping of decoding settings, e.g. "
                              f"'{{\"threshold\": 0.7}}' ({err})") from None
    if not isinstance(value, dict):
        raise RecipeError(f"{key} must be a mapping of decoding settings (e.g. {{mode: verified, threshold: 0.7}}), "
                          f"got {value!r}")
    from llm2diff.sampling.config import check_names

    try:
        check_names(value, key)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return dict(value)


def fold_deprecated_keys(instance: Any, layer: str, keys: dict[str, str]) -> None:
    """Move the deprecated recipe keys of `instance` that are set (`keys`: recipe key -> decoding setting) into its
    decoding layer field `layer`, with a message naming the new form; a setting given in the layer itself wins."""
    moved = {setting: getattr(instance, key) for key, setting in keys.items() if getattr(instance, key) is not None}
    current = check_decoding_layer(getattr(instance, layer), layer)
    if moved:
        logger.warning("recipe keys %s are deprecated: write them under %s (%s: %s)",
                       ", ".join(k for k in keys if getattr(instance, k) is not None), layer, layer, json.dumps(moved))
        current = {**moved, **(current or {})}
        for key in keys:
            setattr(instance, key, None)
    setattr(instance, layer, current)


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


def parse_recipe(argv: list[str] | None, classes: tuple[type, ...]) -> tuple[Any, ...]:
    """Parse `--config recipe.yaml` plus `--key value` overrides (`argv`; None: `sys.argv[1:]`) into one instance
    of each of the command's dataclasses (`classes`, e.g. `llm2diff.training.arguments.train_dataclasses()`).

    Returns the dataclass instances followed by the merged raw recipe (a dict: file values updated by overrides),
    which is recorded with every output: credentials in it (`hub_token`, ...) are redacted.
    """
    from transformers import HfArgumentParser

    from llm2diff.redact import redact

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
    # decoding layers: `--decoding.threshold 0.7` sets one setting of the layer named before the dot
    layers = decoding_layer_keys(classes)
    for i in range(len(argv) - 1, -1, -1):
        name, dot, setting = argv[i][2:].partition(".") if argv[i].startswith("--") else ("", "", "")
        if not dot:
            continue
        name = name.replace("-", "_")
        if name not in layers:
            raise RecipeError(unknown_key_message(f"{name}.{setting}", valid, "the command line") if name not in valid
                              else f"{name} holds no decoding settings, so --{name}.{setting} means nothing")
        setting, eq, text = setting.partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise RecipeError(f"--{name}.{setting} needs a value")
            text = argv[i + 1]
            del argv[i + 1]
        del argv[i]
        layer = dict(check_decoding_layer(recipe.get(name), name) or {})
        layer[setting.replace("-", "_")] = yaml.safe_load(text)
        recipe[name] = check_decoding_layer(layer, name)
    for key in layers:
        if key in recipe:
            recipe[key] = check_decoding_layer(recipe[key], key)
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
        if action.dest in layers:  # JSON text on the command line, a mapping in the file
            action.type = lambda text, key=action.dest: check_decoding_layer(text, key)
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
    return (*instances, redact(merged))
