"""The block-diffusion training objective: noise a `Layout`, run one forward, take the weighted masked loss.

    loss, stats = diffusion_loss(model, layout, mask_token_id, t_min=1e-3, t_max=1.0, weighting="elbo")

One forward over `[prompt ; clean response ; noisy response]` with the block-diffusion mask gives, at every masked
position, the logits the cached sampler computes for the same noisy state. Only the positions that predict a masked
token go through the LM head (`logits_to_keep`), which keeps the memory of the vocabulary projection small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm2diff.modeling.attention import block_diffusion_mask, to_additive_mask
from llm2diff.noise.schedule import masked_diffusion_loss, sample_noise_levels, sample_token_mask
from llm2diff.training.layout import Layout


@dataclass
class LossStats:
    """Per masked token: its noise level and cross-entropy (for loss-by-noise-level logging)."""

    t: torch.Tensor
    token_loss: torch.Tensor
    num_masked: int
    num_response_tokens: int


def noise_layout(
    layout: Layout, mask_token_id: int, t_min: float, t_max: float, schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw t per block and mask the noisy copy.

    Returns:
        noisy input ids `(batch, L)`, masked `(batch, R)` bool (where the loss is taken), t `(batch, R)`.
        For the AR-twin layout (no noisy copy) every response token is "masked" with t = 1 (weight 1).
    """
    valid = layout.response_valid
    if not layout.noisy_copy:
        return layout.input_ids, valid, torch.ones(valid.shape, device=valid.device)
    num_blocks = int(layout.response_block.max()) + 1
    t_block = sample_noise_levels((valid.shape[0], num_blocks), t_min, t_max, generator, valid.device)
    t = t_block.gather(1, layout.response_block.clamp(min=0))
    masked = sample_token_mask(t, valid, schedule, generator)
    ids = layout.input_ids.clone()
    rows, cols = masked.nonzero(as_tuple=True)
    ids[rows, layout.noisy_index[rows, cols]] = mask_token_id
    return ids, masked, t


def layout_logits(model, layout: Layout, input_ids: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Logits that predict the selected response tokens.

    Args:
        select: `(batch, R)` bool, which response tokens to return predictions for.

    Returns:
        `(num_selected, vocab)` logits, in `select.nonzero()` order.
    """
    dtype = model.get_input_embeddings().weight.dtype
    mask = to_additive_mask(block_diffusion_mask(layout.segment, layout.block), dtype)
    rows, cols = select.nonzero(as_tuple=True)
    sources = layout.source_index[rows, cols]
    keep = torch.unique(sources)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=layout.position_ids, logits_to_keep=keep,
                use_cache=False)
    return out.logits[rows, torch.searchsorted(keep, sources)]


def diffusion_loss(
    model, layout: Layout, mask_token_id: int, t_min: float = 1e-3, t_max: float = 1.0, weighting: str = "elbo",
    schedule: str = "linear", generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Noise the layout, run the model once, return the scalar loss and per-token statistics."""
    device = model.get_input_embeddings().weight.device
    layout = Layout(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(layout).items()})
    ids, masked, t = noise_layout(layout, mask_token_id, t_min, t_max, schedule, generator)
    logits = layout_logits(model, layout, ids, masked)
    targets = layout.target[masked]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    token_loss = torch.zeros(masked.shape, device=device, dtype=ce.dtype)
    token_loss[masked] = ce
    num_response = int(layout.response_valid.sum())
    loss = masked_diffusion_loss(token_loss, masked, t, num_response, weighting, schedule)
    stats = LossStats(t[masked].detach(), ce.detach(), int(masked.sum()), num_response)
    return loss, stats
