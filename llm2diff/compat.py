"""Names that differ across the transformers releases llm2diff supports, decided once on the installed one.

transformers 5.25 renamed a model's `past_key_values` forward argument to `cache` (the old name warns and goes away in
5.40); 5.23 knows only `past_key_values`. Every cached forward in llm2diff passes its cache through `cache_kwargs`:

    logits = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits

`gradient_checkpointing*` training arguments (TRL's configs default `gradient_checkpointing` to True) are deprecated
aliases of `activation_checkpointing*` in every supported release; `adopt_activation_checkpointing` moves a config's
values to the new names before `TrainingArguments` would warn about the old ones.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

#: Deprecated training-argument names and the names that replace them (both exist from transformers 5.23 on).
CHECKPOINTING_ALIASES = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


@functools.lru_cache(maxsize=None)
def cache_argument() -> str:
    """The forward argument that takes a model's KV cache here: "cache" (transformers>=5.25) or "past_key_values"."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{argument: cache}` for a model's forward, under the name the installed transformers expects."""
    return {cache_argument(): cache}


def adopt_activation_checkpointing(args: Any) -> None:
    """Copy `gradient_checkpointing*` onto unset `activation_checkpointing*` (call before `__post_init__` of
    `TrainingArguments`): the same settings, without the deprecation warning the old names raise there."""
    for old, new in CHECKPOINTING_ALIASES:
        if hasattr(args, new) and getattr(args, new) is None and getattr(args, old, None) is not None:
            setattr(args, new, getattr(args, old))
