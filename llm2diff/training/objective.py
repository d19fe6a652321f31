"""The block-diffusion training objective: noise a `Layout`, run one forward, take the weighted masked loss.

    loss, stats = diffusion_loss(model, layout, mask_token_id, spec=NoiseSpec(schedule="cosine"))

One forward over `[prompt ; clean response ; noisy response]` with the block-diffusion mask gives, at every masked
position, the logits the cached sampler computes for the same noisy state. Only the positions that predict a masked
token go through the LM head (`logits_to_keep`), which keeps the memory of the vocabulary projection small. The
noise (schedule, window, order, complementary copies, weights and normalisation) is a `NoiseSpec`; see
`llm2diff.noise.masking`. During attention annealing the mask inside a block is partly causal (see
`llm2diff.modeling.attention.anneal_block_mask`).

With a causal clean stream (`clean_attention: causal`), the clean copy of the response is a plain causal LM over
prompt and response, so the same forward also yields the AR loss (`ar_weight`): every clean position predicts the
next response token, as the AR parent would, at the cost of the LM head on those positions only.

The mask takes the form the model's current attention implementation needs: a float additive 4D mask for `sdpa`
and `eager`, a flex_attention `BlockMask` for `flex_attention` (switch with `attention_implementation`). Packed
layouts (several examples per row) run the same way; logits and loss are read per example.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from llm2diff.modeling.attention import (
    anneal_block_mask,
    block_diffusion_mask,
    block_diffusion_mask_mod,
    dense_mask_mod,
    flex_block_mask,
    to_additive_mask,
)
from llm2diff.noise.masking import (
    Noise,
    NoiseSpec,
    cart_weights,
    draw_noise,
    reduce_loss,
    with_complement,
)
from llm2diff.training.layout import Layout


@dataclass
class LossStats:
    """Per masked token: its noise level and cross-entropy (for loss-by-noise-level logging)."""

    t: torch.Tensor
    token_loss: torch.Tensor
    num_masked: int
    num_response_tokens: int
    ar_loss: torch.Tensor | None = None  # the AR term (mean cross-entropy per response token), when trained
    # editing noise: (cross-entropy sum, count) at the corrupted tokens, then at the kept visible ones (edit_keep_weight)
    edit_sums: torch.Tensor | None = None


def _repeat_layout(layout: Layout, times: int) -> Layout:
    fields = {k: (torch.cat([v] * times) if isinstance(v, torch.Tensor) else v) for k, v in vars(layout).items()}
    if layout.example_row is not None:  # copy c of a packed example sits in copy c of its row
        num_rows = layout.input_ids.shape[0]
        fields["example_row"] = torch.cat([layout.example_row + c * num_rows for c in range(times)])
    return Layout(**fields)


def _block_size(layout: Layout) -> int:
    if layout.block_size:
        return layout.block_size
    counts = (layout.response_block == 0).sum(1)  # layouts built without block_size: the first block's length
    return int(counts.max())


def apply_noise(
    layout: Layout, mask_token_id: int, spec: NoiseSpec, generator: torch.Generator | None = None
) -> tuple[Layout, torch.Tensor, Noise]:
    """Draw the noise and write mask tokens into the noisy copy.

    Returns the layout (rows doubled with complementary masks), its noisy input ids and the `Noise` (masks,
    levels, per-token weights). For the AR-twin layout (no noisy copy) every response token is predicted from clean
    context with weight 1 and t = 1.
    """
    valid = layout.response_valid
    if not layout.noisy_copy:
        ones = torch.ones(valid.shape, device=valid.device)
        zeros = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        return layout, layout.input_ids, Noise(valid, ones, ones, valid.float(), valid, zeros)
    block_size = _block_size(layout)
    noise = draw_noise(layout.response_block, valid, block_size, spec, layout.scores, generator)
    if spec.complementary:
        noise = with_complement(noise, spec, block_size, layout.response_block)
        layout = _repeat_layout(layout, 2)
    if spec.weighting == "cart":
        noise.weight = cart_weights(noise.masked, noise.valid, block_size, layout.prompt_lengths, spec.cart_p)
    ids = layout.input_ids.clone()
    rows, cols = noise.masked.nonzero(as_tuple=True)
    ids[layout.rows[rows], layout.noisy_index[rows, cols]] = mask_token_id
    return layout, ids, noise


def noise_layout(
    layout: Layout, mask_token_id: int, t_min: float, t_max: float, schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain per-block random noise: (noisy input ids `(batch, L)`, masked `(batch, R)`, t `(batch, R)`)."""
    spec = NoiseSpec(schedule=schedule, t_min=t_min, t_max=t_max, weighting="mean")
    _, ids, noise = apply_noise(layout, mask_token_id, spec, generator)
    return ids, noise.masked, noise.t


def _embedding_weight(model) -> torch.Tensor:
    """The input embedding matrix as stored (for its dtype and device), also through a DistributedDataParallel
    wrapper (whose forward must be used) and PEFT's trainable-token wrapper (whose `.weight` builds a copy)."""
    from llm2diff.modeling.lora import embedding_weight

    return embedding_weight(getattr(model, "module", model))


def attn_implementation(model) -> str | None:
    """The attention implementation the model runs now (`config._attn_implementation`), through DDP/PEFT wrappers."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None)


@contextmanager
def attention_implementation(model, name: str | None):
    """Run `model` with the transformers attention implementation `name` ("sdpa", "eager", "flex_attention")
    inside the block, and restore the previous one after. None or the current one: nothing changes.

    Keep the whole backward pass inside the block: with gradient checkpointing the layers re-run their forward
    during backward, and must meet the same implementation the mask was built for.
    """
    base = getattr(model, "module", model)
    previous = attn_implementation(base)
    if name is None or name == previous:
        yield model
        return
    base.set_attn_implementation(name)  # PEFT models forward this to the wrapped transformers model
    try:
        yield model
    finally:
        base.set_attn_implementation(previous)


def layout_attention_mask(layout: Layout, implementation: str | None, dtype: torch.dtype,
                          anneal: float | None = None, generator: torch.Generator | None = None):
    """The layout's attention mask in the form `implementation` needs: a flex `BlockMask` for "flex_attention",
    else a float additive `(rows, 1, L, L)` mask (honoured by sdpa and eager alike)."""
    annealing = anneal is not None and anneal < 1.0
    if implementation == "flex_attention" and not annealing:
        mask_mod = block_diffusion_mask_mod(layout.segment, layout.block, layout.document, layout.causal_clean)
        return flex_block_mask(mask_mod, layout.segment.shape[0], layout.segment.shape[1], layout.segment.device)
    allowed = block_diffusion_mask(layout.segment, layout.block, layout.document, layout.causal_clean)
    if annealing:
        allowed = anneal_block_mask(allowed, layout.segment, layout.block, layout.position_ids, anneal, generator)
    if implementation == "flex_attention":  # the random annealed mask, read from the dense grid
        return flex_block_mask(dense_mask_mod(allowed), allowed.shape[0], allowed.shape[1], allowed.device)
    return to_additive_mask(allowed, dtype)


def layout_logits(
    model, layout: Layout, input_ids: torch.Tensor, select: torch.Tensor, anneal: float | None = None,
    generator: torch.Generator | None = None, clean_select: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict the selected response tokens.

    Args:
        select: `(batch, R)` bool, which response tokens to return predictions for.
        anneal: during attention annealing, the fraction of within-block later positions a token may see
            (None or 1 = the full block mask).
        clean_select: optional `(batch, R)` bool: also return, from the same forward, the clean stream's
            predictions of these tokens (read at `clean_source_index`).

    Returns:
        `(num_selected, vocab)` logits, in `select.nonzero()` order; with `clean_select`, a pair (those, the clean
        stream's `(num_clean_selected, vocab)` logits in `clean_select.nonzero()` order).
    """
    mask = layout_attention_mask(layout, attn_implementation(model), _embedding_weight(model).dtype, anneal,
                                 generator)
    reads = [(select, layout.source_index)]
    if clean_select is not None:
        if layout.clean_source_index is None:
            raise ValueError("clean_select needs a layout with clean_source_index (built by build_layout)")
        reads.append((clean_select, layout.clean_source_index))
    picks = []
    for chosen, index in reads:
        rows, cols = chosen.nonzero(as_tuple=True)
        picks.append((layout.rows[rows], index[rows, cols]))
    keep = torch.unique(torch.cat([sources for _, sources in picks]))
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=layout.position_ids, logits_to_keep=keep,
                use_cache=False)
    logits = [out.logits[rows, torch.searchsorted(keep, sources)] for rows, sources in picks]
    return logits[0] if clean_select is None else (logits[0], logits[1])


@torch.no_grad()
def apply_edits(model, layout, ids: torch.Tensor, noise, spec, mask_token_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt `spec.edit_fraction` of the visible response tokens of the noisy copy in `ids` (the noised input
    `apply_noise` returned). Returns (the new input ids, `(rows, R)` bool of the corrupted tokens)."""
    from llm2diff.noise.editing import draw_edits, edit_candidates, lora_off, wrong_tokens

    edited = draw_edits(edit_candidates(noise, layout.response_block, _block_size(layout)), spec.edit_fraction,
                        generator)
    if not edited.any():
        return ids, edited
    true = layout.target[edited]
    vocab = _embedding_weight(model).shape[0]
    logits = None
    if spec.edit_source == "self":
        masked_too = ids.clone()
        rows, cols = edited.nonzero(as_tuple=True)
        masked_too[layout.rows[rows], layout.noisy_index[rows, cols]] = mask_token_id
        logits = layout_logits(model, layout, masked_too, edited)
    elif spec.edit_source == "parent":
        causal = replace(layout, causal_clean=True)  # the clean stream as a causal LM: the parent's own reading
        with lora_off(model):
            _, logits = layout_logits(model, causal, layout.input_ids, edited, clean_select=edited)
    replacement = wrong_tokens(true, vocab, [mask_token_id], logits, generator)
    out = ids.clone()
    rows, cols = edited.nonzero(as_tuple=True)
    out[layout.rows[rows], layout.noisy_index[rows, cols]] = replacement
    return out, edited


@torch.no_grad()
def self_conditioning_inputs(model, layout: Layout, ids: torch.Tensor, masked: torch.Tensor, kind: str,
                             mask_token_id: int, vocab_size: int | None = None, anneal: float | None = None,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The no-grad pass of self-conditioning: (rows, columns, vectors) of what it concluded at every masked position
    of the noisy copy, ready for `self_conditioned` (`llm2diff.modeling.self_conditioning`)."""
    from llm2diff.modeling.self_conditioning import capture_last_hidden, expected_embedding

    r, c = masked.nonzero(as_tuple=True)
    rows, cols = layout.rows[r], layout.noisy_index[r, c]
    if kind == "hidden":  # the last hidden state at the masked position itself
        with capture_last_hidden(model) as hidden:
            layout_logits(model, layout, ids, masked, anneal, generator)
        return rows, cols, hidden.value[rows, cols].float()
    logits = layout_logits(model, layout, ids, masked, anneal, generator)  # the predictions of the masked tokens
    return rows, cols, expected_embedding(logits, _embedding_weight(model), mask_token_id, vocab_size)


def diffusion_loss(
    model, layout: Layout, mask_token_id: int, t_min: float = 1e-3, t_max: float = 1.0, weighting: str = "elbo",
    schedule: str = "linear", generator: torch.Generator | None = None, spec: NoiseSpec | None = None,
    anneal: float | None = None, ar_weight: float = 0.0, self_conditioning: str | None = None,
    self_conditioning_rate: float = 0.5, vocab_size: int | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Noise the layout, run the model once, return the scalar loss and per-token statistics.

    `spec` gives the whole noise recipe; without it, plain per-block random noise with the given schedule, window
    and weighting. `ar_weight` > 0 adds that times the AR loss of the causal clean stream (mean cross-entropy per
    response token; needs a layout with `causal_clean`). `self_conditioning` (a kind, see
    `llm2diff.modeling.self_conditioning`): with probability `self_conditioning_rate` per batch, a no-grad pass over
    the same noisy input first, whose conclusions at the masked positions condition the trained pass.
    """
    if ar_weight and not (layout.causal_clean and layout.noisy_copy):
        raise ValueError("the AR loss (ar_weight > 0) needs a causal clean stream: a model with clean_attention "
                         "'causal' and block_size > 1 (at block size 1 the loss is already the AR loss)")
    if spec is None:
        spec = NoiseSpec(schedule=schedule, t_min=t_min, t_max=t_max, weighting=weighting)
    device = _embedding_weight(model).device
    layout = replace(layout, **{k: v.to(device) for k, v in vars(layout).items() if isinstance(v, torch.Tensor)})
    layout, ids, noise = apply_noise(layout, mask_token_id, spec, generator)
    masked = noise.masked
    valid = noise.valid
    edited = keep = None
    select = masked
    if spec.edit_fraction > 0 and layout.noisy_copy:  # editing noise: wrong tokens among the visible ones
        from llm2diff.noise.editing import edit_candidates

        ids, edited = apply_edits(model, layout, ids, noise, spec, mask_token_id, generator)
        select = masked | edited
        if spec.edit_keep_weight > 0:
            keep = edit_candidates(noise, layout.response_block, _block_size(layout)) & ~edited
            select = select | keep
    condition = (None, None, None)
    if self_conditioning and layout.noisy_copy and bool(masked.any()) and \
            float(torch.rand((), generator=generator, device=device)) < self_conditioning_rate:
        condition = self_conditioning_inputs(model, layout, ids, masked, self_conditioning, mask_token_id,
                                             vocab_size, anneal, generator)
    from llm2diff.modeling.self_conditioning import self_conditioned

    with self_conditioned(model, *condition):
        if ar_weight:
            original = layout.target.shape[0] // (2 if spec.complementary else 1)  # one copy of each example suffices
            clean_select = valid & (torch.arange(valid.shape[0], device=device) < original)[:, None]
            logits, clean_logits = layout_logits(model, layout, ids, select, anneal, generator, clean_select)
        else:
            logits = layout_logits(model, layout, ids, select, anneal, generator)
    ce = F.cross_entropy(logits.float(), layout.target[select], reduction="none")
    token_loss = torch.zeros(masked.shape, device=device, dtype=ce.dtype)
    token_loss[select] = ce
    normalization = spec.resolved_normalization() if layout.noisy_copy else "response"
    weight = noise.weight if layout.noisy_copy else noise.valid.float()
    loss = reduce_loss(token_loss, weight, masked, noise.valid, normalization)  # the absorbing (ELBO) part
    stats = LossStats(noise.t[masked].detach(), token_loss[masked].detach(), int(masked.sum()), int(noise.valid.sum()))
    if edited is not None:  # per response token, as the ELBO part: the edit terms add what they teach
        tokens = valid.sum().clamp(min=1)
        loss = loss + spec.edit_loss_weight * token_loss[edited].sum() / tokens
        kept = keep if keep is not None else torch.zeros_like(edited)
        if keep is not None:
            loss = loss + spec.edit_keep_weight * token_loss[keep].sum() / tokens
        stats.edit_sums = torch.stack([token_loss[edited].sum(), edited.sum().to(ce.dtype),
                                       token_loss[kept].sum(), kept.sum().to(ce.dtype)]).detach()
    if ar_weight:
        ar_loss = F.cross_entropy(clean_logits.float(), layout.target[clean_select])
        loss = loss + ar_weight * ar_loss
        stats.ar_loss = ar_loss.detach()
    return loss, stats
