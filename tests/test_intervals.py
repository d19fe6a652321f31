"""Paired differences over problems and spread over seeds (`llm2diff.evaluation.intervals`): exact counts and
p-values, intervals that contain the difference and exclude zero exactly when the data say so, seeded draws."""

from __future__ import annotations

import json

import pytest

from llm2diff.evaluation.intervals import (
    format_difference,
    mcnemar_exact,
    paired_difference,
    read_correct,
    spread,
)


def test_all_gains_in_one_direction():
    before = [False] * 10 + [True] * 10
    after = [True] * 20
    d = paired_difference(before, after)
    assert (d.n, d.before, d.after, d.difference, d.gained, d.lost) == (20, 0.5, 1.0, 0.5, 10, 0)
    assert d.mcnemar_p == 2 * 0.5**10
    assert 0 < d.low <= 0.5 <= d.high <= 1.0 and d.excludes_zero
    assert format_difference(d).startswith("+50.0 points [")


def test_no_change_and_balanced_changes_exclude_nothing():
    same = paired_difference([True, False] * 50, [True, False] * 50)
    assert (same.difference, same.low, same.high, same.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    swapped = paired_difference([True, False] * 50, [False, True] * 50)
    assert (swapped.difference, swapped.gained, swapped.lost, swapped.mcnemar_p) == (0.0, 50, 50, 1.0)
    assert swapped.low < 0 < swapped.high and not swapped.excludes_zero


def test_the_interval_is_seeded_and_narrows_with_more_problems():
    before = [i % 2 == 0 for i in range(100)]
    after = [i % 2 == 0 or i % 5 == 1 for i in range(100)]
    first, again = paired_difference(before, after, seed=3), paired_difference(before, after, seed=3)
    assert first == again
    wide = paired_difference(before, after)
    narrow = paired_difference(before * 9, after * 9)
    assert narrow.difference == pytest.approx(wide.difference)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 0) == 0.25  # 2 * (1/8)
    assert mcnemar_exact(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    assert mcnemar_exact(4, 1) == mcnemar_exact(1, 4)


def test_results_are_paired_by_problem_id(tmp_path):
    rows0 = [{"id": "a", "correct": False}, {"id": "b", "correct": True}, {"id": "c", "correct": False}]
    rows1 = [{"id": "c", "correct": True}, {"id": "a", "correct": True}, {"id": "d", "correct": True}]
    for name, rows in (("r0", rows0), ("r1", rows1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = paired_difference(read_correct(tmp_path / "r0"), read_correct(tmp_path / "r1" / "results.jsonl"))
    assert (d.n, d.before, d.after, d.gained, d.lost) == (2, 0.0, 1.0, 2, 0)  # a and c; b and d unpaired


def test_bad_input_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation results at"):
        read_correct(tmp_path)
    with pytest.raises(ValueError, match="cannot be paired"):
        paired_difference({"a": True}, {"b": True})
    with pytest.raises(ValueError, match="different numbers of problems"):
        paired_difference([True], [True, False])
    with pytest.raises(TypeError, match="both"):
        paired_difference({"a": True}, [True])


def test_spread_over_seeds():
    s = spread([0.4, 0.5, 0.6])
    assert (s.mean, s.low, s.high, s.count) == (pytest.approx(0.5), 0.4, 0.6, 3)
    assert s.std == pytest.approx(0.1)
    assert spread([0.7]).std == 0.0
