"""Token choice and commit rules of the block sampler (pure functions).

`choose_tokens` turns logits into a proposed token and its confidence at every position; `commit_priority` ranks
the proposals by the chosen rule; `select_commits` decides which still-masked positions are committed this step;
`sub_block_window`, `select_remasks`, `select_disputes` and `select_first_dispute` restrict and revise those choices
(semi-autoregressive sub-blocks inside a block, ReMDM-style correction, learned correction by a block-attention or
a causal judge).

Rules (`commit_rule`):
  confidence      the most confident `tokens_per_step` positions; with `threshold`, also every position whose
                  confidence exceeds it (Fast-dLLM's parallel decoding)
  threshold       the same with a threshold always set (0.9 unless given)
  margin          ranked by top-1 minus top-2 probability; `threshold` applies to the margin
  entropy         entropy-bounded (EB-sampler, Ben-Hamu et al. 2025): the lowest-entropy positions, as many as
                  keep their summed entropy under `entropy_bound` (nats), at least `tokens_per_step`
  random          `tokens_per_step` positions in random order (the order MDLM/LLaDA sampling assumes)
  coarse_to_fine  confidence weighed with each proposed token's significance (semantic noise in reverse)
"""

from __future__ import annotations

import torch


def suppress_ids(logits: torch.Tensor, mask_token_id: int | None, vocab_size: int | None) -> torch.Tensor:
    """Forbid the mask token and ids at or above `vocab_size` (spare embedding rows). Returns a new tensor."""
    logits = logits.clone()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = float("-inf")
    if mask_token_id is not None:
        logits[..., mask_token_id] = float("-inf")
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p; the rest become -inf."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None, return_probs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Propose a token per position and its confidence.

    Args:
        logits: `(batch, n, vocab)` with forbidden ids already at -inf.
        temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).

    Returns:
        tokens `(batch, n)` and confidence `(batch, n)`: the probability of the chosen token under the adjusted
        distribution (temperature, top-k and top-p applied). At temperature 0 that distribution is the top-k/top-p
        filtered softmax at temperature 1, so the threshold rule still has a meaningful confidence.
        With `return_probs`, also that distribution `(batch, n, vocab)` (for the margin and entropy rules).
    """
    logits = filter_top_k_top_p(logits.float(), top_k, top_p)
    if temperature and temperature > 0:
        probs = (logits / temperature).softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    else:
        probs = logits.softmax(-1)
        tokens = probs.argmax(-1)
    confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
    return (tokens, confidence, probs) if return_probs else (tokens, confidence)


COMMIT_RULES = ("confidence", "threshold", "margin", "entropy", "random", "coarse_to_fine")
DEFAULT_THRESHOLD = 0.9
NO_THRESHOLD = float("inf")  # pass as `threshold` to override a model's saved threshold: no position exceeds it


def margin_scores(probs: torch.Tensor) -> torch.Tensor:
    """`(batch, n)` top-1 minus top-2 probability of `(batch, n, vocab)` distributions (Kim et al. 2025)."""
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def entropy_scores(probs: torch.Tensor) -> torch.Tensor:
    """`(batch, n)` entropy in nats of `(batch, n, vocab)` distributions."""
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def entropy_bounded_commits(entropy: torch.Tensor, todo: torch.Tensor, bound: float, minimum: int = 1) -> torch.Tensor:
    """Commit the lowest-entropy eligible positions while their summed entropy stays within `bound`.

    Positions are taken in increasing entropy; the first `minimum` are always taken (so every step progresses),
    then the next ones as long as the running sum is <= `bound`. Returns a `(batch, n)` bool subset of `todo`.
    """
    scores = entropy.masked_fill(~todo, float("inf"))
    order = scores.argsort(-1)
    sorted_scores = scores.gather(-1, order)
    running = sorted_scores.masked_fill(torch.isinf(sorted_scores), 0.0).cumsum(-1)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take_sorted = ((running <= bound) | (rank < minimum)) & ~torch.isinf(sorted_scores)
    return torch.zeros_like(todo).scatter(-1, order, take_sorted) & todo


def random_priority(shape: tuple[int, ...], device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random priorities: committing the top k of them is a uniformly random order of unmasking."""
    return torch.rand(shape, device=device, generator=generator)


def sub_block_window(todo: torch.Tensor, sub_block_size: int | None) -> torch.Tensor:
    """Restrict `todo` to the first sub-block of each row that still has masked positions.

    A block of B positions is decoded as B / sub_block_size consecutive sub-blocks, left to right, each
    bidirectional inside (semi-autoregressive decoding inside the block, as Fast-dLLM v2's sub-blocks).
    None (or a size >= B) leaves `todo` as it is.
    """
    size = todo.shape[-1]
    if not sub_block_size or sub_block_size >= size:
        return todo
    sub = torch.arange(size, device=todo.device) // sub_block_size
    first = torch.where(todo, sub, sub.max() + 1).min(-1, keepdim=True).values
    return todo & (sub == first)


def select_remasks(
    current_prob: torch.Tensor, revisable: torch.Tensor, threshold: float, budget: torch.Tensor
) -> torch.Tensor:
    """ReMDM-style correction: which committed positions to mask again (Wang et al. 2025, "Remasking Discrete
    Diffusion Models with Inference-Time Scaling").

    Args:
        current_prob: `(batch, n)` the model's present probability of each committed token, re-read from the
            latest forward pass (which now sees the tokens committed since).
        revisable: `(batch, n)` bool, committed positions that may still be retracted (not given by the user).
        threshold: a committed token whose present probability is below it is a candidate.
        budget: `(batch,)` remasks each row may still make in this block.

    Returns:
        `(batch, n)` bool: per row, the lowest-probability candidates, at most `budget` of them.
    """
    candidates = revisable & (current_prob < threshold)
    scores = current_prob.masked_fill(~candidates, float("inf"))
    rank = scores.argsort(-1).argsort(-1)
    return candidates & (rank < budget[:, None])


def select_disputes(
    best_prob: torch.Tensor, disputed: torch.Tensor, threshold: float, budget: torch.Tensor
) -> torch.Tensor:
    """Learned correction: which committed positions to act on, where the model now predicts another token.

    Args:
        best_prob: `(batch, n)` the probability of the model's present top prediction at each position.
        disputed: `(batch, n)` bool, revisable committed positions whose top prediction differs from the token there.
        threshold: act only where that prediction's probability reaches it.
        budget: `(batch,)` corrections each row may still make in this block.

    Returns:
        `(batch, n)` bool: per row, the most confident disputes, at most `budget` of them.
    """
    candidates = disputed & (best_prob >= threshold)
    scores = best_prob.masked_fill(~candidates, float("-inf"))
    rank = (-scores).argsort(-1).argsort(-1)
    return candidates & (rank < budget[:, None])


def select_first_dispute(
    best_prob: torch.Tensor, disputed: torch.Tensor, threshold: float, budget: torch.Tensor
) -> torch.Tensor:
    """Learned correction by a causal judge: per row with budget left, only the first (leftmost) position where
    the prediction disputes the token there with probability >= `threshold`.

    A causal judge reads each token from the tokens before it, so once one token is wrong, its judgements of the
    tokens after it are made under the error (a digit dropped shifts everything after it, and those shifted tokens
    draw the surest disputes): fix the first, then judge again. Same arguments and result shape as
    `select_disputes`.
    """
    candidates = disputed & (best_prob >= threshold) & (budget[:, None] > 0)
    first = candidates & (candidates.long().cumsum(-1) == 1)
    return first


def coarse_to_fine_priority(
    tokens: torch.Tensor, confidence: torch.Tensor, significance: torch.Tensor, weight: float
) -> torch.Tensor:
    """Priority of committing each proposal under the coarse-to-fine rule, mirroring semantic noise.

    priority = log(confidence) + weight * significance[token], with the table's significance in [0, 1] (1 = the
    most meaningful tokens, which semantic noise masks last and the sampler therefore commits first). weight 0 is
    the confidence rule; a large weight commits by significance alone.
    """
    return confidence.clamp(min=1e-30).log() + weight * significance[tokens]


def select_commits(
    confidence: torch.Tensor, todo: torch.Tensor, tokens_per_step: int = 1, threshold: float | None = None,
    priority: torch.Tensor | None = None, floor: float | None = None,
) -> torch.Tensor:
    """Which masked positions to commit this step.

    Args:
        confidence: `(batch, n)` confidence of each proposal.
        todo: `(batch, n)` bool, positions still masked and eligible.
        tokens_per_step: commit exactly this many (the highest priority) per row; with `threshold`, the minimum.
        threshold: if set, also commit every eligible position whose confidence is above it.
        priority: `(batch, n)` order of preference (default: the confidence).
        floor: if set, positions whose confidence is below it are not committed this step, except that a row
            whose choices all fall below commits its single most confident position (so every block finishes).

    Returns:
        `(batch, n)` bool, a subset of `todo`; every row with eligible positions commits at least one.
    """
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    scores = (confidence if priority is None else priority).masked_fill(~todo, float("-inf"))
    k = min(tokens_per_step, scores.shape[-1])
    top = torch.topk(scores, k, dim=-1).indices
    commit = torch.zeros_like(todo).scatter(-1, top, True) & todo
    if threshold is not None:
        commit |= (confidence > threshold) & todo
    if floor is not None:
        commit &= confidence >= floor
        empty = ~commit.any(-1) & todo.any(-1)
        best = confidence.masked_fill(~todo, float("-inf")).argmax(-1)
        fallback = torch.zeros_like(todo).scatter(-1, best[:, None], True) & todo
        commit |= fallback & empty[:, None]
    return commit
