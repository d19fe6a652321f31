"""Absorbing ("mask") noise: noise levels, masking and loss weights (pure functions).

At noise level t a response token is replaced by the mask token with probability 1 - alpha(t). For the linear
schedule alpha(t) = 1 - t, so the mask probability is t and the ELBO weight -alpha'(t) / (1 - alpha(t)) is 1/t
(MDLM, Sahoo et al. 2024; BD3-LM, Arriola et al. 2025). t is drawn per block from a window [t_min, t_max]: the
1/t weight's variance diverges as t_min goes to 0, so the window is configurable (default [1e-3, 1]).
"""

from __future__ import annotations

import torch

SCHEDULES = ("linear",)


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise_schedule {name!r}; available: {', '.join(SCHEDULES)}")


def sample_noise_levels(
    shape: tuple[int, ...], t_min: float, t_max: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise levels t ~ U[t_min, t_max] of the given shape (e.g. `(batch, num_blocks)`)."""
    u = torch.rand(shape, generator=generator, device=device)
    return t_min + (t_max - t_min) * u


def mask_probability(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """1 - alpha(t): probability that a token is masked at noise level t."""
    check_schedule(schedule)
    return t


def elbo_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)), the ELBO weight of a masked token at noise level t (1/t for linear)."""
    check_schedule(schedule)
    return 1.0 / t


def sample_token_mask(
    t: torch.Tensor, valid: torch.Tensor, schedule: str = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which tokens are masked.

    Args:
        t: `(batch, R)` noise level of each response token (its block's t).
        valid: `(batch, R)` bool, False at batch padding.

    Returns:
        `(batch, R)` bool, True where the token is replaced by the mask token.
    """
    u = torch.rand(t.shape, generator=generator, device=t.device)
    return (u < mask_probability(t, schedule)) & valid


def masked_diffusion_loss(
    token_loss: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, num_response_tokens: int | torch.Tensor,
    weighting: str = "elbo", schedule: str = "linear",
) -> torch.Tensor:
    """Scalar training loss from per-token cross-entropies.

    Args:
        token_loss: `(batch, R)` cross-entropy of each response token's prediction (any value where not masked).
        masked: `(batch, R)` bool, the tokens the loss is taken on.
        t: `(batch, R)` noise level of each token.
        num_response_tokens: normaliser of the ELBO (response tokens in the batch, end-of-sequence pads included).
        weighting: "elbo": sum of weight(t) * loss over masked tokens / num_response_tokens (unbiased, higher
            variance); "mean": plain mean over masked tokens (biased, lower variance).
    """
    token_loss = torch.where(masked, token_loss, torch.zeros_like(token_loss))
    if weighting == "elbo":
        weight = torch.where(masked, elbo_weight(t, schedule), torch.zeros_like(t))
        return (weight * token_loss).sum() / max(int(num_response_tokens), 1)
    if weighting == "mean":
        return token_loss.sum() / masked.sum().clamp(min=1)
    raise ValueError(f"loss_weighting must be 'elbo' or 'mean', got {weighting!r}")
