"""Block-diffusion attention masks for stock Hugging Face models (pure functions).

Every token carries a *segment* (prompt, clean response, noisy response, padding) and a *block* index
(response block number; -1 for the prompt). The visibility rules of the method:

    prompt token   sees  prompt tokens at or before it                      (causal, as the AR parent reads it)
    clean token    sees  the whole prompt, clean tokens of its own and earlier blocks
    noisy token    sees  the whole prompt, clean tokens of strictly earlier blocks, noisy tokens of its own block
    padding        sees  only itself                                        (no fully masked rows)

Clean never sees noisy. The same function builds the training mask for the `[x_0 ; x_t]` layout and the mask the
sampler uses when it recomputes without a cache, so training and inference agree by construction.

Masks are boolean `(batch, q_len, kv_len)` (True = may attend); `to_additive_mask` turns one into the float
`(batch, 1, q, kv)` form with 0 / dtype-min entries, which both `sdpa` and `eager` attention honour (eager
silently ignores boolean 4D masks).
"""

from __future__ import annotations

import torch

PROMPT, CLEAN, NOISY, PAD = 0, 1, 2, 3


def block_diffusion_mask(segment: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Visibility of a block-diffusion sequence.

    Args:
        segment: `(batch, L)` int, one of PROMPT, CLEAN, NOISY, PAD per position.
        block: `(batch, L)` int, the response block index of each position (ignored for PROMPT and PAD).

    Returns:
        `(batch, L, L)` bool, entry `[b, i, j]` True when position i may attend to position j. Causality inside the
        prompt follows the sequence order, so prompt tokens must come first, in order.
    """
    if segment.shape != block.shape or segment.dim() != 2:
        raise ValueError(f"segment and block must both be (batch, L); got {tuple(segment.shape)} and {tuple(block.shape)}")
    length = segment.shape[1]
    idx = torch.arange(length, device=segment.device)
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    q_blk, k_blk = block[:, :, None], block[:, None, :]
    k_prompt = k_seg == PROMPT
    causal = idx[None, :, None] >= idx[None, None, :]

    prompt_rows = (q_seg == PROMPT) & k_prompt & causal
    clean_rows = (q_seg == CLEAN) & (k_prompt | ((k_seg == CLEAN) & (k_blk <= q_blk)))
    noisy_rows = (q_seg == NOISY) & (
        k_prompt | ((k_seg == CLEAN) & (k_blk < q_blk)) | ((k_seg == NOISY) & (k_blk == q_blk))
    )
    pad_rows = (q_seg == PAD) & (idx[None, :, None] == idx[None, None, :])
    return prompt_rows | clean_rows | noisy_rows | pad_rows


def to_additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, q, kv)` bool -> `(batch, 1, q, kv)` float: 0 where allowed, the dtype's minimum elsewhere."""
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def cached_block_mask(key_valid: torch.Tensor, query_len: int, dtype: torch.dtype,
                      block_size: int | None = None) -> torch.Tensor:
    """Mask for new blocks run against a KV cache: every query sees every valid cached key, its own block whole,
    and the new blocks before its own (block-causal across the new blocks).

    Args:
        key_valid: `(batch, past_len)` bool, False at left padding in the cache.
        query_len: the number of new positions.
        block_size: the new positions form consecutive blocks of this size (default: one block of `query_len`).
            The sampler's fused pass runs [just-finished clean block ; next noisy block]: the clean block must
            not see the noisy one (clean never sees noisy), the noisy one sees the clean one.

    Returns:
        `(batch, 1, query_len, past_len + query_len)` additive float mask.
    """
    batch, device = key_valid.shape[0], key_valid.device
    block_id = torch.arange(query_len, device=device) // (block_size or query_len)
    new = block_id[None, :] <= block_id[:, None]  # (query, key) among the new positions
    past = key_valid.bool()[:, None, :].expand(batch, query_len, key_valid.shape[1])
    allowed = torch.cat([past, new[None].expand(batch, -1, -1)], dim=-1)
    return to_additive_mask(allowed, dtype)


def anneal_block_mask(
    allowed: torch.Tensor, segment: torch.Tensor, block: torch.Tensor, position_ids: torch.Tensor, fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Attention annealing from causal to block attention (DiffuLLaMA, Gong et al. 2025, "Scaling Diffusion
    Language Models via Adaptation from Autoregressive Models").

    Inside a block (same segment, same block), a token sees a *later* position of its block only with probability
    `fraction`, drawn independently per (query, key) pair; earlier positions and everything outside the block keep
    `allowed`. At fraction 0 every block reads causally, as the AR parent did; at fraction 1 the mask is
    `allowed` unchanged, the block mask the sampler uses, so the train/inference equality holds once annealing ends.
    """
    if fraction >= 1.0:
        return allowed
    response = (segment == CLEAN) | (segment == NOISY)
    same = (response[:, :, None] & (segment[:, :, None] == segment[:, None, :])
            & (block[:, :, None] == block[:, None, :]))
    later = position_ids[:, None, :] > position_ids[:, :, None]
    candidates = same & later
    if fraction <= 0.0:
        return allowed & ~candidates
    u = torch.rand(allowed.shape, generator=generator, device=allowed.device)
    return allowed & ~(candidates & (u >= fraction))
