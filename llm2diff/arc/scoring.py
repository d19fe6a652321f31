"""Product-of-experts scoring of candidate ARC output grids: every candidate under every augmented view of the task.

    from llm2diff.arc.scoring import score_candidates, top_two
    from llm2diff.tasks.arc_agi import ARCAGITask, all_transforms

    task, views = ARCAGITask(), all_transforms()                   # the 8 symmetries (identity first)
    scored = score_candidates(dlm, task, row, candidates, views)    # candidates: grids, or {grid key: proposals}
    scored[0].grid, scored[0].score, scored[0].view_scores          # best first
    attempts = top_two(scored)                                      # the two grids to submit

Why
---
A search (sampling, beam search, voting over augmented prompts) proposes a handful of grids. Each view `t` is the
task with every grid transformed by `t` (a D4 symmetry, possibly with a colour permutation); the model scores a
candidate `g` under that view as `log p(t(g) | prompt of the task under t)`. Views are experts: the product of
their probabilities, i.e. the sum of the log-likelihoods, is the candidate's score. A wrong grid may look likely
from one orientation, but it is rarely likely under all of them, while the right answer is right in every view.

For each candidate and view the prompt is the row augmented by `t`, rendered exactly as `llm2diff eval` renders
augmented ARC prompts (`PromptRenderer(dlm)(task, row, [], question=task.augmented_question(row, t))`, no shots),
and the continuation is `grid_to_text(t.apply(g))` followed by the end-of-sequence token: training responses end
with eos, and scoring it makes grids of different sizes comparable (a grid that stops too early or too late pays
for it). Scores come from `llm2diff.evaluation.likelihood.loglikelihood`: the diffusion model's seeded Monte-Carlo
ELBO (`num_samples` samples), or with `use_parent=True` the AR parent's exact log p; an AR twin (block size 1)
gives the exact causal log-likelihood either way.

Combining the views (`combine`)
-------------------------------
    "sum"       the product of experts: sum of the view log-likelihoods (default)
    "mean"      the sum divided by the number of views (the same ranking, on a per-view scale)
    "min"       the worst view (pessimistic: a candidate is only as good as its least likely view)
    "vote+sum"  rank by `sources` (how many searches proposed the grid) first, then by the sum (ARChitects-like)

The result is sorted best first; ties go to the grid with more `sources`, then to the smaller grid text, so the
order is deterministic.

Cost
----
One `loglikelihood` call per distinct (prompt, continuation) pair, i.e. at most candidates x views calls: for the
diffusion ELBO each is `num_samples` noised copies of prompt + grid (forwards of up to 8 copies), for the AR parent
or twin one forward. Each call re-reads the whole prompt (`loglikelihood` scores one continuation per call; sharing
a prompt's cache between candidates would save that but is not done here). Prompts are rendered once per view, and
views that render the same prompt and grid (a symmetric task and grid) are scored once.

Determinism
-----------
The ELBO seed of a pair is derived from `seed` and the pair's token ids (`view_seed`), never from the view's
position in `views`, and the views are summed exactly (`math.fsum`, independent of order). So scoring the task
augmented by `T` with the candidates mapped through `T` gives the same scores as scoring the original, whenever
`views` is a group containing `T` (e.g. the 8 symmetries for a symmetry `T`): the same pairs are scored, in
another order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llm2diff.evaluation.likelihood import loglikelihood
from llm2diff.evaluation.prompts import PromptRenderer
from llm2diff.names import check_choice
from llm2diff.tasks.arc_agi import Grid, Transform, grid_problem, grid_to_text, text_to_grid

__all__ = ["COMBINES", "ScoredCandidate", "combine_scores", "score_candidates", "top_two", "view_seed"]

#: how view scores combine into one (see the module doc)
COMBINES = ("sum", "mean", "min", "vote+sum")


@dataclass
class ScoredCandidate:
    """One candidate grid and its scores.

    grid: in the task's own orientation and colours.
    score: the combined score (higher is better; see `COMBINES`).
    view_scores: log-likelihood of the grid under each view, in the order of `views`.
    sources: how many searches/samples proposed it (tie-break, and the first key of "vote+sum").
    """

    grid: Grid
    score: float
    view_scores: list[float] = field(default_factory=list)
    sources: int = 1


def view_seed(seed: int, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> int:
    """The ELBO seed of one (prompt, continuation) pair: a stable 63-bit hash of `seed` and both id lists (the
    same in every process and on every machine, unlike Python's `hash`)."""
    text = f"{int(seed)}|{','.join(map(str, context_ids))}|{','.join(map(str, continuation_ids))}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def combine_scores(view_scores: Sequence[float], combine: str = "sum") -> float:
    """The combined score of one candidate's view log-likelihoods ("vote+sum" combines as "sum")."""
    _check_combine(combine)
    if not view_scores:
        raise ValueError("no view scores to combine")
    if combine == "min":
        return float(min(view_scores))
    total = math.fsum(view_scores)  # exactly rounded: the same whatever the order of the views
    return total / len(view_scores) if combine == "mean" else total


def _check_combine(combine: str) -> None:
    check_choice("combine", combine, COMBINES, cutoff=0.4)


def _grid_of_key(key, where: str) -> Grid:
    """A dict key (a grid as nested tuples/lists, or its text) -> a validated grid."""
    if isinstance(key, str):
        grid = text_to_grid(key)
        if grid is None:
            raise ValueError(f"{where}: the text {key!r} holds no grid")
    else:
        grid = [list(r) if isinstance(r, (tuple, list)) else r for r in key] if isinstance(key, (tuple, list)) else key
    if problem := grid_problem(grid):
        raise ValueError(f"{where}: {problem}")
    return grid


def _merge(candidates: Sequence[Grid] | Mapping) -> list[tuple[Grid, int]]:
    """(grid, proposals) per distinct grid, in order of first appearance."""
    if isinstance(candidates, Mapping):
        items = []
        for i, (key, count) in enumerate(candidates.items()):
            if type(count) is not int or count < 1:
                raise ValueError(f"candidate {i} ({key!r}): the number of proposals must be an integer >= 1, "
                                 f"got {count!r}")
            items.append((_grid_of_key(key, f"candidate {i}"), count))
    else:
        items = [(_grid_of_key(grid, f"candidate {i}"), 1) for i, grid in enumerate(candidates)]
    merged: dict[tuple, list] = {}
    for grid, count in items:
        key = tuple(map(tuple, grid))
        if key in merged:
            merged[key][1] += count
        else:
            merged[key] = [grid, count]
    return [(grid, count) for grid, count in merged.values()]


def score_candidates(dlm, task, row: dict, candidates: Sequence[Grid] | Mapping, views: Sequence[Transform], *,
                     use_parent: bool = False, num_samples: int = 8, seed: int = 0, combine: str = "sum",
                     renderer=None) -> list[ScoredCandidate]:
    """Score every candidate grid under every view and combine the views (see the module doc).

    Args:
        dlm: a `DiffusionLM`.
        task: the `ARCAGITask` whose prompts the model was trained on (`augmented_question` renders each view).
        row: one ARC row (`train` pairs and `test_input`), in its own orientation.
        candidates: grids in the row's orientation (duplicates are merged and counted as proposals), or a mapping
            of grid key (nested tuples as `vote` keys them, or the grid's text) -> number of proposals.
        views: the transforms to score under, e.g. `all_transforms()` (the 8 symmetries); at least one.
        use_parent: the AR parent's exact log-likelihood instead of the diffusion ELBO.
        num_samples: Monte-Carlo samples of each ELBO (ignored by the exact AR scores).
        seed: mixed with each pair's token ids into its ELBO seed (`view_seed`).
        combine: one of `COMBINES`.
        renderer: prompt ids of (task, row, shots, question=...); default `PromptRenderer(dlm)`.

    Returns:
        One `ScoredCandidate` per distinct grid, best first; [] for no candidates.
    """
    _check_combine(combine)
    views = list(views)
    if not views:
        raise ValueError("views is empty: give at least one transform (e.g. all_transforms() for the 8 symmetries)")
    merged = _merge(candidates)
    if not merged:
        return []
    tokenizer = dlm.tokenizer
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token, which ends every scored grid (as it ends training "
                         "responses); set tokenizer.eos_token")
    render = renderer or PromptRenderer(dlm)
    prompts = [tuple(render(task, row, [], question=task.augmented_question(row, t))) for t in views]
    cache: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    def view_score(prompt: tuple[int, ...], text: str) -> float:
        continuation = (*tokenizer(text, add_special_tokens=False).input_ids, eos)
        if (prompt, continuation) not in cache:
            cache[prompt, continuation] = loglikelihood(
                dlm, list(prompt), list(continuation), use_parent=use_parent, num_samples=num_samples,
                seed=view_seed(seed, prompt, continuation))
        return cache[prompt, continuation]

    scored = []
    for grid, sources in merged:
        view_scores = [view_score(prompt, grid_to_text(t.apply(grid))) for t, prompt in zip(views, prompts)]
        scored.append(ScoredCandidate(grid=grid, score=combine_scores(view_scores, combine), view_scores=view_scores,
                                      sources=sources))
    if combine == "vote+sum":
        return sorted(scored, key=lambda c: (-c.sources, -c.score, grid_to_text(c.grid)))
    return sorted(scored, key=lambda c: (-c.score, -c.sources, grid_to_text(c.grid)))


def top_two(scored: Sequence[ScoredCandidate]) -> list[Grid]:
    """The grids of the two best candidates (ARC Prize rule: solved if either attempt is exactly right)."""
    return [c.grid for c in scored[:2]]
