"""Tests for the built-in arithmetic word-problem task."""

from __future__ import annotations

import random
import re

import pytest

from llm2diff.tasks.arithmetic import (
    SPLITS,
    ArithmeticTask,
    apply_operation,
    extract_answer,
    grade,
    operand_range,
    split_of,
    step_equations,
    step_values,
)

START = re.compile(r"^(\w+) has (-?\d+) (\w+)\. ")

SETTINGS = [
    ArithmeticTask(),
    ArithmeticTask(min_steps=2, max_steps=4, max_operand=9, operations=("+", "-", "*")),
    ArithmeticTask(min_steps=3, max_steps=3, max_operand=5, operations=("-",)),
    ArithmeticTask(min_steps=1, max_steps=3, max_operand=12, operations=("-", "+"), allow_negative=True),
    ArithmeticTask(min_steps=1, max_steps=1, max_operand=1, operations=("+",)),
]


# --------------------------------------------------------------------------- determinism / splits


def test_same_seed_and_split_is_identical():
    task = ArithmeticTask(max_steps=3)
    assert task.generate(50, seed=7) == task.generate(50, seed=7)
    assert task.generate(20, seed=7, split="test") == ArithmeticTask(max_steps=3).generate(20, seed=7, split="test")


def test_default_seed_comes_from_task():
    assert ArithmeticTask(seed=3).generate(20) == ArithmeticTask().generate(20, seed=3)


def test_different_seed_gives_different_problems():
    task = ArithmeticTask()
    assert task.generate(50, seed=0) != task.generate(50, seed=1)


def test_splits_are_disjoint_and_labelled():
    task = ArithmeticTask(max_steps=3)
    questions = {split: {p["question"] for p in task.generate(300, seed=0, split=split)} for split in SPLITS}
    assert questions["train"].isdisjoint(questions["test"])
    assert questions["train"].isdisjoint(questions["validation"])
    assert questions["test"].isdisjoint(questions["validation"])
    for split, qs in questions.items():
        assert all(split_of(q) == split for q in qs)
        assert len(qs) > 200  # the problem space is large enough to rarely repeat


def test_split_of_buckets_roughly_ten_percent():
    task = ArithmeticTask(max_steps=3)
    rng = random.Random(0)
    labels = [split_of(task.sample(rng)["question"]) for _ in range(2000)]
    assert 100 < labels.count("test") < 300
    assert 100 < labels.count("validation") < 300


def test_generate_edge_cases():
    task = ArithmeticTask()
    assert task.generate(0) == []
    with pytest.raises(ValueError, match="unknown split 'dev'.*train"):
        task.generate(1, split="dev")
    with pytest.raises(ValueError, match="n must be >= 0"):
        task.generate(-1)


def test_impossible_settings_raise_instead_of_looping():
    # Only "-" from a start of 1 cannot survive 5 steps without going negative.
    task = ArithmeticTask(min_steps=5, max_steps=5, max_operand=1, operations=("-",))
    with pytest.raises(RuntimeError, match="could only generate 0/3"):
        task.generate(3)


# --------------------------------------------------------------------------- problem invariants


@pytest.mark.parametrize("task", SETTINGS, ids=lambda t: f"{t.operations}-{t.min_steps}-{t.max_steps}-{t.max_operand}")
@pytest.mark.parametrize("split", ["train", "test"])
def test_generated_problems_are_consistent(task: ArithmeticTask, split: str):
    for problem in task.generate(200, seed=11, split=split):
        question, answer = problem["question"], problem["answer"]
        assert set(problem) == {"question", "answer", "steps", "final"}
        name, start, noun = START.match(question).groups()
        start = int(start)
        assert 1 <= start <= task.max_operand
        assert question.endswith(f"How many {noun.rstrip('s')}s does {name} have now?")
        lines = answer.split("\n")
        assert lines[0] == f"{name} starts with {start} {noun}."
        assert lines[-1] == f"#### {problem['final']}"

        equations = step_equations(answer)
        assert len(equations) == len(lines) - 2  # every middle line is a step line
        assert task.min_steps <= len(equations) <= task.max_steps
        # one sentence per step, between the opening sentence and the question
        sentences = question.split(". ")
        assert len(sentences) == len(equations) + 2
        previous = start
        for sentence, (a, op, b, value) in zip(sentences[1:-1], equations):
            assert op in task.operations
            assert a == previous
            assert apply_operation(a, op, b) == value
            assert (2 if op == "*" else 1) <= b <= task.max_operand
            stated = {2: "doubles", 3: "triples"}.get(b) if op == "*" else None
            assert f" {b} " in sentence or (stated is not None and stated in sentence)
            previous = value
        assert problem["steps"] == [v for *_, v in equations] == step_values(answer)
        assert problem["final"] == problem["steps"][-1]
        assert extract_answer(answer) == str(problem["final"])
        assert grade(answer, answer) and grade(f"#### {problem['final']}", problem["final"])
        if not task.allow_negative:
            assert min(problem["steps"]) >= 0


def test_allow_negative_actually_produces_negatives():
    task = ArithmeticTask(min_steps=2, max_steps=3, max_operand=9, operations=("-",), allow_negative=True)
    problems = task.generate(100)
    assert any(v < 0 for p in problems for v in p["steps"])
    for p in problems:  # negative values still round-trip through the answer text
        assert step_values(p["answer"]) == p["steps"]


def test_all_operations_are_used():
    task = ArithmeticTask(min_steps=2, max_steps=3, max_operand=6, operations=("+", "-", "*"))
    used = {op for p in task.generate(100) for _, op, _, _ in step_equations(p["answer"])}
    assert used == {"+", "-", "*"}


def test_singular_noun_for_one_item():
    problems = ArithmeticTask(max_steps=1, max_operand=1, operations=("+",)).generate(30)
    for p in problems:
        assert re.match(r"^\w+ has 1 [a-z]+[^s]\. (He|She) \w+ 1 more [a-z]+[^s]\. How many", p["question"])
        assert p["answer"].endswith("1 + 1 = 2\n#### 2")


def test_operand_range():
    assert operand_range("+", 0, 20, False) == (1, 20)
    assert operand_range("-", 7, 20, False) == (1, 7)
    assert operand_range("-", 0, 20, False) is None
    assert operand_range("-", 0, 20, True) == (1, 20)
    assert operand_range("*", 5, 9, False) == (2, 9)
    assert operand_range("*", 5, 1, False) is None


# --------------------------------------------------------------------------- extraction / grading


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Tom starts with 12 apples.\n12 + 5 = 17\n17 - 3 = 14\n#### 14", "14"),
        ("#### 14", "14"),
        ("#### 3\nsome chatter 99\n#### 7 apples", "7"),
        ("The answer is 1,234.", "1234"),
        ("I think 5 + 5 = 10. The answer is $18.", "18"),
        ("so $18.00", "18"),
        ("18.0", "18"),
        ("It costs 2.50 dollars", "2.5"),
        ("He has 3 apples, then 4, so 7", "7"),
        ("3 - 5 = -2", "-2"),
        ("#### -4", "-4"),
        ("#### \nThe answer is 9", "9"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("12 + 2 = 14\n#### 14", "Tom starts with 12 apples.\n12 + 2 = 14\n#### 14", True),
        ("#### 14", 14, True),
        ("The answer is 14.", "14", True),
        ("so $1,234.00", 1234, True),
        ("#### 15", 14, False),
        ("12 + 2 = 14\n#### 13", "#### 14", False),
        ("no answer", 14, False),
        ("#### 14", "no number", False),
    ],
)
def test_grade(completion, reference, expected):
    assert grade(completion, reference) is expected


def test_step_values_parses_only_step_lines():
    answer = "Ann starts with 4 cards.\n4 * 3 = 12\nnote 1 + 1\n12 - 20 = -8\n-8 + 2 = -6\n#### -6"
    assert step_values(answer) == [12, -8, -6]
    assert step_equations(answer)[0] == (4, "*", 3, 12)
    assert step_values("#### 5") == []


# --------------------------------------------------------------------------- validation / dataset


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_steps": 0}, "min_steps must be >= 1, got 0"),
        ({"min_steps": 3, "max_steps": 2}, "max_steps must be >= min_steps, got max_steps=2 < min_steps=3"),
        ({"max_operand": 0}, "max_operand must be >= 1, got 0"),
        ({"operations": ()}, "operations must be non-empty"),
        ({"operations": ("+", "/")}, r"unsupported operation '/'; valid: \('\+', '-', '\*'\)"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**kwargs)


def test_to_dataset():
    task = ArithmeticTask(max_steps=3)
    ds = task.to_dataset(25, seed=4, split="validation")
    assert ds.column_names == ["question", "answer", "steps", "final"]
    assert len(ds) == 25
    assert ds.to_list() == task.generate(25, seed=4, split="validation")
