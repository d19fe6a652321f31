"""The built-in arithmetic word problems (`llm2diff.tasks.arithmetic`) through the evaluation-task interface.

    task = ArithmeticEvalTask(max_operand=10)
    rows = task.load_rows(None, split="test", limit=100)   # generated, no download

`source` may also be a local JSONL/JSON/Parquet file of question/answer rows in the same format.
"""

from __future__ import annotations

from llm2diff.tasks.arithmetic import ArithmeticTask, extract_answer, grade, step_labels
from llm2diff.tasks.base import EvalTask, Grade, load_rows


class ArithmeticEvalTask(EvalTask):
    name = "arithmetic"

    def __init__(self, min_steps: int = 1, max_steps: int = 2, max_operand: int = 10, operations: str = "+-",
                 seed: int = 0, num_problems: int = 200):
        self.generator = ArithmeticTask(min_steps=min_steps, max_steps=max_steps, max_operand=max_operand,
                                        operations=tuple(operations), seed=seed)
        self.num_problems = num_problems

    def load_rows(self, source: str | None, split: str, limit: int | None = None) -> list[dict]:
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        n = min(limit or self.num_problems, self.num_problems)
        if source in (None, "", "builtin:arithmetic"):
            rows = self.generator.generate(n, split=split)
        else:
            rows = load_rows(source, split, n, "arithmetic", ("question", "answer"))
        return [{**row, "id": row.get("id", f"{split}-{i}")} for i, row in enumerate(rows)]

    def question(self, row: dict) -> str:
        return row["question"]

    def target(self, row: dict) -> str:
        return row["answer"]

    def final_answer(self, row: dict) -> str | None:
        return extract_answer(row["answer"])

    def grade(self, completion: str, row: dict) -> Grade:
        return Grade(correct=grade(completion, row["answer"]), prediction=extract_answer(completion))

    def difficulty(self, row: dict) -> str | None:
        """The number of operations ("3 steps"), from the generator's intermediate values."""
        steps = row.get("steps")
        return None if steps is None else f"{len(steps)} steps"

    def step_labels(self, completion: str, row: dict) -> list[int] | None:
        """Line by line (`llm2diff.tasks.arithmetic.step_labels`): the generator knows every intermediate value."""
        return step_labels(completion, row)
