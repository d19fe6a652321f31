"""Product-of-experts scoring of ARC candidate grids (`llm2diff.arc.scoring`) on tiny random models.

Invariants: each view score is the `loglikelihood` of (the view's eval prompt, the transformed grid + eos) with the
pair's own seed; scoring the task augmented by a symmetry T with the candidates mapped through T gives the same
scores (diffusion ELBO and AR parent); the combined score is exactly the sum / mean / min of the view scores; an AR
twin's ELBO is its parent's exact score."""

from __future__ import annotations

import math

import pytest
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.arc import scoring
from llm2diff.arc.scoring import COMBINES, ScoredCandidate, score_candidates, top_two, view_seed
from llm2diff.evaluation.likelihood import loglikelihood
from llm2diff.evaluation.runner import PromptRenderer
from llm2diff.tasks.arc_agi import ARCAGITask, Transform, all_transforms, augment_row, grid_to_text

ROW = {"id": "t", "test_index": 0, "test_output": [[3, 1, 2], [1, 1, 2]],
       "train": [{"input": [[1, 0, 2], [0, 3, 0]], "output": [[2, 0, 1], [0, 3, 0]]},
                 {"input": [[4, 5, 0], [0, 0, 6]], "output": [[0, 5, 4], [6, 0, 0]]}],
       "test_input": [[2, 1, 3], [2, 1, 1]]}
GRIDS = [[[3, 1, 2], [1, 1, 2]], [[3, 1, 2], [1, 1, 3]], [[2, 1], [1, 2]], [[7, 0, 0], [0, 0, 7], [5, 5, 5]]]
D4 = all_transforms()  # the 8 symmetries, identity colours
TASK = ARCAGITask()


@pytest.fixture(scope="module")
def dlm():
    """Block size 4, no adapter: the ELBO is the diffusion model's, `use_parent` the same weights' exact AR score."""
    return adapt(make_model("qwen2"), make_tokenizer(), block_size=4)


def key(grid):
    return tuple(map(tuple, grid))


@pytest.mark.parametrize("use_parent", [False, True], ids=["elbo", "parent"])
@pytest.mark.parametrize("symmetry", [1, 6], ids=["rot90", "transpose"])
def test_scores_are_invariant_to_the_augmentation_of_the_task(dlm, use_parent, symmetry):
    T = Transform(symmetry)
    plain = score_candidates(dlm, TASK, ROW, GRIDS, D4, use_parent=use_parent, num_samples=4, seed=5)
    moved = score_candidates(dlm, TASK, augment_row(ROW, T), [T.apply(g) for g in GRIDS], D4,
                             use_parent=use_parent, num_samples=4, seed=5)
    assert [key(T.apply(c.grid)) for c in plain] == [key(c.grid) for c in moved]  # same order, through T
    for a, b in zip(plain, moved):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert sorted(a.view_scores) == pytest.approx(sorted(b.view_scores), abs=1e-6)
    assert len({round(c.score, 6) for c in plain}) == len(GRIDS)  # the candidates really are told apart


def test_view_scores_are_loglikelihoods_of_the_eval_prompt_and_the_grid_with_eos(dlm):
    tok = dlm.tokenizer
    scored = score_candidates(dlm, TASK, ROW, GRIDS[:2], D4[:3], num_samples=4, seed=2)
    parent = score_candidates(dlm, TASK, ROW, GRIDS[:2], D4[:3], use_parent=True)
    render = PromptRenderer(dlm)
    for diffusion, exact in zip(scored, parent):
        for t, elbo, ar in zip(D4[:3], diffusion.view_scores, exact.view_scores):
            prompt = render(TASK, augment_row(ROW, t), [])
            # the runner's way of rendering an augmented ARC prompt gives the same ids
            assert prompt == render(TASK, ROW, [], TASK.augmented_question(ROW, t))
            grid_ids = tok(grid_to_text(t.apply(diffusion.grid)), add_special_tokens=False).input_ids
            continuation = [*grid_ids, tok.eos_token_id]
            assert elbo == loglikelihood(dlm, prompt, continuation, num_samples=4,
                                         seed=view_seed(2, prompt, continuation))
            grid_ids = tok(grid_to_text(t.apply(exact.grid)), add_special_tokens=False).input_ids
            continuation = [*grid_ids, tok.eos_token_id]
            assert ar == loglikelihood(dlm, prompt, continuation, use_parent=True)
            assert ar < loglikelihood(dlm, prompt, grid_ids, use_parent=True)  # the eos is scored too
    # another seed, another estimate; the same seed, the same one
    again = score_candidates(dlm, TASK, ROW, GRIDS[:2], D4[:3], num_samples=4, seed=2)
    assert [c.score for c in again] == [c.score for c in scored]
    other = score_candidates(dlm, TASK, ROW, GRIDS[:2], D4[:3], num_samples=4, seed=3)
    assert {key(c.grid): c.score for c in other} != {key(c.grid): c.score for c in scored}


def test_an_ar_twin_scores_exactly_like_its_parent():
    twin = adapt(make_model("llama"), make_tokenizer(), block_size=1)
    elbo = score_candidates(twin, TASK, ROW, GRIDS[:3], D4[:2], num_samples=2)
    exact = score_candidates(twin, TASK, ROW, GRIDS[:3], D4[:2], use_parent=True)
    assert [key(c.grid) for c in elbo] == [key(c.grid) for c in exact]
    for a, b in zip(elbo, exact):
        assert a.view_scores == pytest.approx(b.view_scores, abs=1e-4)


def test_the_combined_score_is_the_sum_mean_or_min_of_the_views(dlm):
    by = {c: score_candidates(dlm, TASK, ROW, GRIDS, D4[:4], use_parent=True, combine=c) for c in COMBINES}
    total = by["sum"]
    assert [c.score for c in total] == sorted((c.score for c in total), reverse=True)  # best first
    for c in total:
        assert c.score == math.fsum(c.view_scores) and len(c.view_scores) == 4
    views = {key(c.grid): c.view_scores for c in total}
    assert [key(c.grid) for c in by["mean"]] == [key(c.grid) for c in total]  # the same ranking
    for c in by["mean"]:
        assert c.score == pytest.approx(math.fsum(views[key(c.grid)]) / 4, abs=1e-12)
        assert c.view_scores == views[key(c.grid)]
    assert [c.score for c in by["min"]] == sorted((min(v) for v in views.values()), reverse=True)
    for c in by["min"]:
        assert c.score == min(views[key(c.grid)])
    # all proposed once: vote+sum is the sum ranking, scored by the sum
    assert [(key(c.grid), c.score) for c in by["vote+sum"]] == [(key(c.grid), c.score) for c in total]
    # the worst grid by the sum, proposed three times, goes first under vote+sum only
    worst = total[-1].grid
    voted = GRIDS + [worst, worst]
    assert key(score_candidates(dlm, TASK, ROW, voted, D4[:4], use_parent=True, combine="vote+sum")[0].grid) == \
        key(worst)
    summed = score_candidates(dlm, TASK, ROW, voted, D4[:4], use_parent=True)
    assert [key(c.grid) for c in summed] == [key(c.grid) for c in total]
    assert [c.sources for c in summed] == [1, 1, 1, 3]
    assert top_two(summed) == [total[0].grid, total[1].grid]


def test_duplicates_merge_and_a_mapping_of_proposals_is_accepted(dlm):
    a, b = GRIDS[0], GRIDS[2]
    listed = score_candidates(dlm, TASK, ROW, [a, b, [list(r) for r in a], a], D4[:2], num_samples=2)
    counted = score_candidates(dlm, TASK, ROW, {key(a): 3, grid_to_text(b): 1}, D4[:2], num_samples=2)
    assert len(listed) == 2
    assert {key(c.grid): c.sources for c in listed} == {key(a): 3, key(b): 1}
    assert [(c.grid, c.score, c.view_scores, c.sources) for c in listed] == \
        [(c.grid, c.score, c.view_scores, c.sources) for c in counted]
    assert all(isinstance(c, ScoredCandidate) and isinstance(c.grid[0], list) for c in counted)


def test_ties_go_to_more_proposals_then_to_the_grid_text(dlm, monkeypatch):
    monkeypatch.setattr(scoring, "loglikelihood", lambda *args, **kwargs: -1.0)
    scored = score_candidates(dlm, TASK, ROW, {key(GRIDS[3]): 1, key(GRIDS[1]): 1, key(GRIDS[2]): 2}, D4[:2])
    assert [c.grid for c in scored] == [GRIDS[2], GRIDS[1], GRIDS[3]]
    assert all(c.score == -2.0 and c.view_scores == [-1.0, -1.0] for c in scored)


def test_bad_input(dlm):
    assert score_candidates(dlm, TASK, ROW, [], D4) == []
    assert score_candidates(dlm, TASK, ROW, {}, D4) == []
    with pytest.raises(ValueError, match=r"unknown combine 'summ'; available: sum, mean, min, vote\+sum\. Did you "
                                         r"mean 'sum'\?"):
        score_candidates(dlm, TASK, ROW, GRIDS, D4, combine="summ")
    with pytest.raises(ValueError, match="Did you mean 'vote\\+sum'"):
        score_candidates(dlm, TASK, ROW, GRIDS, D4, combine="vote_sum")
    with pytest.raises(ValueError, match="views is empty"):
        score_candidates(dlm, TASK, ROW, GRIDS, [])
    with pytest.raises(ValueError, match="candidate 1: row 1 has length 1, expected 2"):
        score_candidates(dlm, TASK, ROW, [GRIDS[0], [[1, 2], [3]]], D4)
    with pytest.raises(ValueError, match="candidate 0: the text 'no grid' holds no grid"):
        score_candidates(dlm, TASK, ROW, {"no grid": 1}, D4)
    with pytest.raises(ValueError, match="number of proposals must be an integer >= 1, got 0"):
        score_candidates(dlm, TASK, ROW, {key(GRIDS[0]): 0}, D4)
