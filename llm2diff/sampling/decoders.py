"""The decoders behind `DiffusionLM.generate`: one per decoding mode, behind one interface.

    decode = decoder("verified")
    out = decode(dlm, input_ids, attention_mask, decoding, response_prefix=None, streamer=None)  # GenerateOutput

A decoder is a function `(dlm, input_ids, attention_mask, decoding, response_prefix, streamer) -> GenerateOutput`
living in its own module; `decoding` is the resolved `DecodingConfig` (its `mode` names the decoder). Adding a
decoder means writing that function and naming it here; `DecodingConfig.mode` accepts the names of this table,
and a setting declares the modes it applies to in its field's metadata.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

DECODERS: dict[str, str] = {
    "block": "llm2diff.sampling.sampler:decode_block",
    "verified": "llm2diff.sampling.verified:decode_verified",
    "lossless": "llm2diff.sampling.lossless:decode_lossless",
}


def decoder(mode: str) -> Callable:
    """The decoding function of `mode`."""
    if mode not in DECODERS:
        raise ValueError(f"unknown decoding mode {mode!r}; available: {', '.join(DECODERS)}")
    module, name = DECODERS[mode].split(":")
    return getattr(importlib.import_module(module), name)
