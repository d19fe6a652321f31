"""Reinforcement learning for block-diffusion LMs: GRPO with diffusion log-prob estimators and process rewards.

    from llm2diff.rl import DiffusionGRPOConfig, DiffusionGRPOTrainer
    trainer = DiffusionGRPOTrainer(model=dlm.model, diffusion_config=dlm.config, reward_funcs=[reward],
                                   args=DiffusionGRPOConfig(output_dir="out", beta=0.04), train_dataset=ds,
                                   processing_class=tokenizer)

Files: `logprobs.py` (per-token log-prob estimators: d1's one-pass, DiffuCoder's coupled), `advantages.py`
(outcome plus process-reward advantages), `grpo.py` (the TRL `GRPOTrainer` subclass). Names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "diffusion_token_logps": "llm2diff.rl.logprobs",
    "batch_seed": "llm2diff.rl.logprobs",
    "row_seeds": "llm2diff.rl.logprobs",
    "coupled_masks": "llm2diff.rl.logprobs",
    "process_advantages": "llm2diff.rl.advantages",
    "DiffusionGRPOConfig": "llm2diff.rl.grpo",
    "DiffusionGRPOTrainer": "llm2diff.rl.grpo",
    "sync_reference_adapter": "llm2diff.rl.grpo",
    "adapter_parameter_pairs": "llm2diff.rl.grpo",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm2diff.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
