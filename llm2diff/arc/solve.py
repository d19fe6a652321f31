"""Solving one ARC test input the way the strongest open solvers do: (test-time training), candidate grids proposed
under augmented views, every candidate scored under every view, the top two submitted.

    solver = ARCSolverArguments(arc_proposal="search", arc_scoring="poe", arc_ttt_steps=32)
    record = solve_row(dlm, task, row, solver, max_new_tokens=256, decoding=..., ar_parent=False, seed=0)

The stages (each a setting, so the benchmark can add them one at a time):
  1. `arc_ttt_steps` > 0: the model is first trained on this task's own demonstration pairs under augmentations
     (`llm2diff.arc.ttt`); everything below runs with that adapter, and the model's own adapter is back, bit for
     bit, after the row.
  2. Proposals under `arc_proposal_views` views (identity, then the square symmetries, then colour permutations):
     `sample` decodes each view once (today's `llm2diff eval` behaviour: the model's decoding), `search`
     enumerates each view's grids above the probability floor `arc_floor` (`llm2diff.arc.search`; when no view
     has any, each view is decoded once as `sample` does, so a row never goes without attempts), `both` does the
     two (a sample drawn at the model's temperature can land on a grid that the search, bounded to
     `arc_max_candidates` grids per view, leaves out). Each grid is mapped back to the task's own orientation and
     colours; a grid proposed under several views (or by both proposers) counts each.
  3. Scoring: `vote` ranks by the number of views that proposed a grid (then by the best path probability);
     `poe` scores the `arc_score_top` most proposed grids under `arc_scoring_views` views and ranks by the summed
     log-likelihood (`llm2diff.arc.scoring`: the seeded ELBO for the diffusion model, exact for a causal stream).
  4. The top two grids are the attempts: the row is solved when either is exact (the ARC Prize rule).

The record holds the attempts, every candidate with its proposals and scores, whether any candidate was right (the
ceiling scoring can reach), the passes spent on proposals and the likelihood evaluations spent on scoring, and the
seconds of each stage.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llm2diff.names import check_choice
from llm2diff.tasks.arc_agi import (
    Grid,
    all_transforms,
    cell_accuracy,
    exact_match,
    grid_to_text,
    text_to_grid,
)

PROPOSALS = ("sample", "search", "both")
SCORINGS = ("vote", "poe")


@dataclass
class ARCSolverArguments:
    """How `llm2diff eval` solves ARC-AGI rows (keys of the eval config; the defaults are today's voting)."""

    arc_proposal: str = field(default="sample", metadata={
        "help": "How candidate grids are proposed under each view: 'sample' (decode the view once with the model's "
                "decoding), 'search' (every grid above the probability floor arc_floor, depth first, at most "
                "arc_max_candidates) or 'both' (the two together: a sample can find a grid the bounded search "
                "misses)."})
    arc_proposal_views: int = field(default=8, metadata={
        "help": "Views proposals are made under: identity first, the other 7 square symmetries, then colour "
                "permutations."})
    arc_floor: float = field(default=0.05, metadata={
        "help": "search: a path is abandoned once its probability falls below this."})
    arc_max_candidates: int = field(default=8, metadata={"help": "search: at most this many grids per view."})
    arc_max_passes: int = field(default=2000, metadata={"help": "search: at most this many forward passes per view."})
    arc_search_threshold: float | None = field(default=0.9, metadata={
        "help": "search, diffusion models: positions at least this sure are committed together without branching "
                "(None: one decision per pass)."})
    arc_scoring: str = field(default="vote", metadata={
        "help": "How candidates are ranked: 'vote' (views that proposed them) or 'poe' (summed log-likelihood "
                "under arc_scoring_views views: product of experts)."})
    arc_scoring_views: int = field(default=8, metadata={"help": "poe: views every candidate is scored under."})
    arc_score_top: int = field(default=8, metadata={
        "help": "poe: score only this many candidates, the most proposed first."})
    arc_poe_samples: int = field(default=4, metadata={
        "help": "poe, diffusion models: Monte-Carlo samples of the ELBO per (candidate, view)."})
    arc_poe_combine: str = field(default="sum", metadata={
        "help": "poe: how view scores combine: 'sum' (product of experts), 'mean', 'min', 'vote+sum'."})
    arc_ttt_steps: int = field(default=0, metadata={
        "help": "Test-time training: optimizer steps on the task's own demonstration pairs before decoding (0 = "
                "off). The model's adapter is restored after each row."})
    arc_ttt_seconds: float | None = field(default=None, metadata={"help": "Test-time training: time budget per row."})
    arc_ttt_learning_rate: float = field(default=1e-4, metadata={"help": "Test-time training: learning rate."})
    arc_ttt_batch_size: int = field(default=4, metadata={"help": "Test-time training: rows per step."})
    arc_use_solver: bool = field(default=False, metadata={
        "help": "Solve every row through the solver, plain voting too (the same grids as the batched voting path, "
                "one row at a time), so that each row's record holds every candidate, the passes, the seconds and "
                "whether any candidate was right (benchmarks/arc.py records every variant this way)."})

    def __post_init__(self) -> None:
        check_choice("arc_proposal", self.arc_proposal, PROPOSALS)
        check_choice("arc_scoring", self.arc_scoring, SCORINGS)
        for name in ("arc_proposal_views", "arc_scoring_views", "arc_score_top", "arc_poe_samples",
                     "arc_ttt_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arc_ttt_steps < 0:
            raise ValueError(f"arc_ttt_steps must be >= 0, got {self.arc_ttt_steps}")
        self.search_settings(256)  # range checks of the search's own settings

    @property
    def active(self) -> bool:
        """Rows go through the solver: anything beyond today's voting (one sample per view, counted), or
        `arc_use_solver`."""
        return (self.arc_use_solver or self.arc_proposal != "sample" or self.arc_scoring != "vote"
                or self.arc_ttt_steps > 0)

    def search_settings(self, max_new_tokens: int):
        from llm2diff.arc.search import SearchSettings

        return SearchSettings(floor=self.arc_floor, max_candidates=self.arc_max_candidates,
                              max_passes=self.arc_max_passes, max_new_tokens=max_new_tokens,
                              threshold=self.arc_search_threshold)

    def ttt_settings(self, seed: int):
        from llm2diff.arc.ttt import TTTSettings

        return TTTSettings(steps=self.arc_ttt_steps, max_seconds=self.arc_ttt_seconds,
                           learning_rate=self.arc_ttt_learning_rate, batch_size=self.arc_ttt_batch_size, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def views(count: int, seed: int) -> list:
    """The first `count` views: identity, the other 7 symmetries, then each under random colour permutations."""
    return all_transforms(-(-count // 8) - 1, seed)[:count]


def _key(grid: Grid) -> str:
    return grid_to_text(grid)


def propose(dlm, task, row, solver: ARCSolverArguments, render, max_new_tokens: int, decoding, ar_parent: bool,
            seed: int) -> tuple[dict[str, dict], int]:
    """Candidate grids in the task's own frame: {grid text: {"grid", "sources", "logprob"}}, and the passes spent."""
    transforms = views(solver.arc_proposal_views, seed)
    prompts = [render(task, row, [], task.augmented_question(row, t)) for t in transforms]
    found: dict[str, dict] = {}
    passes = 0
    if solver.arc_proposal in ("search", "both"):
        passes += _searched(dlm, prompts, transforms, solver.search_settings(max_new_tokens), ar_parent, found)
        if solver.arc_proposal == "search" and not found:
            # no grid above the floor under any view: never submit nothing, decode each view once instead
            sampled: dict[str, dict] = {}
            passes += _sampled(dlm, prompts, transforms, max_new_tokens, decoding, ar_parent, seed, sampled)
            return {key: {**entry, "fallback": True} for key, entry in sampled.items()}, passes
    if solver.arc_proposal in ("sample", "both"):  # with `both`, a grid both found counts the votes of both
        passes += _sampled(dlm, prompts, transforms, max_new_tokens, decoding, ar_parent, seed, found)
    return found, passes


def _add(found: dict[str, dict], grid, transform, logprob=None) -> None:
    """Count one proposal of `grid` (made under `transform`) in the task's own frame; keep the best path probability."""
    if grid is None:
        return
    grid = transform.invert(grid)
    entry = found.setdefault(_key(grid), {"grid": grid, "sources": 0, "logprob": None})
    entry["sources"] += 1
    if logprob is not None and (entry["logprob"] is None or logprob > entry["logprob"]):
        entry["logprob"] = logprob


def _sampled(dlm, prompts, transforms, max_new_tokens, decoding, ar_parent, seed, found) -> int:
    """Decode each view once (the model's decoding; greedy for the AR parent) into `found`; returns the passes."""
    from llm2diff.evaluation.completions import complete

    if ar_parent:
        done = complete(dlm, prompts, {"max_new_tokens": max_new_tokens}, ar_parent=True)
    else:
        done = complete(dlm, prompts, decoding, **({"seed": seed} if decoding.mode == "block" else {}))
    for answer, transform in zip(done.rows, transforms):
        _add(found, text_to_grid(answer.text), transform)
    return sum(answer.passes for answer in done.rows)


def _searched(dlm, prompts, transforms, settings, ar_parent, found) -> int:
    """Every grid above the floor under each view (`llm2diff.arc.search`) into `found`; returns the passes."""
    from llm2diff.arc.search import search

    passes = 0
    for prompt, transform in zip(prompts, transforms):
        result = search(dlm, prompt, settings, use_parent=ar_parent)
        passes += result.passes
        for candidate in result.candidates:
            _add(found, candidate.grid, transform, candidate.logprob)
    return passes


def rank(dlm, task, row, found: dict[str, dict], solver: ARCSolverArguments, ar_parent: bool,
         seed: int) -> tuple[list[dict], int]:
    """Candidates best first (each with its score), and the likelihood evaluations scoring spent."""
    by_votes = sorted(found.values(), key=lambda c: (-c["sources"], -(c["logprob"] if c["logprob"] is not None
                                                                      else float("-inf")), _key(c["grid"])))
    if solver.arc_scoring == "vote" or not by_votes:
        return [{**c, "score": float(c["sources"])} for c in by_votes], 0
    from llm2diff.arc.scoring import score_candidates

    top = by_votes[: solver.arc_score_top]
    counts = {_key(c["grid"]): c["sources"] for c in top}
    transforms = views(solver.arc_scoring_views, seed)
    scored = score_candidates(dlm, task, row, counts, transforms, use_parent=ar_parent,
                              num_samples=solver.arc_poe_samples, seed=seed, combine=solver.arc_poe_combine)
    entries = {_key(c["grid"]): c for c in top}
    ranked = [{**entries[_key(s.grid)], "score": s.score, "view_scores": s.view_scores} for s in scored]
    return ranked + [{**c, "score": None} for c in by_votes[solver.arc_score_top:]], len(top) * len(transforms)


def solve_row(dlm, task, row, solver: ARCSolverArguments, render, max_new_tokens: int, decoding=None,
              ar_parent: bool = False, seed: int = 0) -> dict[str, Any]:
    """Solve one ARC row (see the module docstring). Returns its record (attempts, candidates, grade, cost)."""
    import contextlib

    start = time.perf_counter()
    if decoding is None and not ar_parent:  # the model's saved decoding, for `sample` proposals
        from llm2diff.sampling.config import DecodingConfig

        decoding = DecodingConfig.resolve(dlm.decoding, {"max_new_tokens": max_new_tokens})
    if solver.arc_ttt_steps > 0:
        if ar_parent:
            raise ValueError("test-time training trains the model's adapter; the AR parent has none to train: "
                             "evaluate the AR twin (a model trained with block_size 1) instead, or set "
                             "arc_ttt_steps: 0")
        from llm2diff.arc.ttt import test_time_trained

        trained = test_time_trained(dlm, task, row, solver.ttt_settings(seed))
    else:
        trained = contextlib.nullcontext()
    with trained as ttt_record:
        ttt_seconds = time.perf_counter() - start
        found, passes = propose(dlm, task, row, solver, render, max_new_tokens, decoding, ar_parent, seed)
        proposed = time.perf_counter()
        ranked, evaluations = rank(dlm, task, row, found, solver, ar_parent, seed)
    scored = time.perf_counter()
    gold = task._gold(row)
    attempts = [c["grid"] for c in ranked[:2]]
    top = attempts[0] if attempts else None
    return {
        "correct": any(exact_match(g, gold) for g in attempts),
        "prediction": top,
        "attempts": attempts,
        "metrics": {"cell_accuracy": cell_accuracy(top, gold), "top1_correct": float(exact_match(top, gold)),
                    "num_candidates": float(len(ranked)),
                    "any_candidate_correct": float(any(exact_match(c["grid"], gold) for c in ranked)),
                    "search_fallback": float(any(c.get("fallback") for c in ranked)),
                    "proposal_passes": float(passes), "scoring_evaluations": float(evaluations),
                    "ttt_seconds": ttt_seconds, "proposal_seconds": proposed - start - ttt_seconds,
                    "scoring_seconds": scored - proposed, "seconds": scored - start},
        "candidates": [{"grid": c["grid"], "sources": c["sources"], "logprob": c["logprob"], "score": c["score"]}
                       for c in ranked],
        "ttt": ttt_record,
        "nfe": passes,
    }
