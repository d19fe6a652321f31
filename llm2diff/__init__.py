"""llm2diff: turn a pretrained autoregressive LLM into a block-diffusion language model.

    from llm2diff import adapt, load
    dlm = adapt(model, tokenizer, block_size=32, lora=LoraConfig(...))
    out = dlm.generate(input_ids, max_new_tokens=256, tokens_per_step=2)   # or decoding=DecodingConfig(...)
    dlm.save_pretrained("outputs/my-dlm"); dlm = load("outputs/my-dlm")

Importing the package is cheap: the heavy modules (torch, transformers, peft) load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "adapt": "llm2diff.modeling.loading",
    "load": "llm2diff.modeling.loading",
    "DiffusionLM": "llm2diff.modeling.diffusion_lm",
    "DiffusionConfig": "llm2diff.modeling.config",
    "DecodingConfig": "llm2diff.sampling.config",
    "GenerateOutput": "llm2diff.sampling.output",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from llm2diff.modeling.config import DiffusionConfig
    from llm2diff.modeling.diffusion_lm import DiffusionLM
    from llm2diff.modeling.loading import adapt, load
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.output import GenerateOutput


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm2diff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
