"""Editing noise: wrong tokens among the visible ones, so the model learns to say which token is wrong and what is right.

    spec = NoiseSpec(edit_fraction=0.1, edit_source="parent")
    ids, edited = apply_edits(model, layout, ids, noise, spec, mask_token_id)   # llm2diff.training.objective

Absorbing (mask) noise alone never shows the model a wrong visible token, so a sampler that commits a wrong token
cannot learn to dispute it. Editing noise corrupts a fraction of the response tokens the mask left visible in the
noisy copy, and the loss asks for the true token there (and, with a weight, at the clean visible ones, so the model
also learns to keep what is right). The corrupted token comes from one of three sources:

    uniform  any token of the vocabulary but the true one (and the mask token): easy errors;
    parent   the AR parent's own next-token distribution at that position, given the true prefix, with the true token
             left out (errors that look like real ones: a plausible wrong number); read from the clean stream with
             causal attention and the LoRA adapter off, one extra forward without gradients;
    self     the model's own prediction at that position with it masked, the true token left out (the mistakes it
             would make itself); one extra forward without gradients.

Only tokens at a block offset > 0 are corrupted: with token shift, a block's first token is predicted from the
finished previous block, which never sees the open block, so no position of the open block could dispute it (the
sampler commits it the same way). A token is corrupted with probability `edit_fraction`, independently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llm2diff.noise.masking import EDIT_SOURCES


def edit_candidates(noise, response_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """`(rows, R)` bool: the visible (unmasked, valid) response tokens of the noisy copy that may be corrupted, i.e.
    those past their block's first token."""
    offset = torch.arange(response_block.shape[1], device=response_block.device) % block_size
    return noise.valid & ~noise.masked & (offset > 0)[None, :]


def draw_edits(candidates: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each candidate independently with probability `fraction`."""
    if fraction <= 0:
        return torch.zeros_like(candidates)
    draws = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return candidates & (draws < fraction)


def wrong_tokens(true: torch.Tensor, vocab_size: int, excluded: list[int], logits: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position that is not the true one (nor any `excluded` id): drawn uniformly over the
    vocabulary, or from softmax(`logits`) `(N, V)` with the true and excluded ids removed."""
    n = true.shape[0]
    if n == 0:
        return true.clone()
    width = vocab_size if logits is None else logits.shape[-1]
    device = true.device
    scores = torch.zeros(n, width, device=device) if logits is None else logits.detach().to(device, torch.float32, copy=True)
    scores[:, [i for i in excluded if 0 <= i < width]] = float("-inf")
    scores[torch.arange(n, device=device), true] = float("-inf")
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)


@contextlib.contextmanager
def lora_off(model) -> Iterator[None]:
    """The model's active LoRA layers off (the AR parent), through DDP/PEFT wrappers, without touching
    `requires_grad` (the trainer's parameters stay trainable). Raises when the model has no LoRA layer."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in getattr(model, "module", model).modules() if isinstance(m, LoraLayer) and not m.disable_adapters]
    if not layers:
        raise ValueError("edit_source 'parent' reads the AR parent as this model with its LoRA adapter off, and this "
                         "model has no LoRA adapter: train with use_lora: true, or use edit_source 'self' or "
                         "'uniform'")
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


__all__ = ["EDIT_SOURCES", "draw_edits", "edit_candidates", "wrong_tokens", "lora_off"]
