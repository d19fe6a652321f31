"""Procedurally generated multi-step arithmetic word problems in GSM8K format.

Needs no download: problems are sampled from a small template grammar, so a
135M model can learn the format and the arithmetic in minutes. Every problem
carries its ground-truth intermediate values (``steps``) for process rewards.

Example::

    from llm2diff.tasks.arithmetic import ArithmeticTask, grade

    task = ArithmeticTask(min_steps=1, max_steps=2, max_operand=20)
    train = task.generate(1000, split="train")
    test = task.to_dataset(200, split="test")  # datasets.Dataset
    train[0]["question"]  # "Tom has 12 apples. He buys 5 more apples. ..."
    train[0]["answer"]    # "Tom starts with 12 apples.\\n12 + 5 = 17\\n#### 17"
    grade("... #### 17", train[0]["answer"])  # True

Splits are disjoint by construction: a question belongs to split
``split_of(question)`` (a stable hash of its text mod 10: 0 -> "test",
1 -> "validation", otherwise "train"), and ``generate`` rejection-samples
until it has ``n`` questions of the requested split.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

SUPPORTED_OPERATIONS: tuple[str, ...] = ("+", "-", "*")
SPLITS: tuple[str, ...] = ("train", "test", "validation")

# (name, subject pronoun, possessive pronoun)
NAMES: tuple[tuple[str, str, str], ...] = (
    ("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"),
    ("Lily", "she", "her"), ("Sam", "he", "his"), ("Mia", "she", "her"),
    ("Leo", "he", "his"), ("Emma", "she", "her"), ("Max", "he", "his"),
    ("Zoe", "she", "her"),
)
# Singular nouns; all take a plain "s" in the plural.
OBJECTS: tuple[str, ...] = (
    "apple", "cookie", "orange", "marble", "sticker",
    "book", "pencil", "coin", "shell", "card",
)
EDIBLE: frozenset[str] = frozenset({"apple", "cookie", "orange"})

# Verb phrases per operation; {n} is the operand, {noun} agrees with {n}.
ADD_PHRASES: tuple[str, ...] = ("buys {n} more {noun}", "finds {n} more {noun}", "gets {n} more {noun}")
SUB_PHRASES: tuple[str, ...] = ("gives away {n} {noun}", "loses {n} {noun}", "sells {n} {noun}")
EAT_PHRASE = "eats {n} {noun}"
MUL_PHRASE = "ends up with {n} times as many {plural}"
MUL_WORDS: dict[int, str] = {2: "doubles {pos} {plural}", 3: "triples {pos} {plural}"}

_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?\d[\d,]*(?:\.\d+)?")
_STEP_LINE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


# --------------------------------------------------------------------------- splits


def split_of(question: str) -> str:
    """Return the split a question belongs to: "test", "validation" or "train"."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def _rng_for(seed: int, split: str) -> random.Random:
    """A ``random.Random`` seeded stably (across processes) from ``seed`` and ``split``."""
    digest = hashlib.sha256(f"{seed}:{split}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------- grading


def _normalize_number(token: str) -> str | None:
    """Normalise a number token: drop ``$``/``,``/trailing ``.``; "18.0" -> "18"."""
    cleaned = token.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    """The first number in ``text``, normalised, or None."""
    match = _NUMBER.search(text)
    return _normalize_number(match.group()) if match else None


def extract_answer(text: str) -> str | None:
    """Extract the final numeric answer from model output.

    Prefers the number after the last ``####``; else the number after the last
    "The answer is"; else the last number in the text. Returns the normalised
    number string (no commas or ``$``, "18.0" -> "18") or None.
    """
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    markers = list(_ANSWER_IS.finditer(text))
    if markers:
        found = _first_number(text[markers[-1].end():])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def grade(completion: str, reference: str | int) -> bool:
    """True iff the completion's extracted answer equals the reference answer.

    ``reference`` may be an int, a number string, or a GSM8K answer with ``#### N``.
    """
    expected = extract_answer(str(reference))
    return expected is not None and extract_answer(completion) == expected


def step_equations(answer: str) -> list[tuple[int, str, int, int]]:
    """Parse the ``a op b = v`` lines of an answer into ``(a, op, b, v)`` tuples."""
    parsed = (_STEP_LINE.match(line) for line in answer.splitlines())
    return [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in parsed if m]


def step_values(answer: str) -> list[int]:
    """The value after ``=`` on each step line of an answer, in order."""
    return [value for _, _, _, value in step_equations(answer)]


# --------------------------------------------------------------------------- generation


def apply_operation(a: int, op: str, b: int) -> int:
    """Compute ``a op b`` for a supported operation."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unsupported operation {op!r}; valid: {SUPPORTED_OPERATIONS}")


def step_labels(response_text: str, row: dict) -> list[int]:
    """Exact per-line labels for a built-in arithmetic problem: 1 while every line so far is right.

    A line "a op b = v" is right when it is the next gold step (the generator's value) computed from the value so
    far; a "#### N" line when N is the gold answer; other lines (the opening sentence) change nothing. Once a line
    is wrong, every later step is labelled 0 (the prefix can no longer be a correct solution).
    """
    gold = step_values(row["answer"])
    final = extract_answer(row["answer"])
    labels, ok, k = [], True, 0
    for line in response_text.split("\n"):
        if not line.strip() and labels:
            continue
        match = _STEP_LINE.match(line)
        if match:
            a, op, b, v = int(match[1]), match[2], int(match[3]), int(match[4])
            ok = ok and k < len(gold) and v == gold[k] and apply_operation(a, op, b) == v
            k += 1
        elif line.strip().startswith("####"):
            ok = ok and extract_answer(line) == final
        labels.append(int(ok))
    return labels


def _noun(obj: str, n: int) -> str:
    """``obj`` in singular for exactly one item, plural otherwise."""
    return obj if n == 1 else obj + "s"


def operand_range(op: str, current: int, max_operand: int, allow_negative: bool) -> tuple[int, int] | None:
    """Inclusive range of valid operands for ``current op _``, or None if none is valid.

    Operands lie in 1..max_operand; multipliers start at 2 (``* 1`` is no step);
    without ``allow_negative`` a subtrahend never exceeds ``current``.
    """
    low, high = (2 if op == "*" else 1), max_operand
    if op == "-" and not allow_negative:
        high = min(high, current)
    return (low, high) if low <= high else None


def _phrase(rng: random.Random, op: str, n: int, obj: str, possessive: str) -> str:
    """A verb phrase (no subject) describing ``op n`` applied to the person's objects."""
    if op == "+":
        template = rng.choice(ADD_PHRASES)
    elif op == "-":
        template = rng.choice(SUB_PHRASES + ((EAT_PHRASE,) if obj in EDIBLE else ()))
    else:
        template = rng.choice((MUL_PHRASE,) + ((MUL_WORDS[n],) if n in MUL_WORDS else ()))
    return template.format(n=n, noun=_noun(obj, n), plural=obj + "s", pos=possessive)


@dataclass
class ArithmeticTask:
    """Generator of multi-step arithmetic word problems in GSM8K format.

    Attributes:
        min_steps: fewest operations per problem (>= 1).
        max_steps: most operations per problem (>= min_steps).
        max_operand: starting value and operands are drawn from 1..max_operand
            (multipliers from 2..max_operand; keep it small when using "*").
        operations: subset of ``SUPPORTED_OPERATIONS`` to use.
        allow_negative: if False, no intermediate or final value is below 0.
        seed: default seed for ``generate``.
    """

    min_steps: int = 1
    max_steps: int = 2
    max_operand: int = 20
    operations: tuple[str, ...] = ("+", "-")
    allow_negative: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {self.min_steps}")
        if self.max_steps < self.min_steps:
            raise ValueError(
                f"max_steps must be >= min_steps, got max_steps={self.max_steps} "
                f"< min_steps={self.min_steps}"
            )
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        self.operations = tuple(self.operations)
        if not self.operations:
            raise ValueError(f"operations must be non-empty; valid: {SUPPORTED_OPERATIONS}")
        for op in self.operations:
            if op not in SUPPORTED_OPERATIONS:
                raise ValueError(f"unsupported operation {op!r}; valid: {SUPPORTED_OPERATIONS}")

    def sample(self, rng: random.Random) -> dict[str, Any] | None:
        """Draw one problem (of any split), or None if the draw hit a dead end.

        A dead end happens when no operation can continue the chain, e.g. only
        "-" is allowed and the value reached 0 with negatives disallowed.
        """
        name, pronoun, possessive = rng.choice(NAMES)
        obj = rng.choice(OBJECTS)
        current = rng.randint(1, self.max_operand)
        sentences = [f"{name} has {current} {_noun(obj, current)}."]
        lines = [f"{name} starts with {current} {_noun(obj, current)}."]
        steps: list[int] = []
        for i in range(rng.randint(self.min_steps, self.max_steps)):
            ranges = {op: operand_range(op, current, self.max_operand, self.allow_negative)
                      for op in self.operations}
            ops = [op for op in self.operations if ranges[op] is not None]
            if not ops:
                return None
            op = rng.choice(ops)
            operand = rng.randint(*ranges[op])
            value = apply_operation(current, op, operand)
            subject = f"Then {pronoun}" if i else pronoun.capitalize()
            sentences.append(f"{subject} {_phrase(rng, op, operand, obj, possessive)}.")
            lines.append(f"{current} {op} {operand} = {value}")
            steps.append(value)
            current = value
        sentences.append(f"How many {obj}s does {name} have now?")
        lines.append(f"#### {current}")
        return {"question": " ".join(sentences), "answer": "\n".join(lines),
                "steps": steps, "final": current}

    def generate(self, n: int, seed: int | None = None, split: str = "train") -> list[dict[str, Any]]:
        """Generate ``n`` problems of ``split``, deterministic in (settings, seed, split).

        Returns dicts with keys ``question``, ``answer`` (GSM8K format), ``steps``
        (value after each step, start excluded) and ``final``. Problems may repeat
        within a split when the problem space is small, never across splits.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = _rng_for(self.seed if seed is None else seed, split)
        problems: list[dict[str, Any]] = []
        max_attempts = 100 * n + 1000
        for _ in range(max_attempts):
            if len(problems) == n:
                break
            problem = self.sample(rng)
            if problem is not None and split_of(problem["question"]) == split:
                problems.append(problem)
        if len(problems) < n:
            raise RuntimeError(
                f"could only generate {len(problems)}/{n} {split!r} problems in "
                f"{max_attempts} attempts; the settings {self} leave too few valid problems"
            )
        return problems

    def to_dataset(self, n: int, seed: int | None = None, split: str = "train") -> datasets.Dataset:
        """``generate`` as a ``datasets.Dataset`` with columns question/answer/steps/final."""
        import datasets  # local import: `datasets` is slow to import

        return datasets.Dataset.from_list(self.generate(n, seed=seed, split=split))
