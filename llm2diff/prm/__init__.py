"""Process reward models: score each reasoning step of a solution (label and score on the step's last token).

    from llm2diff.prm import build_prm, load_prm, train_prm, evaluate_prm
    prm = build_prm("smollm2-135m-instruct")
    train_prm(prm, train_rows, TrainingArguments(output_dir="outputs/prm", ...))
    prm = load_prm("outputs/prm"); prm.step_scores(prompts, responses, step_ends)

Importing this package is cheap: torch and transformers load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "PRMConfig": "llm2diff.prm.model",
    "PRMCollator": "llm2diff.prm.model",
    "PRMTrainer": "llm2diff.prm.model",
    "ProcessRewardModel": "llm2diff.prm.model",
    "build_prm": "llm2diff.prm.model",
    "load_prm": "llm2diff.prm.model",
    "train_prm": "llm2diff.prm.model",
    "check_tokenizer_match": "llm2diff.prm.model",
    "tokenizer_fingerprint": "llm2diff.prm.model",
    "auroc": "llm2diff.prm.metrics",
    "step_label_accuracy": "llm2diff.prm.metrics",
    "evaluate_prm": "llm2diff.prm.metrics",
    "step_ends": "llm2diff.prm.steps",
    "rollout_labels": "llm2diff.prm.steps",
    "arithmetic_step_labels": "llm2diff.prm.steps",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from llm2diff.prm.metrics import auroc, evaluate_prm, step_label_accuracy
    from llm2diff.prm.model import (
        PRMCollator,
        PRMConfig,
        PRMTrainer,
        ProcessRewardModel,
        build_prm,
        check_tokenizer_match,
        load_prm,
        tokenizer_fingerprint,
        train_prm,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm2diff.prm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
