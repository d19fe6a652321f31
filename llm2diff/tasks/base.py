"""The interface every evaluation task implements, so one runner can load, prompt and grade any of them.

A task turns raw rows (dicts, loaded from a hub name, a local path or a package) into prompts and grades the
model's completions. Prompts are chat messages (`messages`) or plain text (`plain_prompt`); the runner renders them
with the model's own prompt format. Graders are plain functions of (completion, row), so they double as rewards.

    task = get_task("gsm8k")
    rows = task.load_rows("../shared/data/gsm8k/train.jsonl", split="train", limit=100)
    messages = task.messages(rows[0], shots=[])
    grade = task.grade("... #### 18", rows[0])   # Grade(correct=True, prediction="18", metrics={})
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Grade:
    """The verdict on one completion: `correct`, the extracted `prediction`, and any extra per-example metrics
    (e.g. ARC cell accuracy), which the runner averages."""

    correct: bool
    prediction: Any = None
    metrics: dict[str, float] = field(default_factory=dict)


class EvalTask:
    """Base class. Subclasses set `name` and implement `load_rows`, `question`, `target` and `grade`."""

    name: str = "task"
    #: the default system prompt for chat rendering (None = the template's default)
    system_prompt: str | None = None

    def load_rows(self, source: str | None, split: str, limit: int | None = None) -> list[dict]:
        raise NotImplementedError

    def question(self, row: dict) -> str:
        """The user turn for one row."""
        raise NotImplementedError

    def target(self, row: dict) -> str:
        """The gold completion (used for few-shot demonstrations and likelihood scoring)."""
        raise NotImplementedError

    def grade(self, completion: str, row: dict) -> Grade:
        raise NotImplementedError

    def final_answer(self, row: dict) -> str | None:
        """The row's short final answer (e.g. "18"), given as a hint when rationalizing; None if the task has none."""
        return None

    def step_labels(self, completion: str, row: dict) -> list[int] | None:
        """Exact labels of the completion's steps (1 while every step so far is right), for tasks whose generator
        knows each intermediate value; None for tasks without them."""
        return None

    def difficulty(self, row: dict) -> str | None:
        """A label grouping the row with problems of its kind (e.g. "3 steps"), by which reports break accuracy
        down; None for tasks without one."""
        return None

    def row_id(self, row: dict, index: int) -> str:
        return str(row.get("id", index))

    def messages(self, row: dict, shots: list[dict] = ()) -> list[dict[str, str]]:
        """Chat form: each shot as a user/assistant pair, then the row's question as the last user turn."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for shot in shots:
            messages += [{"role": "user", "content": self.question(shot)},
                         {"role": "assistant", "content": self.target(shot)}]
        return messages + [{"role": "user", "content": self.question(row)}]

    def plain_prompt(self, row: dict, shots: list[dict] = (), template: str = "Question: {question}\nAnswer: ") -> str:
        """Plain-text form: the shots filled into `template` with their targets, then the row's question."""
        parts = [template.format(question=self.question(s)) + self.target(s) for s in shots]
        parts.append(template.format(question=self.question(row)))
        return "\n\n".join(parts)


def load_rows(source: str | None, split: str, limit: int | None, what: str, required: tuple[str, ...] = (),
              hub: tuple[str, str | None] | None = None) -> list[dict]:
    """Rows for an evaluation task from a hub name, a local file or directory (`llm2diff.sources`).

    `source` None means the task's default `hub` (name, config). A single local file is the rows whatever `split`
    names; a directory is split by file name. Empty data, missing `required` fields and `limit` < 1 fail with a
    message naming `what` and the source. Keeps the first `limit` rows.
    """
    from pathlib import Path

    from llm2diff.sources import load_hub_dataset, load_local_dataset, looks_like_local_path

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if not source and hub is None:
        raise ValueError(f"{what}: no source given and no default dataset")
    name = source or hub[0]
    config = hub[1] if hub and name == hub[0] else None
    empty = ValueError(f"{what} data {name!r} (split {split!r}) is empty")
    path = Path(name).expanduser()
    try:
        if looks_like_local_path(name) and path.is_file():
            if path.suffix in (".jsonl", ".json", ".csv") and not path.read_text(errors="ignore").strip():
                raise empty
            dataset = load_local_dataset(name, "train")
        else:
            dataset = load_local_dataset(name, split) if looks_like_local_path(name) else \
                load_hub_dataset(name, config, split)
    except StopIteration:  # what `datasets` raises on an empty JSON Lines file
        raise empty from None
    except ValueError as error:  # ... and on a JSON file without rows
        if "corresponds to no data" in str(error):
            raise empty from error
        raise
    if len(dataset) == 0:
        raise empty
    missing = [f for f in required if f not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} rows need fields {list(required)}; {name!r} lacks {missing} "
                         f"(fields present: {sorted(dataset.column_names)})")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return [dict(row) for row in dataset]


TASKS = {
    "gsm8k": "llm2diff.tasks.gsm8k:GSM8KTask",
    "arithmetic": "llm2diff.tasks.arithmetic_eval:ArithmeticEvalTask",
    "arc_agi": "llm2diff.tasks.arc_agi:ARCAGITask",
    "arc_challenge": "llm2diff.tasks.arc_challenge:ARCChallengeTask",
}


def parse_task_options(text: str | None, task_name: str) -> dict[str, Any]:
    """Task options given as JSON (`--task_options`, `star_task_options`, ...) as keyword arguments; text that is
    not a JSON object is refused with a message saying so."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the task options for {task_name} are not valid JSON ({err}): give an object such as "
                         "'{\"mode\": \"strict\"}'") from None
    if not isinstance(options, dict):
        raise ValueError(f"the task options for {task_name} must be a JSON object of option names to values, got "
                         f"{text!r}")
    return options


def get_task(name: str, **kwargs) -> EvalTask:
    """Instantiate a task by name (`gsm8k`, `arithmetic`, `arc_agi`, `arc_challenge`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    task_class = getattr(importlib.import_module(module), cls)
    parameters = inspect.signature(task_class).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        valid = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for option in kwargs:
            if option not in valid:
                near = difflib.get_close_matches(option, valid, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"task {name!r} has no option {option!r} (its options: "
                                 f"{', '.join(valid) or 'none'}){hint}")
    return task_class(**kwargs)
