"""Token choice and commit rules of the block sampler (pure functions).

`choose_tokens` turns logits into a proposed token and its confidence at every position; `select_commits`
decides which still-masked positions are committed this step.
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
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose a token per position and its confidence.

    Args:
        logits: `(batch, n, vocab)` with forbidden ids already at -inf.
        temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).

    Returns:
        tokens `(batch, n)` and confidence `(batch, n)`: the probability of the chosen token under the adjusted
        distribution (temperature, top-k and top-p applied). At temperature 0 that distribution is the top-k/top-p
        filtered softmax at temperature 1, so the threshold rule still has a meaningful confidence.
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
    return tokens, confidence


COMMIT_RULES = ("confidence", "coarse_to_fine")


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
