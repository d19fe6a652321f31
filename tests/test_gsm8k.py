"""Tests for the GSM8K task: answer extraction on realistic model outputs, grading, loading and prompts."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from llm2diff.tasks import gsm8k
from llm2diff.tasks.base import Grade, get_task
from llm2diff.tasks.gsm8k import GSM8KTask, extract_answer, is_correct, normalize_number, reference_answer

TRAIN = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"
needs_train = pytest.mark.skipif(not TRAIN.is_file(), reason=f"{TRAIN} is absent")

# (model output, flexible extraction, strict extraction)
EXTRACTION_CASES = [
    # GSM8K's own format
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72", "72", "72"),
    ("#### 1,200", "1200", "1200"),
    ("#### -7", "-7", "-7"),
    ("#### $18.00", "18", "18"),
    ("First guess:\n#### 12\nWait, I made an error.\n#### 15", "15", "15"),
    ("#### 72 apples", "72", "72"),
    ("The total is 5.\n####    **40**", "40", "40"),
    ("#### Step 1\nShe has 3 + 4 = 7 pens.\nThe answer is 7", "7", None),
    ("#### 10\n#### Final Answer\nThe answer is 12", "10", None),
    # \boxed{}
    ("So the total is \\boxed{1,234}.", "1234", None),
    ("First \\boxed{3} was wrong; the final answer is $\\boxed{5}$.", "5", None),
    ("$\\boxed{\\$18.00}$", "18", None),
    ("\\boxed{50\\%}", "50", None),
    ("\\boxed{\\frac{3}{4}}", "3/4", None),
    ("\\boxed{2 \\times 3 = 6}", "6", None),
    ("\\boxed{-12}", "-12", None),
    ("The answer is 9 but in fact \\boxed{10}", "10", None),
    ("Total: $1\\,234$ so \\boxed{1\\,234}", "1234", None),
    # "the answer is" / "answer:" / "A:"
    ("He had 5 apples and bought 3 more, so he has 5 + 3 = 8. The answer is 8", "8", None),
    ("The answer is: $1,234.50", "1234.5", None),
    ("Adding them up gives us the result. The answer is **18**.", "18", None),
    ("The answer is 18 apples, 2 more than last week's 16.", "18", None),
    ("THE ANSWER IS 42.", "42", None),
    ("The final answer is 3 + 5 = 8.", "8", None),
    ("The answer is 8 (3 + 5 = 8), not 9.", "8", None),
    ("Q: How many cats?\nA: 42", "42", None),
    ("**Answer:** 7", "7", None),
    ("Answer: $25", "25", None),
    ("Final Answer: 300", "300", None),
    ("The answer is:\n\n56", "56", None),
    ("The answer is 10. Then for part two 4 more. The answer is 14", "14", None),
    ("The answer is below. She pays 6 * 4 = 24 dollars", "24", None),
    ("The answer is 12 \u2212 15 = \u22123.", "-3", None),
    # last number
    ("She pays 4 * 3 = 12 dollars and then 12 + 6 = 18 dollars.", "18", None),
    ("18 dollars.", "18", None),
    ("$18.00", "18", None),
    ("It costs \u20ac2.50 in total", "2.5", None),
    ("He earns \u00a3100,000 a year", "100000", None),
    ("The price is 50% of the original", "50", None),
    ("The temperature dropped to -3", "-3", None),
    ("x = 5 - 8 = -3", "-3", None),
    ("Compute step-2 and you get 7", "7", None),
    ("In step-2 we stop", "2", None),
    ("Half of it is 0.5", "0.5", None),
    ("It is 3/4 of the cake", "3/4", None),
    ("- 5 apples in the basket", "5", None),
    ("18.0", "18", None),
    ("1,000,000 people", "1000000", None),
    # no number
    ("I don't know.", None, None),
    ("The answer is unknown.", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text,flexible,strict", EXTRACTION_CASES)
def test_extract_answer(text, flexible, strict):
    assert extract_answer(text) == flexible
    assert extract_answer(text, mode="flexible") == flexible
    assert extract_answer(text, mode="strict") == strict


REFERENCE = "He buys 3 + 4 = <<3+4=7>>7 apples.\nThen 7 * 2 = <<7*2=14>>14.\n#### 14"

# (completion, reference, mode, correct)
GRADING_CASES = [
    ("7 * 2 = 14\n#### 14", REFERENCE, "flexible", True),
    ("7 * 2 = 14\n#### 14", REFERENCE, "strict", True),
    ("So 7 * 2 = 14. The answer is 14.", REFERENCE, "flexible", True),
    ("So 7 * 2 = 14. The answer is 14.", REFERENCE, "strict", False),
    ("\\boxed{14}", REFERENCE, "strict", False),
    ("\\boxed{14.00}", REFERENCE, "flexible", True),
    ("He started with 14, then ate 2, so 12 remain. The answer is 12", REFERENCE, "flexible", False),
    ("#### 13", REFERENCE, "flexible", False),
    ("#### 14\n#### 15", REFERENCE, "flexible", False),
    ("No idea.", REFERENCE, "flexible", False),
    ("", REFERENCE, "flexible", False),
    ("The answer is $1,200.", "#### 1,200", "flexible", True),
    ("A: 1200", "#### 1,200", "flexible", True),
    ("The answer is -7", "#### -7", "flexible", True),
    ("The answer is 7", "#### -7", "flexible", False),
    ("So it is 3/4 of the price", "0.75", "flexible", True),
    ("The answer is 2.50", "#### 2.5", "flexible", True),
    ("The answer is 2.5000001", "#### 2.5", "flexible", True),
    ("The answer is 2.51", "#### 2.5", "flexible", False),
    ("The answer is 18", "18", "flexible", True),
    ("The answer is 18", "no gold number", "flexible", False),
]


@pytest.mark.parametrize("completion,reference,mode,correct", GRADING_CASES)
def test_is_correct(completion, reference, mode, correct, monkeypatch):
    monkeypatch.setattr(gsm8k, "_math_verify", lambda: None)
    assert is_correct(completion, reference, mode=mode) is correct


def test_math_verify_fallback_only_when_plain_comparison_fails(monkeypatch):
    calls = []

    def verify(gold, target):
        calls.append((gold, target))
        return gold == ("parsed", "0.5") and target == ("parsed", "1/3")

    fake = types.SimpleNamespace(parse=lambda s: ("parsed", s), verify=verify)
    monkeypatch.setattr(gsm8k, "_math_verify", lambda: fake)
    assert is_correct("#### 0.5", "#### 0.5")
    assert calls == []  # equal strings: no fallback
    assert is_correct("The answer is 1/3", "#### 0.5")  # the (fake) verifier decides
    assert calls == [(("parsed", "0.5"), ("parsed", "1/3"))]
    assert not is_correct("The answer is 7", "#### 0.5")

    def broken(gold, target):
        raise RuntimeError("sympy timeout")

    monkeypatch.setattr(gsm8k, "_math_verify", lambda: types.SimpleNamespace(parse=str, verify=broken))
    assert not is_correct("The answer is 7", "#### 0.5")


def test_real_math_verify_if_installed():
    if gsm8k._math_verify() is None:
        pytest.skip("math_verify is not installed")
    assert is_correct("The answer is \\boxed{\\frac{1}{2}}", "#### 0.5")
    assert not is_correct("The answer is \\boxed{\\frac{1}{3}}", "#### 0.5")


@pytest.mark.parametrize("raw,expected", [
    ("$1,234.50", "1234.5"), ("**18** dollars.", "18"), ("18.00", "18"), ("2.50", "2.5"), ("50%", "50"),
    ("-3", "-3"), ("  42\n", "42"), ("3/4", "3/4"), ("6/1", "6"), ("-0.0", "0"), ("\u20ac7", "7"),
    ("apples 5", None), ("", None), (None, None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_reference_answer():
    assert reference_answer(REFERENCE) == "14"
    assert reference_answer("#### 109,200,000") == "109200000"
    assert reference_answer("42") == "42"


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown GSM8K extraction mode 'loose'.*strict, flexible"):
        GSM8KTask(mode="loose")
    with pytest.raises(ValueError, match="extraction mode"):
        extract_answer("#### 1", mode="STRICT")
    with pytest.raises(ValueError, match="num_shots"):
        GSM8KTask(num_shots=-1)


def test_get_task_and_grade():
    task = get_task("gsm8k", mode="strict", num_shots=2)
    assert isinstance(task, GSM8KTask) and task.name == "gsm8k"
    assert (task.mode, task.num_shots) == ("strict", 2)
    row = {"question": "What is 7 * 2?", "answer": REFERENCE}
    assert task.grade("#### 14", row) == Grade(correct=True, prediction="14", metrics={})
    assert task.grade("The answer is 14", row) == Grade(correct=False, prediction=None, metrics={})
    assert GSM8KTask().grade("The answer is 14", row) == Grade(correct=True, prediction="14", metrics={})


# ----------------------------------------------------------------------------- loading


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_train
def test_load_rows_from_local_train_file():
    task = GSM8KTask()
    rows = task.load_rows(str(TRAIN), split="train", limit=5)
    assert len(rows) == 5 and all(isinstance(r, dict) for r in rows)
    assert rows[0]["question"].startswith("Natalia sold clips")
    assert task.question(rows[0]) == rows[0]["question"]
    assert task.target(rows[0]).endswith("#### 72")
    # a single file is its own split, whatever split is asked for
    assert task.load_rows(str(TRAIN), split="test", limit=5) == rows


@needs_train
@pytest.mark.parametrize("mode", ["flexible", "strict"])
def test_gold_answers_grade_correct(mode):
    task = GSM8KTask(mode=mode)
    rows = task.load_rows(str(TRAIN), split="train", limit=200)
    assert len(rows) == 200
    for row in rows:
        grade = task.grade(task.target(row), row)
        assert grade.correct, (row["answer"], grade)
        assert grade.prediction == normalize_number(row["answer"].rsplit("####", 1)[1])


@needs_train
def test_prompts_with_two_shots():
    task = GSM8KTask(num_shots=2)
    rows = task.load_rows(str(TRAIN), split="train", limit=50)
    shots = task.few_shot_rows(rows[1:], k=2, seed=0)
    assert shots == task.few_shot_rows(rows[1:], k=2, seed=0)  # deterministic for a seed
    assert task.few_shot_rows(rows[1:], seed=0) == shots  # k defaults to num_shots
    assert len(shots) == 2 and shots[0] is not shots[1]
    assert [task.few_shot_rows(rows, 2, seed=s) for s in range(5)] != [shots] * 5

    messages = task.messages(rows[0], shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == task.target(shots[0]) and "####" in messages[3]["content"]
    assert messages[-1]["content"] == task.question(rows[0])

    prompt = task.plain_prompt(rows[0], shots)
    assert prompt.count("Question: ") == 3 and prompt.endswith("Answer: ")
    assert prompt.startswith("Question: " + task.question(shots[0]))
    assert task.plain_prompt(rows[0]) == f"Question: {task.question(rows[0])}\nAnswer: "


def test_few_shot_rows_errors():
    rows = [{"question": "q", "answer": "#### 1"}] * 3
    assert GSM8KTask().few_shot_rows(rows, 0, seed=0) == []
    with pytest.raises(ValueError, match="cannot draw 4 few-shot rows from 3"):
        GSM8KTask().few_shot_rows(rows, 4, seed=0)


def test_load_rows_limit_and_fields(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"question": f"q{i}", "answer": f"#### {i}", "id": i}
                                                  for i in range(3)])
    task = GSM8KTask()
    rows = task.load_rows(str(path), split="test")
    assert [r["answer"] for r in rows] == ["#### 0", "#### 1", "#### 2"]
    assert rows[1]["id"] == 1 and task.row_id(rows[1], 7) == "1"
    assert len(task.load_rows(str(path), split="test", limit=10)) == 3
    assert len(task.load_rows(str(tmp_path), split="test", limit=2)) == 2  # a directory of split files


@pytest.mark.parametrize("limit", [0, -3])
def test_load_rows_bad_limit(tmp_path, limit):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        GSM8KTask().load_rows(str(path), split="train", limit=limit)


def test_load_rows_missing_fields(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"question.*answer.*\['problem', 'solution'\]") as info:
        GSM8KTask().load_rows(str(path), split="train")
    assert "lacks ['question', 'answer']" in str(info.value)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(ValueError, match=r"lacks \['answer'\]"):
        GSM8KTask().load_rows(str(path), split="train")


@pytest.mark.parametrize("content", ["", "\n"])
def test_load_rows_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="is empty"):
        GSM8KTask().load_rows(str(path), split="train")


def test_load_rows_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        GSM8KTask().load_rows(str(tmp_path / "nope.jsonl"), split="test")


def test_default_source_is_the_hub_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = []

    def fake_load(name, config, split):
        seen.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 3"}] * 4)

    import llm2diff.sources as data

    monkeypatch.setattr(data, "load_hub_dataset", fake_load)
    assert len(GSM8KTask().load_rows(None, split="test", limit=2)) == 2
    assert seen == [("openai/gsm8k", "main", "test")]
