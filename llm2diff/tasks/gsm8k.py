"""GSM8K grade-school math: load the rows, extract the final number from a completion, grade it.

A reference answer is GSM8K's rationale ending in ``#### N``; a completion is right when its extracted
number equals N. Two extraction modes:

* ``"strict"``: only the number right after the last ``####`` (GSM8K's own format), else None;
* ``"flexible"``: the last ``####``, else the last ``\\boxed{N}``, else the last "the answer is N" /
  "answer: N" / "A: N", else the last number in the text.

Usage::

    from llm2diff.tasks.gsm8k import GSM8KTask, extract_answer, is_correct

    extract_answer("He had 5 and bought 3. The answer is **$1,234.50**.")  # "1234.5"
    extract_answer("The answer is 8", mode="strict")                         # None
    is_correct("so \\\\boxed{72}", "48+24 = <<48+24=72>>72\\n#### 72")          # True

    task = GSM8KTask(mode="flexible", num_shots=2)
    rows = task.load_rows("../shared/data/gsm8k/train.jsonl", split="train", limit=100)  # or None: openai/gsm8k
    shots = task.few_shot_rows(rows, k=task.num_shots, seed=0)
    task.messages(rows[0], shots), task.plain_prompt(rows[0], shots)
    task.grade("... #### 72", rows[0])   # Grade(correct=True, prediction="72", metrics={})

If the optional package ``math_verify`` is installed, ``is_correct`` falls back on it when the plain numeric
comparison fails (fractions, LaTeX); otherwise numbers are compared as floats within 1e-6.
"""

from __future__ import annotations

import functools
import math
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from llm2diff.tasks.base import EvalTask, Grade, load_rows

MODES: tuple[str, ...] = ("strict", "flexible")
HUB_NAME, HUB_CONFIG = "openai/gsm8k", "main"
REQUIRED_FIELDS: tuple[str, ...] = ("question", "answer")
TOLERANCE = 1e-6

# A number: a minus only when it is not a hyphen (not after a word character, "." or "-"), an optional
# currency sign, digits with optional thousands commas and decimals (or ".5"), an optional "/den", "%".
_NUM = (r"(?:(?<![\w.\-])-)?(?:[$€£]\s?)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?%?")
_NUMBER = re.compile(_NUM)
_IMMEDIATE = re.compile(r"[\s*_:=]*(" + _NUM + ")")  # a number right after a marker (markdown/colon allowed)
_HASHES = re.compile(r"#{4,}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(
    r"(?:\banswer\s+(?:is|would\s+be|will\s+be)\b|\bfinal\s+answer\b|\banswer(?:\*\*|__)?\s*[:=]|(?<![\w.])A\s*:)"
    r"(?:\*\*|__)?\s*:?", re.IGNORECASE)
_OPERATOR = re.compile(r"\s*(?:[-+*/×÷x]|\\times|\\cdot)\s*[$€£(]?\s*\d")  # "3 + 5 = 8": an expression
_LATEX = (
    (re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r"\1/\2"),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}"), r" \1"),
    (re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!)(?=\d)"), ","),
    (re.compile(r"\\([$%])"), r"\1"),
    (re.compile(r"\\left|\\right|\\!"), ""),
    (re.compile("[\u2212\u2013]"), "-"),  # unicode minus / en dash as minus
)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown GSM8K extraction mode {mode!r}; valid: {', '.join(MODES)}")


def _canonical(token: str) -> str | None:
    """A matched number token -> canonical string: no sign/commas/%, "18.00" -> "18", "2.50" -> "2.5"."""
    cleaned = re.sub(r"[\s$€£,%*]", "", token).rstrip(".")
    if "/" in cleaned:
        num, den = (_canonical(part) for part in cleaned.split("/", 1))
        return None if num is None or den is None else num if den == "1" else f"{num}/{den}"
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def normalize_number(s: str) -> str | None:
    """Normalise a number written at the start of ``s``: "$1,234.50" -> "1234.5", "**18** dollars." -> "18",
    "18.00" -> "18", "50%" -> "50", "-3" -> "-3", "3/4" -> "3/4". None if ``s`` does not start with a number."""
    if s is None:
        return None
    match = _IMMEDIATE.match(_clean_latex(str(s)))
    return _canonical(match.group(1)) if match else None


def _clean_latex(text: str) -> str:
    for pattern, replacement in _LATEX:
        text = pattern.sub(replacement, text)
    return text


def _first_number(segment: str) -> str | None:
    """The first number in a segment; when it starts an expression with a result ("3 + 5 = 8"), the result."""
    match = _NUMBER.search(segment)
    if match is None:
        return None
    rest = segment[match.end():]
    if "=" in rest and _OPERATOR.match(rest):
        found = _first_number(rest.split("=", 1)[1])
        if found is not None:
            return found
    return _canonical(match.group())


def _boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` (braces matched), in order."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


def _line_after(text: str, pos: int) -> str:
    """The rest of the line from ``pos`` (or the next non-empty line when it is blank)."""
    return text[pos:].lstrip().split("\n", 1)[0]


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    """The final numeric answer of a completion, normalised (see ``normalize_number``), or None.

    ``"strict"``: the number right after the last ``####``. ``"flexible"``: the last ``####`` followed by a
    number, else the last ``\\boxed{}`` with a number, else the last "the answer is" / "answer:" / "A:" with
    a number on its line, else the last number in the text.
    """
    _check_mode(mode)
    if not text:
        return None
    text = _clean_latex(text)
    hashes = [m.end() for m in _HASHES.finditer(text)]
    if mode == "strict":
        return normalize_number(text[hashes[-1]:]) if hashes else None
    for pos in reversed(hashes):
        if (found := normalize_number(text[pos:])) is not None:
            return found
    for content in reversed(_boxed_contents(text)):
        if (found := _first_number(content)) is not None:
            return found
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        if (found := _first_number(_line_after(text, marker.end()))) is not None:
            return found
    for match in reversed(list(_NUMBER.finditer(text))):
        if (found := _canonical(match.group())) is not None:
            return found
    return None


def _to_float(value: str) -> float | None:
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        return None


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    """The ``math_verify`` module when it is installed, else None."""
    try:
        import math_verify
    except ImportError:
        math_verify = None
    return math_verify


def reference_answer(reference: str) -> str | None:
    """The normalised gold number of a GSM8K answer (its ``#### N``), or of a bare number string."""
    return extract_answer(reference, "strict") or normalize_number(reference)


def is_correct(completion: str, reference: str, mode: str = "flexible") -> bool:
    """Whether the completion's extracted answer equals the reference's ``#### N`` (or bare number).

    Equal strings, or numbers within 1e-6, are correct; failing that, ``math_verify`` (if installed) judges.
    """
    gold, prediction = reference_answer(str(reference)), extract_answer(completion, mode)
    if gold is None or prediction is None:
        return False
    if prediction == gold:
        return True
    a, b = _to_float(prediction), _to_float(gold)
    if a is not None and b is not None and math.isclose(a, b, rel_tol=0.0, abs_tol=TOLERANCE):
        return True
    if (verifier := _math_verify()) is None:
        return False
    try:
        return bool(verifier.verify(verifier.parse(gold), verifier.parse(prediction)))
    except Exception:  # math_verify parses with timeouts/sympy; any failure there is a wrong answer
        return False


class GSM8KTask(EvalTask):
    """GSM8K: rows have ``question`` and ``answer`` (rationale ending in ``#### N``)."""

    name = "gsm8k"

    def __init__(self, mode: str = "flexible", num_shots: int = 0):
        _check_mode(mode)
        if isinstance(num_shots, bool) or not isinstance(num_shots, int) or num_shots < 0:
            raise ValueError(f"num_shots must be an integer >= 0, got {num_shots!r}")
        self.mode, self.num_shots = mode, num_shots

    def load_rows(self, source: str | None, split: str = "test", limit: int | None = None) -> list[dict]:
        """Rows of ``split`` from ``source``: a Hub name (default ``openai/gsm8k``, config ``main``) or a
        local .jsonl/.json/.parquet/.csv file or directory. A single local file is read whatever ``split``
        names (the file is the split). Keeps the first ``limit`` rows."""
        return load_rows(source, split, limit, "GSM8K", REQUIRED_FIELDS, hub=(HUB_NAME, HUB_CONFIG))

    def question(self, row: dict) -> str:
        return str(row["question"]).strip()

    def target(self, row: dict) -> str:
        return str(row["answer"]).strip()

    def final_answer(self, row: dict) -> str | None:
        return reference_answer(str(row["answer"]))

    def grade(self, completion: str, row: dict) -> Grade:
        correct = is_correct(completion, row["answer"], self.mode)
        return Grade(correct=correct, prediction=extract_answer(completion, self.mode), metrics={})

    def few_shot_rows(self, train_rows: list[dict], k: int | None = None, seed: int = 0) -> list[dict]:
        """``k`` demonstration rows (default ``num_shots``) drawn from ``train_rows``, fixed for a ``seed``."""
        k = self.num_shots if k is None else k
        if k < 0 or k > len(train_rows):
            raise ValueError(f"cannot draw {k} few-shot rows from {len(train_rows)} training rows")
        return [train_rows[i] for i in random.Random(seed).sample(range(len(train_rows)), k)]
