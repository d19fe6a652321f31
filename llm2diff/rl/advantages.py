"""Per-token GRPO advantages from an outcome reward plus process (per-step) reward-model scores.

    adv = process_advantages(rewards, step_spans, step_scores, group_size=4, process_weight=0.5,
                             completion_mask=completion_mask)              # (B, T)

GRPO's group-relative outcome advantage is given to every token of a completion; each reasoning step's PRM score,
normalised within the completion's group, is added on that step's tokens (as in process-supervised GRPO, Shao et
al. 2024, "DeepSeekMath", sec. 4.1.3, with the outcome term kept). `DiffusionGRPOTrainer` puts the result in
`inputs["advantages"]`, which TRL's loss accepts per token.
"""

from __future__ import annotations

import torch

EPS = 1e-4  # as TRL: (r - mean) / (std + 1e-4)


def _mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware mean and Bessel-corrected std (TRL's `nanstd`); std 0 with fewer than two values."""
    finite = values[~torch.isnan(values)]
    if finite.numel() == 0:
        return torch.tensor(0.0, dtype=values.dtype), torch.tensor(0.0, dtype=values.dtype)
    mean = finite.mean()
    std = finite.std() if finite.numel() > 1 else torch.zeros((), dtype=values.dtype)
    return mean, std


def process_advantages(
    outcome_rewards: torch.Tensor, step_spans: list[list[tuple[int, int]]], step_scores: list[list[float]],
    group_size: int, process_weight: float, completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Token-level advantages `(B, T)`.

    Rows come in groups of `group_size` consecutive completions of the same prompt (TRL's order). For completion b
    in group g, with outcome reward r_b and steps k = 1..K_b (token span [start_k, end_k], inclusive, PRM score
    s_{b,k}):

        A[b, j] = m[b, j] * ( (r_b - mean_g r) / (std_g r + 1e-4)
                    + process_weight * sum_{k: start_k <= j <= end_k} (s_{b,k} - mean_g s) / (std_g s + 1e-4) )

    where mean_g r, std_g r are over the group's outcome rewards, mean_g s, std_g s over *all* step scores of all the
    group's completions, std is the sample (Bessel-corrected) standard deviation as in TRL (0 for fewer than two
    values), and m is `completion_mask` (zeros at padding). Tokens outside every step get the outcome term only;
    overlapping spans add up. A NaN outcome reward (unscorable completion) is left out of the group statistics and
    its outcome term is 0, as in TRL.

    Args:
        outcome_rewards: `(B,)` scalar reward per completion.
        step_spans: per completion, its steps' `(start, end)` token indices in the completion (inclusive).
        step_scores: per completion, one PRM score per step.
        group_size: completions per prompt (TRL's `num_generations`).
        process_weight: weight of the process term (0 = outcome only).
        completion_mask: `(B, T)` 1 at completion tokens, 0 at padding.

    Raises:
        ValueError: B not a multiple of `group_size`, or the span / score lists do not match B or each other, or
            a span is not inside the completion.
    """
    rewards = torch.as_tensor(outcome_rewards, dtype=torch.float32).detach().cpu()
    mask = torch.as_tensor(completion_mask)
    if rewards.dim() != 1:
        raise ValueError(f"outcome_rewards must be (B,), got shape {tuple(rewards.shape)}")
    batch = rewards.shape[0]
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"completion_mask must be (B, T) with B={batch}, got shape {tuple(mask.shape)}")
    if group_size < 1 or batch % group_size:
        raise ValueError(f"the batch of {batch} completions is not a whole number of groups of group_size="
                         f"{group_size}")
    if len(step_spans) != batch or len(step_scores) != batch:
        raise ValueError(f"need one list of step spans and one of step scores per completion: got "
                         f"{len(step_spans)} span lists and {len(step_scores)} score lists for {batch} completions")
    width = mask.shape[1]
    for b, (spans, scores) in enumerate(zip(step_spans, step_scores)):
        if len(spans) != len(scores):
            raise ValueError(f"completion {b}: {len(spans)} step spans but {len(scores)} step scores")
        for start, end in spans:
            if not 0 <= start <= end < width:
                raise ValueError(f"completion {b}: step span ({start}, {end}) is not inside the completion's "
                                 f"{width} token positions (spans are inclusive [start, end] token indices)")

    advantages = torch.zeros(batch, width, dtype=torch.float32)
    for g in range(0, batch, group_size):
        rows = range(g, g + group_size)
        r_mean, r_std = _mean_std(rewards[g: g + group_size])
        scores = torch.tensor([s for b in rows for s in step_scores[b]], dtype=torch.float32)
        s_mean, s_std = _mean_std(scores)
        for b in rows:
            outcome = (rewards[b] - r_mean) / (r_std + EPS)
            advantages[b] = 0.0 if torch.isnan(outcome) else outcome
            if process_weight:
                for (start, end), score in zip(step_spans[b], step_scores[b]):
                    advantages[b, start: end + 1] += process_weight * (float(score) - s_mean) / (s_std + EPS)
    return (advantages * mask.detach().cpu().float()).to(mask.device)
