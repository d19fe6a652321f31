"""Which response tokens are masked, and how much each masked token's loss counts: the menu of training objectives.

    spec = NoiseSpec(schedule="cosine", t_sampling="stratified", complementary=True)
    spec.validate(block_size=4)
    noise = draw_noise(response_block, valid, block_size=4, spec=spec)          # masks, levels, weights
    noise = with_complement(noise, valid, spec)                                 # optional second copy
    loss = reduce_loss(token_loss, noise.weight, noise.masked, noise.valid, spec.resolved_normalization())

Every option is one recipe key (see docs/noise.md). The weights, for a masked token i whose mask probability is
p_i(t) at its unit's level t (t uniform on the window):

    elbo       p_i'(t) / p_i(t): the continuous-time ELBO weight (MDLM). 1/t for the linear schedule.
    complement p_i'(t) / (1 - p_i(t)) for the complementary copy, which masks exactly what the first copy kept
               (LaViDa, Li et al. 2025, complementary masking; 1/(1-t) for linear).
    position   with position-dependent masking, p_i = p(t) ** g_j with g_j = exp(s (1 - 2 j / (B - 1))) for the
               j-th token of a block (later tokens masked more; Efficient-DLM's position-dependent masking). The
               token's own level is t_i = p_i, its own weight 1/t_i, and because t (not t_i) is drawn uniformly
               the Jacobian dt_i/dt enters: the ELBO weight is g_j * p'(t) / p(t) (= g_j / t for linear).
    cart       Dream's context-adaptive token-level noise rescheduling (Ye et al. 2025, "Dream 7B"): a masked token
               counts by how much clean context it has nearby, w_n = 1/2 sum_i [i visible and clean] p (1-p)^(|n-i|-1),
               summed over the context a block-diffusion token sees (prompt, earlier blocks, the clean tokens of its
               own block). Not an ELBO weight: a heuristic reweighting.
    mean       weight 1 (normalised by the masked tokens: the biased, low-variance plain mean).

Semantic (coarse-to-fine) order: instead of masking each token independently, rank the tokens of a unit (a block
or the whole response) by significance (higher = more meaningful, see `llm2diff.noise.scorers`), mix the rank with
Gumbel noise at a temperature, and mask the lowest-ranked fraction p(t). At temperature 0 the order is
deterministic: the masked set at level t is fixed, so the 1/t weight no longer comes from an ELBO (it is then just a
weighting that emphasises lightly masked states); at temperature infinity the order is uniformly random and the
masking is the ordinary random one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from llm2diff.names import check_choice
from llm2diff.noise.schedule import (
    SCHEDULES,
    T_SAMPLING,
    check_schedule,
    mask_probability,
    mask_probability_rate,
    sample_noise_levels,
)

UNITS = ("block", "sequence")
ORDERS = ("random", "semantic")
WEIGHTINGS = ("elbo", "mean", "cart")
NORMALIZATIONS = ("auto", "response", "masked", "sequence")
EDIT_SOURCES = ("uniform", "parent", "self")  # editing noise's wrong tokens (`llm2diff.noise.editing`)


def _key(default, recipe_key: str | None = None):
    """A `NoiseSpec` field, with the recipe key that sets it when that is not the field's own name."""
    return field(default=default, metadata={"recipe_key": recipe_key} if recipe_key else {})


@dataclass(frozen=True)
class NoiseSpec:
    """How the training targets are corrupted and weighted. Each field is set by a recipe key: its own name, or the
    one its metadata names (`recipe_key`: `noise_schedule`, `noise_unit`, `noise_order`, `position_masking_strength`,
    `complementary_masks`, `loss_weighting`, `loss_normalization`); `from_recipe` reads them.

    schedule: "linear" | "cosine" | "loglinear" (see `llm2diff.noise.schedule`).
    t_min, t_max: the window the noise level t is drawn from (BD3-LM's clipped masking rate).
    t_sampling: "uniform" | "stratified" | "antithetic" draws of t across the batch.
    unit: "block" (one t per block, as the sampler denoises a block at a time) or "sequence" (one t per response).
    order: "random" (each token masked independently) or "semantic" (least significant first; needs scores).
    semantic_temperature: mixes the semantic order with random order (0 = pure order, inf = random).
    position_strength: s >= 0; s > 0 masks later tokens of a block more (position-dependent masking).
    complementary: add a second copy of each example that masks exactly the tokens the first copy kept.
    weighting: "elbo" | "mean" | "cart".
    cart_p: the geometric kernel's p for "cart".
    normalization: "auto" (response for elbo/cart, masked for mean) | "response" (sum / response tokens in the
        batch) | "masked" (sum / masked tokens) | "sequence" (per-sequence sum / its response tokens, averaged).
    edit_fraction: editing noise (`llm2diff.noise.editing`): each visible response token of the noisy copy past
        its block's first is replaced by a wrong one with this probability (0 = off: the absorbing objective alone).
    edit_source: "uniform" | "parent" | "self": where the wrong tokens come from.
    edit_loss_weight: weight of the cross-entropy of the true token at corrupted positions (per response token).
    edit_keep_weight: weight of the cross-entropy of the true token at the visible tokens left right (per response
        token; teaches keeping them).
    """

    schedule: str = _key("linear", "noise_schedule")
    t_min: float = _key(1e-3)
    t_max: float = _key(1.0)
    t_sampling: str = _key("uniform")
    unit: str = _key("block", "noise_unit")
    order: str = _key("random", "noise_order")
    semantic_temperature: float = _key(0.0)
    position_strength: float = _key(0.0, "position_masking_strength")
    complementary: bool = _key(False, "complementary_masks")
    weighting: str = _key("elbo", "loss_weighting")
    cart_p: float = _key(0.1)
    normalization: str = _key("auto", "loss_normalization")
    edit_fraction: float = _key(0.0)
    edit_source: str = _key("uniform")
    edit_loss_weight: float = _key(1.0)
    edit_keep_weight: float = _key(0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def recipe_keys(cls) -> dict[str, str]:
        """field -> the recipe key that sets it."""
        return {f.name: f.metadata.get("recipe_key", f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def from_recipe(cls, recipe) -> NoiseSpec:
        """The spec an object with the recipe keys as attributes (`DiffusionSFTConfig`) describes."""
        return cls(**{name: getattr(recipe, key) for name, key in cls.recipe_keys().items()})

    def resolved_normalization(self) -> str:
        if self.normalization != "auto":
            return self.normalization
        return "masked" if self.weighting == "mean" else "response"

    def is_plain(self) -> bool:
        """True when the spec is the default per-block random absorbing noise (whatever the weighting)."""
        default = NoiseSpec()
        return all(getattr(self, f) == getattr(default, f) for f in
                   ("t_sampling", "unit", "order", "position_strength", "complementary"))

    def validate(self, block_size: int, shift: bool = True) -> None:
        """Reject unknown values and combinations that cannot work, saying what to change."""
        check_schedule(self.schedule)
        for name, value, allowed in (("t_sampling", self.t_sampling, T_SAMPLING), ("noise_unit", self.unit, UNITS),
                                     ("noise_order", self.order, ORDERS), ("loss_weighting", self.weighting, WEIGHTINGS),
                                     ("loss_normalization", self.normalization, NORMALIZATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 < self.t_max <= 1.0 or not 0.0 <= self.t_min <= self.t_max:
            raise ValueError(f"noise window must satisfy 0 <= t_min <= t_max <= 1 and t_max > 0, got "
                             f"t_min={self.t_min}, t_max={self.t_max}")
        if self.weighting == "elbo" and self.t_min == 0.0:
            raise ValueError("loss_weighting 'elbo' needs t_min > 0 (the 1/t weight is infinite at t=0)")
        if self.complementary and self.weighting == "elbo":
            p_max = float(mask_probability(torch.tensor(self.t_max, dtype=torch.float64), self.schedule))
            if p_max >= 1.0 - 1e-6:
                raise ValueError(
                    "complementary_masks with loss_weighting 'elbo' needs t_max < 1: the complementary copy's "
                    f"weight p'(t)/(1-p(t)) is infinite where the first copy masks everything (t_max={self.t_max}, "
                    f"schedule {self.schedule!r}); set e.g. t_max: 0.999 or noise_schedule: loglinear")
        if self.semantic_temperature < 0 or math.isnan(self.semantic_temperature):
            raise ValueError(f"semantic_temperature must be >= 0 (inf = random order), got {self.semantic_temperature}")
        if self.position_strength < 0:
            raise ValueError(f"position_masking_strength must be >= 0, got {self.position_strength}")
        if not 0.0 < self.cart_p < 1.0:
            raise ValueError(f"cart_p must be in (0, 1), got {self.cart_p}")
        if self.order == "semantic" and self.position_strength > 0:
            raise ValueError("noise_order 'semantic' and position_masking_strength > 0 both decide which tokens go "
                             "first; use one of them")
        if self.order == "semantic" and self.complementary:
            raise ValueError("complementary_masks masks exactly what the first copy kept, i.e. the most significant "
                             "tokens first, which inverts semantic noise; use one of them")
        if block_size == 1 and shift and not (self.is_plain() and self.weighting != "cart"):
            raise ValueError("block_size 1 with shift is causal-LM SFT (the AR twin): nothing is masked, so the noise "
                             "options (t_sampling, noise_unit, noise_order, position masking, complementary masks, "
                             "cart) do not apply; leave them at their defaults")
        if not 0.0 <= self.edit_fraction < 1.0:
            raise ValueError(f"edit_fraction must be in [0, 1) (the probability that a visible token is replaced by a "
                             f"wrong one), got {self.edit_fraction}")
        check_choice("edit_source", self.edit_source, EDIT_SOURCES)
        if self.edit_loss_weight < 0 or self.edit_keep_weight < 0:
            raise ValueError(f"edit_loss_weight and edit_keep_weight must be >= 0, got {self.edit_loss_weight} and "
                             f"{self.edit_keep_weight}")
        if self.edit_fraction > 0 and block_size == 1:
            raise ValueError("edit_fraction needs block_size > 1: editing noise corrupts visible tokens inside a block, "
                             "and a block of one token has none (block_size 1 with shift is causal-LM SFT)")
        if block_size == 1 and self.position_strength > 0:
            raise ValueError("position_masking_strength needs block_size > 1 (positions inside a block)")


@dataclass
class Noise:
    """One draw of the noise for a batch (all `(rows, R)`; rows double with a complementary copy).

    masked: tokens replaced by the mask token (the loss is taken there).
    t: the noise level of each token's unit.
    p: each token's mask probability p_i(t).
    weight: each token's loss weight (0 where not masked).
    valid: real response tokens (False at batch padding).
    copy: `(rows,)` 0 for the first copy, 1 for the complementary copy.
    """

    masked: torch.Tensor
    t: torch.Tensor
    p: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
    copy: torch.Tensor


def position_exponents(response_block: torch.Tensor, block_size: int, strength: float) -> torch.Tensor:
    """g_j = exp(s (1 - 2 j / (B - 1))) for the j-th token of its block: > 1 early in a block, < 1 late."""
    offset = torch.arange(response_block.shape[1], device=response_block.device) % block_size
    if strength == 0 or block_size == 1:
        return torch.ones(response_block.shape, device=response_block.device)
    g = torch.exp(strength * (1.0 - 2.0 * offset.float() / (block_size - 1)))
    return g[None, :].expand(response_block.shape[0], -1)


def _unit_index(response_block: torch.Tensor, unit: str) -> torch.Tensor:
    return response_block.clamp(min=0) if unit == "block" else torch.zeros_like(response_block)


def semantic_order_mask(
    scores: torch.Tensor, valid: torch.Tensor, p: torch.Tensor, unit_size: int, temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask the least significant fraction p of each unit.

    Within each unit of `unit_size` consecutive response positions, valid tokens are ranked by score (rank / (n-1)
    in [0, 1], 0 = least significant), Gumbel noise times `temperature` is added, and the token at order position
    r gets the masking time m = (r + u) / n with u ~ U(0, 1): it is masked when m < p. So a fraction p of the unit
    is masked on average (exactly floor or ceil of p n tokens), least significant first.

    Args:
        scores: `(batch, R)` significance (higher = more meaningful); any value where not valid.
        valid: `(batch, R)` bool.
        p: `(batch, R)` mask probability of each token's unit (constant within a unit).
        unit_size: B for per-block ordering, R for per-sequence ordering (R must be a multiple of it).
    """
    batch, length = scores.shape
    if length % unit_size:
        raise ValueError(f"response length {length} is not a multiple of the ordering unit {unit_size}")
    shape = (batch, length // unit_size, unit_size)
    s = scores.float().masked_fill(~valid, float("inf")).reshape(shape)
    ok = valid.reshape(shape)
    n = ok.sum(-1, keepdim=True).clamp(min=1)
    rank = s.argsort(dim=-1, stable=True).argsort(-1).float()                  # invalid (inf) rank last
    q = rank / (n - 1).clamp(min=1)
    if temperature > 0:
        u = torch.rand(shape, generator=generator, device=scores.device).clamp(1e-12, 1 - 1e-12)
        q = q + temperature * -torch.log(-torch.log(u))
    key = q.masked_fill(~ok, float("inf"))
    order = key.argsort(dim=-1, stable=True).argsort(-1).float()
    jitter = torch.rand(shape, generator=generator, device=scores.device)
    m = (order + jitter) / n
    return ((m < p.reshape(shape)) & ok).reshape(batch, length)


def draw_noise(
    response_block: torch.Tensor, valid: torch.Tensor, block_size: int, spec: NoiseSpec,
    scores: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> Noise:
    """Draw noise levels and masks for a batch of responses (padded to whole blocks) and the tokens' ELBO weights.

    Weights for "cart" depend on the layout and are filled in by `cart_weights`; this returns the "elbo" or "mean"
    weight (for "cart", weight 1 as a placeholder).
    """
    device = valid.device
    batch, length = valid.shape
    units = _unit_index(response_block, spec.unit)
    num_units = int(units.max()) + 1 if length else 1
    t_unit = sample_noise_levels((batch, num_units), spec.t_min, spec.t_max, generator, device, spec.t_sampling)
    t = t_unit.gather(1, units)
    p_base = mask_probability(t, spec.schedule)
    g = position_exponents(response_block, block_size, spec.position_strength)
    p = p_base.clamp(min=0) ** g
    if spec.order == "semantic" and math.isfinite(spec.semantic_temperature):
        if scores is None:
            raise ValueError("noise_order 'semantic' needs significance scores for every example (a "
                             "'response_scores' column); set semantic_scorer or precompute them")
        unit_size = block_size if spec.unit == "block" else length
        masked = semantic_order_mask(scores, valid, p, unit_size, spec.semantic_temperature, generator)
    else:
        u = torch.rand(valid.shape, generator=generator, device=device)
        masked = (u < p) & valid
    if spec.weighting == "elbo":
        # p_i = p(t) ** g:  p_i' / p_i = g p'(t) / p(t)
        weight = g * mask_probability_rate(t, spec.schedule) / p_base
    else:
        weight = torch.ones_like(t)
    weight = torch.where(masked, weight, torch.zeros_like(weight))
    return Noise(masked, t, p, weight, valid, torch.zeros(batch, dtype=torch.long, device=device))


def with_complement(noise: Noise, spec: NoiseSpec, block_size: int, response_block: torch.Tensor) -> Noise:
    """Append the complementary copy: rows repeated, masking exactly the valid tokens the first copy kept."""
    masked2 = noise.valid & ~noise.masked
    if spec.weighting == "elbo":
        g = position_exponents(response_block, block_size, spec.position_strength)
        p_base = mask_probability(noise.t, spec.schedule)
        # the copy masks with q_i = 1 - p(t) ** g:  |q_i'| / q_i = g p^(g-1) p'(t) / (1 - p^g)
        rate = g * p_base.clamp(min=0) ** (g - 1) * mask_probability_rate(noise.t, spec.schedule)
        weight2 = rate / (1.0 - noise.p)  # = complement_weight(t) = p'(t) / (1 - p(t)) when g = 1
    else:
        weight2 = torch.ones_like(noise.t)
    weight2 = torch.where(masked2, weight2, torch.zeros_like(weight2))
    return Noise(
        masked=torch.cat([noise.masked, masked2]), t=torch.cat([noise.t, noise.t]),
        p=torch.cat([noise.p, 1.0 - noise.p]), weight=torch.cat([noise.weight, weight2]),
        valid=torch.cat([noise.valid, noise.valid]), copy=torch.cat([noise.copy, torch.ones_like(noise.copy)]),
    )


def cart_weights(
    masked: torch.Tensor, valid: torch.Tensor, block_size: int, prompt_lengths: torch.Tensor, p: float = 0.1
) -> torch.Tensor:
    """Dream's CART weight of each masked token over the context a block-diffusion token sees.

    w_n = 1/2 * sum over visible clean positions i of p (1 - p)^(|n - i| - 1). Visible and clean: the whole
    prompt, every response token of earlier blocks, and the unmasked tokens of n's own block. The prompt and
    earlier blocks form one contiguous run ending right before the block, summed in closed form:
    sum_{d=a}^{b} p (1-p)^(d-1) = (1-p)^(a-1) - (1-p)^b, with d the distance to n.

    Args:
        masked, valid: `(batch, R)` bool.
        prompt_lengths: `(batch,)` prompt length of each row.

    Returns:
        `(batch, R)` weights, 0 where not masked.
    """
    batch, length = masked.shape
    device = masked.device
    j = torch.arange(length, device=device)
    offset = (j % block_size).float()                      # distance to the block start
    q = 1.0 - p
    nearest = offset + 1.0                                 # distance to the last position before the block
    farthest = j.float()[None, :] + prompt_lengths[:, None].float()  # distance to the first prompt token
    prefix = q ** (nearest - 1.0)[None, :] - q ** farthest
    # inside the block: every clean (unmasked, valid) token of the same block
    same_block = (j[:, None] // block_size) == (j[None, :] // block_size)
    distance = (j[:, None] - j[None, :]).abs().float()
    kernel = torch.where(same_block & (distance > 0), p * q ** (distance - 1.0), torch.zeros_like(distance))
    clean = (valid & ~masked).float()
    in_block = clean @ kernel.T                             # (batch, R): sum over clean m of kernel[n, m]
    weight = 0.5 * (prefix + in_block)
    return torch.where(masked, weight, torch.zeros_like(weight))


def reduce_loss(
    token_loss: torch.Tensor, weight: torch.Tensor, masked: torch.Tensor, valid: torch.Tensor, normalization: str,
) -> torch.Tensor:
    """Scalar loss from per-token cross-entropies and weights.

    normalization:
        "response": sum(w * ce) / (response tokens in the batch)  (the ELBO per token; MDLM, BD3-LM)
        "masked":   sum(w * ce) / (masked tokens in the batch)
        "sequence": mean over rows of sum_row(w * ce) / (response tokens of the row)  (LLaDA's per-sequence form)
    """
    terms = torch.where(masked, weight * token_loss, torch.zeros_like(token_loss))
    if normalization == "response":
        return terms.sum() / valid.sum().clamp(min=1)
    if normalization == "masked":
        return terms.sum() / masked.sum().clamp(min=1)
    if normalization == "sequence":
        rows = valid.any(-1)
        per_row = terms.sum(-1) / valid.sum(-1).clamp(min=1)
        return per_row[rows].sum() / rows.sum().clamp(min=1)
    raise ValueError(f"loss_normalization must be one of {', '.join(NORMALIZATIONS[1:])}, got {normalization!r}")


__all__ = ["NoiseSpec", "Noise", "draw_noise", "with_complement", "cart_weights", "reduce_loss", "semantic_order_mask",
           "position_exponents", "SCHEDULES", "T_SAMPLING", "UNITS", "ORDERS", "WEIGHTINGS", "NORMALIZATIONS"]
