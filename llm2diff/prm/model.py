"""Process reward models (PRMs): a causal LM with a one-logit token-classification head that scores each step.

    from llm2diff.prm import PRMConfig, build_prm, load_prm, train_prm, check_tokenizer_match
    prm = build_prm("smollm2-135m-instruct", tokenizer=None, label_type="soft")   # LoRA + trainable head
    summary = train_prm(prm, train_rows, TrainingArguments(output_dir="outputs/prm", ...), eval_rows=eval_rows)
    prm = load_prm("outputs/prm")
    check_tokenizer_match(prm, policy_tokenizer)        # the policy's steps must be tokenized the same way
    prm.step_scores(prompts, responses, step_ends)      # [[p(step 1 good), p(step 2 good), ...], ...]

A step is a span of response tokens; its label and its score sit on the step's LAST token (the "step end").
Rows for training and evaluation are dicts of token ids:
`{"prompt_ids": [...], "response_ids": [...], "step_ends": [i, ...], "step_labels": [y, ...]}` where each
`step_ends[k]` indexes `response_ids` and `step_labels[k]` is in [0, 1] (Math-Shepherd soft labels: the fraction of
rollouts from that prefix that reach the right answer; hard labels: 0 or 1).

The model is `AutoModelForTokenClassification(num_labels=1)` on the base checkpoint (for Qwen2, Qwen3 and Llama the
head is the linear layer `score`), with a PEFT LoRA (`task_type="TOKEN_CLS"`) on the backbone and the head fully
trainable. `save_pretrained` writes the adapter and head (safetensors), the tokenizer and `prm_config.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from llm2diff.atomic import atomic_save, write_json_atomic
from llm2diff.prm.rows import ROW_KEYS, check_row, check_step_ends

CONFIG_NAME = "prm_config.json"
LABEL_TYPES = ("soft", "hard")
IGNORE_INDEX = -100
#: Names transformers gives the head of a `*ForTokenClassification` model (Qwen2/Qwen3/Llama: "score").
HEAD_NAMES = ("score", "classifier")


# -- config -----------------------------------------------------------------------------------------------------
@dataclass
class PRMConfig:
    """What a saved PRM is and how it was made (`prm_config.json`).

    Attributes:
        base_model_name_or_path: the causal-LM checkpoint (local path, hub id or built-in alias) the adapter sits on.
        label_type: "soft" (fractions in [0, 1]) or "hard" (0/1) step labels.
        tokenizer_fingerprint: `{"vocab_size", "sha256"}` of the tokenizer (see `tokenizer_fingerprint`); a policy
            whose tokenizer differs cannot be scored by this PRM.
        step_segmentation: how responses were cut into steps (free text, e.g. "lines").
        architecture: the token-classification class (e.g. "Qwen2ForTokenClassification").
        training: provenance of the training run (arguments, data sizes), if trained.
        versions: library versions that wrote the file.
    """

    base_model_name_or_path: str
    label_type: str = "soft"
    tokenizer_fingerprint: dict[str, Any] = field(default_factory=dict)
    step_segmentation: str = "lines"
    architecture: str | None = None
    training: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {self.label_type!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PRMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{CONFIG_NAME} has unknown keys {unknown}; was it written by a newer llm2diff?")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `prm_config.json` atomically into `directory`, stamping the current library versions."""
        from llm2diff.modeling.config import library_versions

        self.versions = library_versions()
        path = Path(directory) / CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PRMConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a PRM saved by "
                                    "ProcessRewardModel.save_pretrained (which writes prm_config.json)")
        return cls.from_dict(json.loads(path.read_text()))


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """`{"vocab_size": len(tokenizer), "sha256": hash of the sorted (token, id) pairs, added tokens included}`."""
    items = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"vocab_size": len(tokenizer), "sha256": digest}


def check_tokenizer_match(prm: ProcessRewardModel, policy_tokenizer) -> None:
    """Raise ValueError unless `policy_tokenizer` is the tokenizer the PRM was trained with.

    The PRM reads the policy's token ids directly, so any difference in the vocabulary changes what it sees.
    """
    ours = prm.config.tokenizer_fingerprint
    theirs = tokenizer_fingerprint(policy_tokenizer)
    if ours.get("vocab_size") != theirs["vocab_size"] or ours.get("sha256") != theirs["sha256"]:
        raise ValueError(
            f"the PRM was trained with a different tokenizer (fingerprint {ours.get('sha256', '?')[:12]} vs "
            f"{theirs['sha256'][:12]}; vocab size {ours.get('vocab_size')} for the PRM vs {theirs['vocab_size']} "
            "for the policy); train a PRM on the policy's base model"
        )


# -- the model --------------------------------------------------------------------------------------------------
class ProcessRewardModel:
    """A (PEFT) token-classification model that scores steps, with its tokenizer and `PRMConfig`.

    Attributes:
        model: the `PeftModelForTokenClassification` (or a plain `*ForTokenClassification`), one logit per token.
        tokenizer: its tokenizer (the pad token pads batches).
        config: the `PRMConfig`.
    """

    def __init__(self, model, tokenizer, config: PRMConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"ProcessRewardModel(base={self.config.base_model_name_or_path!r}, "
                f"architecture={self.config.architecture}, label_type={self.config.label_type!r})")

    @torch.no_grad()
    def step_scores(self, prompts: list[list[int]], responses: list[list[int]], step_ends: list[list[int]],
                    batch_size: int = 16) -> list[list[float]]:
        """Probability that each step is good: sigmoid of the logit at every step end.

        `step_ends[i]` are indices into `responses[i]`. Sequences are `prompt + response`, right-padded, scored in
        batches of `batch_size` in eval mode.
        """
        if not len(prompts) == len(responses) == len(step_ends):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses and {len(step_ends)} "
                             "step_ends lists; give one of each per solution")
        for i, (response, ends) in enumerate(zip(responses, step_ends)):
            check_step_ends(f"solution {i}", ends, len(response))
        pad_id = _pad_token_id(self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        scores: list[list[float]] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = range(start, min(start + batch_size, len(prompts)))
                ids, mask = _right_pad([list(prompts[i]) + list(responses[i]) for i in chunk], pad_id)
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                probs = torch.sigmoid(logits[..., 0].float()).cpu()
                for row, i in enumerate(chunk):
                    positions = [len(prompts[i]) + e for e in step_ends[i]]
                    scores.append(probs[row, positions].tolist())
        finally:
            self.model.train(was_training)
        return scores

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save the adapter and head (safetensors), the tokenizer and `prm_config.json`, as one atomic step.

        Only this save's files (and those of the previous save that this one no longer writes) are replaced:
        checkpoints and anything else in `directory` stay (`llm2diff.atomic.atomic_save`).
        """
        directory = Path(directory)
        with atomic_save(directory) as tmp:
            self.model.save_pretrained(tmp)  # PEFT: adapter + modules_to_save (the head) as safetensors
            self.tokenizer.save_pretrained(tmp)
            self.config.save(tmp)
        return directory


def head_module_name(model) -> str:
    """The name of the classification head of a `*ForTokenClassification` model ("score" for Qwen2/Qwen3/Llama)."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if isinstance(children.get(name), torch.nn.Linear):
            return name
    raise ValueError(f"{type(model).__name__} has no token-classification head named {' or '.join(HEAD_NAMES)} "
                     f"(top-level modules: {sorted(children)}); PRMs support Qwen2, Qwen3 and Llama models")


def build_prm(base_model_name_or_path_or_model, tokenizer=None, lora_r: int = 16, lora_alpha: int = 32,
              lora_dropout: float = 0.0, target_modules: str | list[str] = "all-linear", dtype=None,
              label_type: str = "soft", step_segmentation: str = "lines", use_lora: bool = True) -> ProcessRewardModel:
    """A fresh PRM on a causal-LM base: one-logit token-classification head (trainable) plus a LoRA on the backbone.

    Args:
        base_model_name_or_path_or_model: a local checkpoint directory, hub id or built-in alias (e.g.
            `smollm2-135m-instruct`); or an in-memory causal LM loaded from such a path (its `name_or_path` is
            recorded, because `load_prm` rebuilds the base from there; its weights must match what is saved there).
        tokenizer: the base model's tokenizer; loaded from the path when None. A pad token is set (to eos) if missing.
        lora_r, lora_alpha, lora_dropout, target_modules: the LoRA (PEFT `task_type="TOKEN_CLS"`).
        dtype: weights dtype for loading from a path (None: the checkpoint's default).
        label_type: "soft" or "hard" step labels (recorded; `PRMCollator` checks hard labels are 0/1).
        step_segmentation: how steps are cut (recorded only).
        use_lora: False trains the whole model (no adapter); saving then writes the full model.
    """
    from transformers import AutoModelForTokenClassification

    from llm2diff.modeling.loading import load_tokenizer
    from llm2diff.training.run import check_model_path

    if isinstance(base_model_name_or_path_or_model, (str, os.PathLike)):
        base_name = str(base_model_name_or_path_or_model)
        path = check_model_path(base_name)
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    else:
        base_name, path, model = _token_classifier_from_causal_lm(base_model_name_or_path_or_model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    config = PRMConfig(base_model_name_or_path=base_name, label_type=label_type,
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), step_segmentation=step_segmentation,
                       architecture=type(model).__name__)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="TOKEN_CLS", r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=target_modules, modules_to_save=[head_module_name(model)])
        model = get_peft_model(model, lora)
    return ProcessRewardModel(model, tokenizer, config)


def _token_classifier_from_causal_lm(causal_lm) -> tuple[str, str, Any]:
    """(recorded base name, path, token-classification model) built from an in-memory causal LM's weights."""
    from transformers import AutoModelForTokenClassification

    from llm2diff.training.run import check_model_path

    base_name = getattr(causal_lm, "name_or_path", "") or ""
    if not base_name:
        raise ValueError(f"the {type(causal_lm).__name__} given to build_prm has no name_or_path, so load_prm could "
                         "not rebuild its base; save it with save_pretrained and pass that directory instead")
    path = check_model_path(base_name)
    if type(causal_lm).__name__.endswith("ForTokenClassification"):
        if causal_lm.config.num_labels != 1:
            raise ValueError(f"{type(causal_lm).__name__} has num_labels={causal_lm.config.num_labels}; a PRM needs 1")
        return base_name, path, causal_lm
    config = causal_lm.config.__class__.from_dict({**causal_lm.config.to_dict(), "num_labels": 1})
    model = AutoModelForTokenClassification.from_config(config, dtype=causal_lm.dtype)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    model.name_or_path = base_name
    return base_name, path, model.to(causal_lm.device)


def load_prm(directory: str | os.PathLike, dtype=None, device=None, is_trainable: bool = False) -> ProcessRewardModel:
    """Load a PRM saved with `save_pretrained`: the base from its recorded path plus the adapter and head.

    Weights load from safetensors only and `trust_remote_code` stays off.
    """
    from transformers import AutoModelForTokenClassification

    from llm2diff.modeling.loading import load_tokenizer
    from llm2diff.training.run import check_model_path

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no saved PRM at {directory}: expected a directory written by "
                                "ProcessRewardModel.save_pretrained")
    config = PRMConfig.load(directory)
    tokenizer = load_tokenizer(directory)
    kwargs = dict(num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        # The base has no head yet: transformers would report it as "newly initialized", which is misleading here
        # because the trained head is restored from the adapter right after.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            base = AutoModelForTokenClassification.from_pretrained(
                check_model_path(config.base_model_name_or_path), **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        model = PeftModel.from_pretrained(base, directory, is_trainable=is_trainable)
    else:
        model = AutoModelForTokenClassification.from_pretrained(directory, **kwargs)
    model.config.pad_token_id = _pad_token_id(tokenizer)
    if device is not None:
        model.to(device)
    if not is_trainable:
        model.eval()
    return ProcessRewardModel(model, tokenizer, config)


# -- data -------------------------------------------------------------------------------------------------------
def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def _right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


@dataclass
class PRMCollator:
    """PRM rows -> `input_ids`, `attention_mask` (right-padded with `pad_token_id`) and float `labels` (batch, L):
    the step label at `len(prompt_ids) + step_end`, -100 everywhere else."""

    pad_token_id: int
    label_type: str = "soft"

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        for i, row in enumerate(rows):
            check_row(i, row, self.label_type)
        ids, mask = _right_pad([list(r["prompt_ids"]) + list(r["response_ids"]) for r in rows], self.pad_token_id)
        labels = torch.full(ids.shape, float(IGNORE_INDEX), dtype=torch.float)
        for i, row in enumerate(rows):
            positions = [len(row["prompt_ids"]) + e for e in row["step_ends"]]
            labels[i, positions] = torch.tensor([float(y) for y in row["step_labels"]])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- training ---------------------------------------------------------------------------------------------------
def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the positions whose label is not -100 (soft targets allowed)."""
    logits = logits.reshape(labels.shape).float()  # (batch, L, 1) -> (batch, L)
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("a batch has no labelled step ends; every PRM row needs at least one step")
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())


class PRMTrainer(transformers.Trainer):
    """`transformers.Trainer` with the PRM loss; collates with `PRMCollator` unless given another collator.

    The loss is binary cross-entropy on step ends only: a token-classification head with num_labels=1 would
    otherwise get the model's built-in loss, a 1-class cross-entropy, which is identically zero and meaningless.
    """

    # `step_loss` is a per-micro-batch mean: let the Trainer average it over gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, args: transformers.TrainingArguments, processing_class=None, data_collator=None,
                 label_type: str = "soft", **kwargs):
        # The collator needs the raw row columns (prompt_ids, step_ends, ...), which the model's forward lacks.
        args.remove_unused_columns = False
        if args.label_names is None:
            args.label_names = ["labels"]
        if data_collator is None:
            if processing_class is None:
                raise ValueError("PRMTrainer needs processing_class (the tokenizer, for its pad id) or a data_collator")
            data_collator = PRMCollator(pad_token_id=_pad_token_id(processing_class), label_type=label_type)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator,
                         **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = step_loss(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


def train_prm(prm: ProcessRewardModel, train_rows, args: transformers.TrainingArguments,
              eval_rows=None) -> dict[str, Any]:
    """Train `prm` on `train_rows` (a `datasets.Dataset` of PRM rows), save it to `args.output_dir`, report.

    Returns `{"output_dir", "train": trainer metrics, "losses": logged training losses, "eval": evaluate_prm(...)}`
    (`eval` only when `eval_rows` are given; they are scored after training, not during it). Saving the PRM
    there replaces only the files of an earlier save; checkpoints, logs and other files stay.
    """
    from llm2diff.prm.metrics import evaluate_prm

    if len(train_rows) == 0:
        raise ValueError("train_rows is empty; give at least one PRM row")
    missing = [k for k in ROW_KEYS if k not in train_rows.column_names]
    if missing:
        raise ValueError(f"train_rows lacks columns {missing}; PRM rows need {list(ROW_KEYS)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    trainer = PRMTrainer(model=prm.model, args=args, processing_class=prm.tokenizer, train_dataset=train_rows,
                         label_type=prm.config.label_type)
    result = trainer.train()
    prm.config.training = {
        "started": started, "num_train_rows": len(train_rows), "seed": args.seed,
        "learning_rate": args.learning_rate, "max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "global_step": result.global_step,
        "train_loss": result.training_loss,
    }
    summary: dict[str, Any] = {
        "output_dir": args.output_dir, "train": result.metrics,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    if eval_rows is not None:
        summary["eval"] = evaluate_prm(prm, eval_rows)
        prm.config.training["eval"] = summary["eval"]
    if trainer.is_world_process_zero():
        prm.save_pretrained(args.output_dir)
    return summary
