"""AI2 ARC-Challenge, multiple-choice science questions, scored two ways.

    task = ARCChallengeTask(mode="loglikelihood", num_samples=32, seed=0)
    rows = task.load_rows(None, split="test", limit=100)            # hub allenai/ai2_arc, config ARC-Challenge
    grade = task.score_choices(dlm, rows[0])                         # Grade(correct, prediction="B", {"acc_norm": 1.0})
    grade = task.score_choices(dlm, rows[0], use_parent=True)        # the AR parent's exact log-likelihoods

    task = ARCChallengeTask(mode="generative")
    task.grade("The answer is B.", rows[0])                          # the model writes the label

Rows have the hub layout: `question` (str), `choices` = {"text": [...], "label": [...]} and `answerKey` (one of the
labels: "A".."E", or "1".."4" in a few rows); `id` is kept when present. `source` may also be a local
JSONL/JSON/Parquet file or a directory of such files in that layout (loaded with
`llm2diff.training.data.load_raw_dataset`; a single file's only split is "train").

Prompt (`question(row)`): "Question: ...\\nA. ...\\nB. ...\\nAnswer:". In "loglikelihood" mode each choice is scored as
the continuation `" " + text` of the rendered prompt (the diffusion model's ELBO, or the AR parent's exact
log-likelihood, see `llm2diff.evaluation.likelihood`): the highest total is the prediction (`correct`, i.e. acc),
the highest per-token average gives `acc_norm`. In "generative" mode the prompt asks for the label and `grade`
extracts it from the completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from llm2diff.tasks.base import EvalTask, Grade, load_rows

HUB_NAME = "allenai/ai2_arc"
HUB_CONFIG = "ARC-Challenge"
MODES = ("loglikelihood", "generative")
REQUIRED_FIELDS = ("question", "choices", "answerKey")

Render = Callable[[list[dict[str, str]]], list[int]]


def extract_choice(completion: str, labels: Sequence[str]) -> str | None:
    """The choice label a completion gives, or None.

    An explicit statement wins ("answer is B", "Answer: (C)", "answer: 4"); otherwise the first standalone label
    (not part of a word or a number: "B", "(C)", "B.", "**D**" count; the "A" of "Apple" or the "4" of "14" or
    "4.5" do not). Labels are matched case-sensitively, so the article "a" is never the label "A".
    """
    if not labels:
        return None
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    label = (rf"(?<![A-Za-z0-9_])(?<!\d[.,])({alternatives})(?![A-Za-z0-9_])(?![.,]\d)")
    explicit = re.search(rf"(?i:answer)(?:\s+(?i:is))?\s*[:\-]?\s*(?i:option|choice)?\s*[\(\[*]*\s*{label}", completion)
    if explicit:
        return explicit.group(1)
    first = re.search(label, completion)
    return first.group(1) if first else None


def default_render(dlm) -> Render:
    """`render(messages) -> prompt ids` in the model's saved prompt format, exactly as the evaluation runner renders
    (`llm2diff.evaluation.runner.PromptRenderer.render_messages`)."""
    from llm2diff.evaluation.runner import PromptRenderer

    return PromptRenderer(dlm).render_messages


class ARCChallengeTask(EvalTask):
    """ARC-Challenge (AI2 Reasoning Challenge, challenge set) as multiple choice.

    Args:
        mode: "loglikelihood" (score every choice with `score_choices`) or "generative" (the model writes the label;
            `grade` extracts it).
        num_samples: Monte-Carlo samples of the diffusion model's ELBO per choice (loglikelihood mode).
        seed: seed of those samples; every choice of a row uses the same seed (common random numbers).
    """

    name = "arc_challenge"

    def __init__(self, mode: str = "loglikelihood", num_samples: int = 32, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown arc_challenge mode {mode!r}; available: {', '.join(MODES)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.mode = mode
        self.num_samples = num_samples
        self.seed = seed

    # -- rows ---------------------------------------------------------------------------------------------------
    def load_rows(self, source: str | None, split: str, limit: int | None = None) -> list[dict]:
        """Rows of `split` from the hub (`allenai/ai2_arc`, config `ARC-Challenge`) when `source` is None, else
        from a local JSONL/JSON/Parquet file (split "train" only) or directory, or another hub name. Checks every
        row's fields; `limit` keeps the first rows."""
        where = source or f"{HUB_NAME} ({HUB_CONFIG})"
        rows = load_rows(source, split, limit, "ARC-Challenge", ("question", "choices", "answerKey"),
                         hub=(HUB_NAME, HUB_CONFIG))
        for index, row in enumerate(rows):
            _check_row(row, index, where)
        return [{**row, "id": row.get("id") or f"{split}-{i}"} for i, row in enumerate(rows)]

    def row_id(self, row: dict, index: int) -> str:
        return str(row.get("id") or index)

    # -- prompts ------------------------------------------------------------------------------------------------
    def question(self, row: dict) -> str:
        """"Question: ...\\nA. ...\\nB. ...\\nAnswer:"; in generative mode an instruction to answer with the label
        comes before "Answer:"."""
        labels, texts = _labels(row), _texts(row)
        lines = [f"Question: {str(row['question']).strip()}"]
        lines += [f"{label}. {str(text).strip()}" for label, text in zip(labels, texts)]
        if self.mode == "generative":
            kind = "number" if all(label.isdigit() for label in labels) else "letter"
            lines.append(f"Answer with the {kind} of the correct choice ({', '.join(labels)}).")
        lines.append("Answer:")
        return "\n".join(lines)

    def answer_label(self, row: dict) -> str:
        """The correct choice's label (`answerKey`)."""
        return str(row["answerKey"]).strip()

    def answer_text(self, row: dict) -> str:
        """The correct choice's text."""
        return str(_texts(row)[_labels(row).index(self.answer_label(row))]).strip()

    def target(self, row: dict) -> str:
        """The gold completion: the correct label in generative mode; in loglikelihood mode the correct choice's
        text, the continuation that mode scores (so few-shot demonstrations show what is scored)."""
        return self.answer_label(row) if self.mode == "generative" else self.answer_text(row)

    def plain_prompt(self, row: dict, shots: list[dict] = (), template: str = "Question: {question}\nAnswer: ") -> str:
        """Plain text: each shot's question and target, then the row's question. `question(row)` already carries its
        "Question:" / "Answer:" frame, so `template` is not applied."""
        parts = [f"{self.question(s)} {self.target(s)}" for s in shots]
        parts.append(self.question(row))
        return "\n\n".join(parts)

    # -- generative grading ---------------------------------------------------------------------------------------
    def grade(self, completion: str, row: dict) -> Grade:
        """Extract the label from a completion (`extract_choice`): correct when it is the answer key."""
        prediction = extract_choice(completion, _labels(row))
        return Grade(correct=prediction is not None and prediction == self.answer_label(row), prediction=prediction)

    # -- loglikelihood scoring ----------------------------------------------------------------------------------
    def score_choices(self, dlm, row: dict, use_parent: bool = False, render: Render | None = None,
                      shots: Sequence[dict] = (), prefix: str = " ") -> Grade:
        """Score every choice as the continuation `prefix + text` of the rendered prompt.

        Args:
            dlm: a `DiffusionLM`.
            row: one ARC row.
            use_parent: score with the AR parent's exact log-likelihood (adapter disabled) instead of the ELBO.
            render: `render(messages) -> prompt token ids` (the evaluation runner's prompt format); default
                `default_render(dlm)` (chat template when the tokenizer has one, else plain text).
            shots: few-shot demonstrations (rows), rendered as user/assistant pairs with their `target`.
            prefix: what precedes each choice's text in the continuation.

        Returns:
            `Grade(correct, prediction=label with the highest total log-likelihood,
            metrics={"acc_norm": 1.0 if the label with the highest per-token average is correct else 0.0})`.
        """
        from llm2diff.evaluation.likelihood import loglikelihood

        if self.mode != "loglikelihood":
            raise ValueError("score_choices needs mode='loglikelihood' (this task was built in generative mode)")
        render = render or default_render(dlm)
        context = list(render(self.messages(row, list(shots))))
        labels, texts = _labels(row), _texts(row)
        totals, per_token = [], []
        for text in texts:
            continuation = list(dlm.tokenizer(prefix + str(text).strip(), add_special_tokens=False).input_ids)
            if not continuation:
                raise ValueError(f"row {row.get('id')!r}: choice {text!r} tokenizes to nothing")
            ll = loglikelihood(dlm, context, continuation, use_parent=use_parent, num_samples=self.num_samples,
                               seed=self.seed)
            totals.append(ll)
            per_token.append(ll / len(continuation))
        gold = self.answer_label(row)
        best = labels[max(range(len(labels)), key=totals.__getitem__)]
        best_norm = labels[max(range(len(labels)), key=per_token.__getitem__)]
        return Grade(correct=best == gold, prediction=best, metrics={"acc_norm": float(best_norm == gold)})


def _labels(row: dict) -> list[str]:
    return [str(label).strip() for label in row["choices"]["label"]]


def _texts(row: dict) -> list[str]:
    return list(row["choices"]["text"])


def _check_row(row: dict[str, Any], index: int, where: str) -> None:
    missing = [name for name in REQUIRED_FIELDS if row.get(name) is None]
    if missing:
        raise ValueError(f"ARC-Challenge row {index} of {where} is missing {missing} (needs {list(REQUIRED_FIELDS)}; "
                         f"fields present: {sorted(row)})")
    choices = row["choices"]
    if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
        raise ValueError(f"ARC-Challenge row {index} of {where}: 'choices' must be a dict with 'text' and 'label' "
                         f"lists, got {choices!r:.120}")
    texts, labels = choices["text"], choices["label"]
    if not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)) or len(texts) != len(labels) \
            or len(labels) < 2:
        raise ValueError(f"ARC-Challenge row {index} of {where}: 'choices' needs as many texts as labels, at least "
                         f"2, got {len(texts) if isinstance(texts, (list, tuple)) else texts!r} texts and "
                         f"{len(labels) if isinstance(labels, (list, tuple)) else labels!r} labels")
    normalised = [str(label).strip() for label in labels]
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"ARC-Challenge row {index} of {where}: duplicate choice labels {normalised}")
    if str(row["answerKey"]).strip() not in normalised:
        raise ValueError(f"ARC-Challenge row {index} of {where}: answerKey {row['answerKey']!r} is not one of the "
                         f"choice labels {normalised}")
