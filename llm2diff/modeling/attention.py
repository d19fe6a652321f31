"""Block-diffusion attention masks for stock Hugging Face models (pure functions).

Every token carries a *segment* (prompt, clean response, noisy response, padding) and a *block* index
(response block number; -1 for the prompt). The visibility rules of the method:

    prompt token   sees  prompt tokens at or before it                      (causal, as the AR parent reads it)
    clean token    sees  the whole prompt, clean tokens of its own and earlier blocks (with `causal_clean`: of
                         earlier blocks, and of its own block only those at or before it)
    noisy token    sees  the whole prompt, clean tokens of strictly earlier blocks, noisy tokens of its own block
    padding        sees  only itself                                        (no fully masked rows)

Clean never sees noisy. `causal_clean` (a model's `clean_attention: causal`) reads the clean response causally,
exactly as the AR parent reads it: the clean stream is then a plain causal LM over prompt and response (it carries
an AR loss for free in training), and the sampler commits a finished block with a causal pass. The same function builds the training mask for the `[x_0 ; x_t]` layout and the mask the
sampler uses when it recomputes without a cache, so training and inference agree by construction.

Masks are boolean `(batch, q_len, kv_len)` (True = may attend); `to_additive_mask` turns one into the float
`(batch, 1, q, kv)` form with 0 / dtype-min entries, which both `sdpa` and `eager` attention honour (eager
silently ignores boolean 4D masks). For `flex_attention`, `flex_block_mask` builds the same visibility as a
`torch.nn.attention.flex_attention.BlockMask` from a `mask_mod` over the segment and block tensors (a dense float
mask with flex crashed the process on CPU, so flex only ever gets a BlockMask).

Packed rows (several examples in one row) also carry a *document* index per position: attention never crosses
documents, on top of the rules above.

`stepwise_attention` (at the end) is not a mask: it runs a causal pass's attention query by query, exactly as
`generate`'s one-token steps do, so that lossless mode's verification reproduces `generate`'s arithmetic.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

PROMPT, CLEAN, NOISY, PAD = 0, 1, 2, 3
ATTN_BACKENDS = ("auto", "sdpa", "eager", "flex")


def block_diffusion_mask(segment: torch.Tensor, block: torch.Tensor,
                         document: torch.Tensor | None = None, causal_clean: bool = False) -> torch.Tensor:
    """Visibility of a block-diffusion sequence.

    Args:
        segment: `(batch, L)` int, one of PROMPT, CLEAN, NOISY, PAD per position.
        block: `(batch, L)` int, the response block index of each position (ignored for PROMPT and PAD).
        document: optional `(batch, L)` int, the example each position belongs to in a packed row; attention stays
            inside a document. None = one example per row.
        causal_clean: a clean token sees the clean tokens of its own block only up to itself (sequence order).

    Returns:
        `(batch, L, L)` bool, entry `[b, i, j]` True when position i may attend to position j. Causality inside the
        prompt (and, with `causal_clean`, inside a clean block) follows the sequence order, so prompt tokens must
        come first, in order (within each document), and each clean block in order.
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
    own_block = (k_blk == q_blk) & causal if causal_clean else k_blk == q_blk
    clean_rows = (q_seg == CLEAN) & (k_prompt | ((k_seg == CLEAN) & ((k_blk < q_blk) | own_block)))
    noisy_rows = (q_seg == NOISY) & (
        k_prompt | ((k_seg == CLEAN) & (k_blk < q_blk)) | ((k_seg == NOISY) & (k_blk == q_blk))
    )
    pad_rows = (q_seg == PAD) & (idx[None, :, None] == idx[None, None, :])
    allowed = prompt_rows | clean_rows | noisy_rows | pad_rows
    if document is not None:
        allowed = allowed & (document[:, :, None] == document[:, None, :])
    return allowed


def block_diffusion_mask_mod(segment: torch.Tensor, block: torch.Tensor,
                             document: torch.Tensor | None = None, causal_clean: bool = False) -> Callable:
    """`block_diffusion_mask` as a flex_attention `mask_mod(b, h, q_idx, kv_idx) -> bool` closure.

    The same rules, read per (query, key) pair from the `(batch, L)` tensors, so flex never needs the dense mask.
    Evaluated on the full index grid (`torch.nn.attention.flex_attention.create_mask`) it equals
    `block_diffusion_mask(segment, block, document, causal_clean)[:, None]`.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        q_seg, k_seg = segment[b, q_idx], segment[b, kv_idx]
        q_blk, k_blk = block[b, q_idx], block[b, kv_idx]
        k_prompt = k_seg == PROMPT
        prompt_rows = (q_seg == PROMPT) & k_prompt & (q_idx >= kv_idx)
        own_block = (k_blk == q_blk) & (q_idx >= kv_idx) if causal_clean else k_blk == q_blk
        clean_rows = (q_seg == CLEAN) & (k_prompt | ((k_seg == CLEAN) & ((k_blk < q_blk) | own_block)))
        noisy_rows = (q_seg == NOISY) & (
            k_prompt | ((k_seg == CLEAN) & (k_blk < q_blk)) | ((k_seg == NOISY) & (k_blk == q_blk))
        )
        pad_rows = (q_seg == PAD) & (q_idx == kv_idx)
        allowed = prompt_rows | clean_rows | noisy_rows | pad_rows
        if document is not None:
            allowed = allowed & (document[b, q_idx] == document[b, kv_idx])
        return allowed

    return mask_mod


def dense_mask_mod(allowed: torch.Tensor) -> Callable:
    """A flex `mask_mod` that reads a precomputed `(batch, L, L)` bool mask (e.g. during attention annealing)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    return mask_mod


def flex_block_mask(mask_mod: Callable, batch: int, length: int, device: torch.device):
    """A `BlockMask` (flex_attention's sparse mask) for `(batch, length, length)` attention from a `mask_mod`.

    The mask is the same for every head. Built eagerly (no compile): the dense boolean grid is evaluated once per
    batch, as the SDPA path builds its 4D mask, but the attention kernel then skips the fully masked tiles.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=device)


def flex_available(device: torch.device | str) -> bool:
    """Whether flex_attention can train on this device: it needs a CUDA device (torch has no flex backward on CPU)
    and a torch with `torch.nn.attention.flex_attention`."""
    if torch.device(device).type != "cuda":
        return False
    from transformers.utils import is_torch_flex_attn_available

    return bool(is_torch_flex_attn_available())


def resolve_attn_backend(choice: str, device: torch.device | str, current: str | None = None) -> str:
    """The transformers attention implementation the training forward runs with, for a recipe's `attn_backend`.

    Args:
        choice: "auto" | "sdpa" | "eager" | "flex".
        device: the training device.
        current: the model's attention implementation as loaded (`config._attn_implementation`).

    Returns:
        "flex_attention", "sdpa" or "eager". `auto` = flex_attention on a CUDA device whose torch has it, otherwise
        the loaded implementation when it is sdpa or eager, otherwise sdpa (FlashAttention cannot express the
        training mask).
    """
    if choice not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {choice!r}")
    if choice == "flex":
        if not flex_available(device):
            raise ValueError(f"attn_backend 'flex' needs a CUDA device with torch flex_attention (training on "
                             f"{torch.device(device).type}: torch has no flex_attention backward there); use 'auto', "
                             "'sdpa' or 'eager'")
        return "flex_attention"
    if choice in ("sdpa", "eager"):
        return choice
    if flex_available(device):
        return "flex_attention"
    return current if current in ("sdpa", "eager") else "sdpa"


def to_additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, q, kv)` bool -> `(batch, 1, q, kv)` float: 0 where allowed, the dtype's minimum elsewhere."""
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def cached_block_mask(key_valid: torch.Tensor, query_len: int, dtype: torch.dtype,
                      block_size: int | None = None, causal_blocks: int = 0) -> torch.Tensor:
    """Mask for new blocks run against a KV cache: every query sees every valid cached key, its own block whole,
    and the new blocks before its own (block-causal across the new blocks).

    Args:
        key_valid: `(batch, past_len)` bool, False at left padding in the cache.
        query_len: the number of new positions.
        block_size: the new positions form consecutive blocks of this size (default: one block of `query_len`).
            The sampler's fused pass runs [just-finished clean block ; next noisy block]: the clean block must
            not see the noisy one (clean never sees noisy), the noisy one sees the clean one.
        causal_blocks: the first this many new blocks read themselves causally (clean blocks of a model with
            `clean_attention: causal`).

    Returns:
        `(batch, 1, query_len, past_len + query_len)` additive float mask.
    """
    batch, device = key_valid.shape[0], key_valid.device
    block_id = torch.arange(query_len, device=device) // (block_size or query_len)
    new = block_id[None, :] <= block_id[:, None]  # (query, key) among the new positions
    if causal_blocks:
        idx = torch.arange(query_len, device=device)
        in_causal_block = (block_id[:, None] == block_id[None, :]) & (block_id[:, None] < causal_blocks)
        new = new & ~(in_causal_block & (idx[None, :] > idx[:, None]))
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


# --- generate's attention, query by query --------------------------------------------------------------------------

STEPWISE_ATTENTION = "llm2diff_stepwise_sdpa"
# leading queries of the current pass that form a prefill over an empty cache (computed in one causal call)
_PREFILL: contextvars.ContextVar[int] = contextvars.ContextVar("llm2diff_stepwise_prefill", default=0)


def stepwise_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """SDPA over a causal pass as `generate` runs it, whatever the number of new queries.

    A pass over a prompt's prefill (the first `prefill` queries, when nothing was cached before) is one causal
    call, as `generate`'s prefill; every later query is its own call over the keys up to it, as `generate`'s
    one-token steps. Where the matrix products are batch-invariant (a row's result does not depend on how many
    rows are multiplied with it, as bfloat16 matmuls are on CPUs with AMX), the logits of a many-token causal pass
    then equal `generate`'s bit for bit: attention is the one operation whose arithmetic changes with the number
    of queries (SDPA's kernels block the keys differently, and `generate` never masks a one-token step). Costs
    one small attention call per query per layer (measured: 65 ms instead of 63 for an 8-token pass of SmolLM2 in
    bfloat16 on one CPU thread). The pass must be plain causal over its cache (no padding, no 4D mask).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None:
        raise ValueError("stepwise attention runs plain causal passes only; it got an attention mask")
    queries, past = query.shape[2], key.shape[2] - query.shape[2]
    head = min(_PREFILL.get(), queries) if past == 0 else 0
    outputs = []
    if head:
        outputs.append(sdpa_attention_forward(module, query[:, :, :head], key[:, :, :head], value[:, :, :head],
                                              None, **kwargs)[0])
    for j in range(head, queries):
        end = past + j + 1
        outputs.append(sdpa_attention_forward(module, query[:, :, j : j + 1], key[:, :, :end], value[:, :, :end],
                                              None, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def supports_stepwise_attention(model) -> bool:
    """True when `stepwise_attention` can run this model: its attention implementation is SDPA."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@contextlib.contextmanager
def stepwise_attention(model, prefill: int = 0) -> Iterator[None]:
    """Run the model's causal passes with `stepwise_sdpa` (the model must use SDPA; see
    `supports_stepwise_attention`). `prefill`: in a pass over an empty cache, the first this many queries are the
    prompt's prefill, computed in one causal call as `generate` computes it."""
    from transformers import AttentionInterface

    config = model.config
    if config._attn_implementation != "sdpa":
        raise ValueError(f"stepwise attention replaces SDPA; this model runs {config._attn_implementation!r}")
    AttentionInterface.register(STEPWISE_ATTENTION, stepwise_sdpa)  # idempotent
    token = _PREFILL.set(prefill)
    config._attn_implementation = STEPWISE_ATTENTION  # no mask is built for a name transformers does not know
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _PREFILL.reset(token)
