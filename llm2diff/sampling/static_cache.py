"""A fixed-size KV cache for block decoding, for `torch.compile` (static shapes) and GPU graph capture.

transformers' `StaticCache` preallocates `max_cache_len` key/value slots per layer and writes each forward's
keys/values at its running length. Block decoding also needs to take a noisy block's keys/values back after a
denoising step: with a static cache that is only moving the write position back (the slots are overwritten by the
next pass and masked until then), which `BlockStaticCache.crop` does. Attention always spans all
`max_cache_len` slots, so the sampler pads its masks to that width.

    cache = BlockStaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens + 2 * block_size)

Relies on `StaticLayer.cumulative_length` (transformers 5.x), which `tests/test_sampler_rules.py` checks.
"""

from __future__ import annotations

from transformers import StaticCache


class BlockStaticCache(StaticCache):
    """`StaticCache` whose `crop(-n)` moves every layer's write position back by n slots."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of slots to give back, got {tokens_to_remove}")
        for layer in self.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.sub_(-tokens_to_remove)

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("a static cache keeps its batch: run with drop_finished=False")
