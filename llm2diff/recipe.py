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
import json
import logging
import sys
from dataclasses import dataclass, field
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
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base weights quantized to 4 bits (bitsandbytes) and train the LoRA on top of them. "
                "Needs use_lora: true and the qlora extra (pip install 'llm2diff[qlora]')."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base weights quantized to 8 bits (bitsandbytes LLM.int8) and train the LoRA on top of them. "
                "Needs use_lora: true and the qlora extra; not together with load_in_4bit."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={
        "help": "load_in_4bit: the 4-bit data type, nf4 (NormalFloat, the QLoRA default) or fp4."})
    bnb_4bit_compute_dtype: str = field(default="auto", metadata={
        "help": "load_in_4bit: dtype the 4-bit layers compute in: auto (the `dtype` key; float32 when that is auto), "
                "float32, bfloat16 or float16."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={
        "help": "load_in_4bit: also quantize the quantization constants (about 0.4 bits per weight saved)."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={
        "help": "load_in_4bit: dtype the packed 4-bit weights are stored in (default uint8). Under FSDP set it to the "
                "weights dtype (e.g. bfloat16) so the quantized layers can be sharded."})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise RecipeError(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        """Refuse quantization settings that cannot work, before anything loads."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError("load_in_4bit and load_in_8bit are both set: choose one")
        flag = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if not self.use_lora:
            raise RecipeError(f"{flag} freezes the base weights in quantized form, so only a LoRA can be trained on "
                              "them (QLoRA): set use_lora: true, or drop the quantization for full fine-tuning")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise RecipeError(f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError("bnb_4bit_compute_dtype must be auto, float32, bfloat16 or float16, got "
                              f"{self.bnb_4bit_compute_dtype!r}")
        if self.bnb_4bit_quant_storage not in (None, "uint8", "float32", "bfloat16", "float16"):
            raise RecipeError("bnb_4bit_quant_storage must be uint8, float32, bfloat16 or float16, got "
                              f"{self.bnb_4bit_quant_storage!r}")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"{flag} needs bitsandbytes, which is not installed: install the qlora extra: "
                              "pip install 'llm2diff[qlora]'")

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

    def quantization_config(self):
        """The transformers `BitsAndBytesConfig` for `load_in_4bit` / `load_in_8bit`, or None."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        import torch
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        storage = {} if self.bnb_4bit_quant_storage is None else {
            "bnb_4bit_quant_storage": getattr(torch, self.bnb_4bit_quant_storage)}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_compute_dtype=getattr(torch, self._compute_dtype()),
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant, **storage)

    def quantization_record(self) -> dict[str, Any] | None:
        """What `diffusion_config.json` records about the quantized base (None when it was not quantized)."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        if self.load_in_8bit:
            return {"method": "bitsandbytes", "load_in_8bit": True}
        return {"method": "bitsandbytes", "load_in_4bit": True,
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("bnb_4bit_")},
                "bnb_4bit_compute_dtype": self._compute_dtype()}

    def _compute_dtype(self) -> str:
        if self.bnb_4bit_compute_dtype != "auto":
            return self.bnb_4bit_compute_dtype
        return self.dtype if self.dtype != "auto" else "float32"

    @classmethod
    def from_quantization_record(cls, record: dict[str, Any]) -> ModelArguments:
        """The quantization fields back from what `quantization_record` wrote (checked as a recipe would be)."""
        if record.get("method") != "bitsandbytes":
            raise RecipeError(f"unknown quantization method {record.get('method')!r} recorded (expected bitsandbytes)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(use_lora=True, **{k: v for k, v in record.items() if k in known})


@dataclass
class FinalEvalArguments:
    """After training: exact-match accuracy on held-out problems, diffusion model next to its AR parent; and how the
    model decodes by default (`decoding`, saved with it as `decoding_config.json`)."""

    final_eval_samples: int = field(default=0, metadata={
        "help": "Held-out problems to grade after training (0 = skip). Uses the eval split, else the built-in task."})
    final_eval_max_new_tokens: int = field(default=96, metadata={"help": "Token budget per answer."})
    final_eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    final_eval_tokens_per_step: int = field(default=1, metadata={"help": "Sampler: tokens committed per step."})
    final_eval_threshold: float | None = field(default=None, metadata={
        "help": "If set, grade the diffusion model a second time committing every token above this confidence."})
    final_eval_compare_parent: bool = field(default=True, metadata={
        "help": "Also grade the untuned AR parent (adapter off, greedy generate) on the same problems."})
    decoding: DecodingLayer | None = decoding_field(
        "How the model decodes by default, saved with it as decoding_config.json: any DecodingConfig setting "
        "(docs/sampling.md), e.g. {mode: verified, threshold: 0.7} or {commit_rule: threshold, threshold: 0.7, "
        "remask_threshold: 0.3}. The final evaluation grades the model this way too; unset settings keep the "
        "library's defaults.")
    # earlier releases' keys for the saved decoding: folded into `decoding` (with a message naming the new form)
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
    sampler_decoding: str | None = field(default=None, metadata={
        "help": "Saved default decoding mode: block (the block sampler), verified (denoise each block, then check it "
                "with the model's causal stream; needs clean_attention: causal) or lossless (the AR parent's greedy "
                "output, drafted)."})

    def __post_init__(self) -> None:
        from llm2diff.sampling.decoders import DECODERS

        if self.sampler_decoding is not None and self.sampler_decoding not in DECODERS:
            near = difflib.get_close_matches(str(self.sampler_decoding), DECODERS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise RecipeError(f"unknown sampler_decoding {self.sampler_decoding!r}; available: "
                              f"{', '.join(DECODERS)}.{hint}")
        self.decoding = check_decoding_layer(self.decoding, "decoding")
        names = {"decoding": "mode"}
        moved = {names.get(key, key): getattr(self, f.name) for f in dataclasses.fields(self)
                 if (key := f.name.removeprefix("sampler_")) != f.name and getattr(self, f.name) is not None}
        if moved:
            logger.warning("recipe keys %s are deprecated: write them under decoding (decoding: %s)",
                           ", ".join(f"sampler_{'decoding' if k == 'mode' else k}" for k in moved),
                           json.dumps(moved))
            self.decoding = {**moved, **(self.decoding or {})}
            for f in dataclasses.fields(self):
                if f.name.startswith("sampler_"):
                    setattr(self, f.name, None)

    def sampler_defaults(self) -> dict[str, Any]:
        """The saved decoding's settings (`decoding`, the deprecated `sampler_*` keys folded in)."""
        return dict(self.decoding or {})


def recipe_dataclasses() -> tuple[type, ...]:
    from llm2diff.training.config import DiffusionSFTConfig
    from llm2diff.training.data import DataArguments

    return (ModelArguments, DataArguments, DiffusionSFTConfig, FinalEvalArguments)


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


def parse_recipe(argv: list[str] | None = None, classes: tuple[type, ...] | None = None) -> tuple[Any, ...]:
    """Parse `--config recipe.yaml` plus `--key value` overrides into one instance of each recipe dataclass.

    Returns the dataclass instances followed by the merged raw recipe (a dict: file values updated by overrides),
    which is recorded with every output: credentials in it (`hub_token`, ...) are redacted.
    """
    from llm2diff.redact import redact

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
