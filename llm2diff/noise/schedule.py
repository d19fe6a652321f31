"""Absorbing ("mask") noise: schedules, noise levels and loss weights (pure functions).

A schedule maps a noise level t in [0, 1] to p(t) = 1 - alpha(t), the probability that a token is masked. The
continuous-time ELBO of absorbing diffusion weighs a masked token's cross-entropy by

    w(t) = -alpha'(t) / (1 - alpha(t)) = p'(t) / p(t)          (1/t for the linear schedule)

(MDLM, Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models"; BD3-LM, Arriola et al. 2025,
"Block Diffusion"). Schedules:

    linear     p = t                                   w = 1/t
    cosine     p = 1 - cos(pi t / 2)                   w = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))
               (masks less at small t, more at large t than linear; MaskGIT/MDLM's cosine)
    loglinear  p = (1 - eps) t, eps = 1e-3            w = 1/t
               (MDLM's log-linear schedule, total noise sigma(t) = -log(1 - (1 - eps) t): linear in p, but the
               fully masked state is never reached, so every example keeps a little context)

t is drawn from a window [t_min, t_max] per block (or per sequence): the 1/t weight's variance diverges as t -> 0,
and BD3-LM shows a clipped window (e.g. [0.3, 0.8]) lowers the variance of the training loss further. Draws can be
stratified or antithetic across the batch, which keeps the estimator unbiased and lowers its variance (Kingma et
al. 2021, "Variational Diffusion Models", low-discrepancy sampling of t).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "loglinear")
T_SAMPLING = ("uniform", "stratified", "antithetic")
LOGLINEAR_EPS = 1e-3


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise_schedule {name!r}; available: {', '.join(SCHEDULES)}")


def mask_probability(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """p(t) = 1 - alpha(t): probability that a token is masked at noise level t."""
    check_schedule(schedule)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(0.5 * math.pi * t)
    return (1.0 - LOGLINEAR_EPS) * t


def mask_probability_rate(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """dp/dt, the rate at which tokens are masked at noise level t."""
    check_schedule(schedule)
    if schedule == "linear":
        return torch.ones_like(t)
    if schedule == "cosine":
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    return torch.full_like(t, 1.0 - LOGLINEAR_EPS)


def elbo_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)) = p'(t) / p(t), the ELBO weight of a masked token at level t (1/t for linear)."""
    return mask_probability_rate(t, schedule) / mask_probability(t, schedule)


def complement_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """p'(t) / (1 - p(t)): the ELBO weight of a token masked by the complementary copy (1/(1-t) for linear).

    The complementary copy masks each token with probability q = 1 - p(t); as t runs over [0, 1], q runs over the
    same range backwards, so its ELBO weight is |dq/dt| / q = p'(t) / (1 - p(t)).
    """
    return mask_probability_rate(t, schedule) / (1.0 - mask_probability(t, schedule))


def sample_noise_levels(
    shape: tuple[int, ...], t_min: float, t_max: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None, sampling: str = "uniform",
) -> torch.Tensor:
    """Noise levels in [t_min, t_max] of the given shape (e.g. `(batch, num_blocks)`).

    sampling:
        "uniform":    i.i.d. U[t_min, t_max].
        "stratified": the n = prod(shape) draws take one point in each of n equal strata of [0, 1], in random
                      order (each draw is still marginally uniform; their spread is even).
        "antithetic": draws come in pairs (u, 1 - u); with an odd count the last draw is plain uniform.
    """
    if sampling not in T_SAMPLING:
        raise ValueError(f"t_sampling must be one of {', '.join(T_SAMPLING)}, got {sampling!r}")
    n = math.prod(shape)
    if sampling == "uniform" or n == 0:
        u = torch.rand(shape, generator=generator, device=device)
    elif sampling == "stratified":
        offsets = torch.rand(n, generator=generator, device=device)
        strata = torch.randperm(n, generator=generator, device=device).to(offsets.dtype)
        u = ((strata + offsets) / n).reshape(shape)
    else:
        half = torch.rand(n // 2, generator=generator, device=device)
        extra = torch.rand(n % 2, generator=generator, device=device)
        u = torch.cat([half, 1.0 - half, extra]).reshape(shape)
    return t_min + (t_max - t_min) * u


def sample_token_mask(
    t: torch.Tensor, valid: torch.Tensor, schedule: str = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which tokens are masked, each independently with probability p(t).

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
    """Scalar loss from per-token cross-entropies under plain per-block noise (see `masking.reduce_loss` for all).

    Args:
        token_loss: `(batch, R)` cross-entropy of each response token's prediction (any value where not masked).
        masked: `(batch, R)` bool, the tokens the loss is taken on.
        t: `(batch, R)` noise level of each token.
        num_response_tokens: normaliser of the ELBO (response tokens in the batch, end-of-sequence pads included).
        weighting: "elbo": sum of w(t) * loss over masked tokens / num_response_tokens (unbiased, higher
            variance); "mean": plain mean over masked tokens (biased, lower variance).
    """
    token_loss = torch.where(masked, token_loss, torch.zeros_like(token_loss))
    if weighting == "elbo":
        weight = torch.where(masked, elbo_weight(t, schedule), torch.zeros_like(t))
        return (weight * token_loss).sum() / max(int(num_response_tokens), 1)
    if weighting == "mean":
        return token_loss.sum() / masked.sum().clamp(min=1)
    raise ValueError(f"loss_weighting must be 'elbo' or 'mean', got {weighting!r}")
