"""What a process-reward row is: the fields of a row and the checks that name what is wrong with one.

A row is `{"prompt_ids": [...], "response_ids": [...], "step_ends": [i, ...], "step_labels": [y, ...]}`: each
`step_ends[k]` indexes `response_ids` (the step's last token) and `step_labels[k]` is in [0, 1].
"""

from __future__ import annotations

import itertools
import numbers

ROW_KEYS = ("prompt_ids", "response_ids", "step_ends", "step_labels")


def check_step_ends(name: str, ends, response_len: int) -> None:
    ends = list(ends)
    for e in ends:
        if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < response_len:
            raise ValueError(f"{name}: step end {e!r} is outside the response (length {response_len}); step_ends "
                             f"index response tokens 0..{response_len - 1}")
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise ValueError(f"{name}: step_ends must be strictly increasing, got {ends}")


def row_name(index: int, row: dict) -> str:
    return f"row {index}" + (f" (id {row['id']!r})" if "id" in row else "")


def check_row(index: int, row: dict, label_type: str = "soft") -> None:
    """Raise ValueError naming the row if it is not a valid PRM row (see the module docstring)."""
    name = row_name(index, row)
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"{name} lacks {missing}; PRM rows need {list(ROW_KEYS)}")
    ends, labels = list(row["step_ends"]), list(row["step_labels"])
    if not ends:
        raise ValueError(f"{name} has no steps; drop it or give at least one step end and label")
    if len(ends) != len(labels):
        raise ValueError(f"{name} has {len(ends)} step_ends but {len(labels)} step_labels; give one label per step")
    check_step_ends(name, ends, len(row["response_ids"]))
    for y in labels:
        if not 0.0 <= float(y) <= 1.0:
            raise ValueError(f"{name}: step label {y!r} is outside [0, 1]")
        if label_type == "hard" and float(y) not in (0.0, 1.0):
            raise ValueError(f"{name}: label_type='hard' needs step labels 0 or 1, got {y!r}; use label_type='soft'")
