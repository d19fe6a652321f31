"""How well a PRM's step scores separate good steps from bad ones.

    from llm2diff.prm.metrics import auroc, evaluate_prm, step_label_accuracy
    auroc([0.9, 0.2, 0.6], [1, 0, 1])                  # 1.0
    step_label_accuracy([0.9, 0.2, 0.6], [1, 0, 0])    # 2/3
    evaluate_prm(prm, rows)   # {"accuracy", "auroc", "num_steps", "positive_rate"} over all steps of all rows

Soft labels (Math-Shepherd fractions) are binarised at 0.5: a step is "good" when its label is >= 0.5, and
predicted good when its score is >= the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

LABEL_THRESHOLD = 0.5


def _check_lengths(scores: Sequence[float], labels: Sequence[float]) -> None:
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} scores but {len(labels)} labels; give one label per score")
    if not scores:
        raise ValueError("no scores given; need at least one scored step")


def binarise(labels: Iterable[float], threshold: float = LABEL_THRESHOLD) -> list[int]:
    """1 for labels >= `threshold`, else 0."""
    return [int(float(y) >= threshold) for y in labels]


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, tied values sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve for hard (0/1) labels: the Mann-Whitney U statistic over n_pos * n_neg.

    It is the probability that a random positive outscores a random negative, ties counting one half.
    """
    _check_lengths(scores, labels)
    bad = sorted({y for y in labels if y not in (0, 1)})
    if bad:
        raise ValueError(f"auroc needs hard 0/1 labels, got {bad[:5]}; binarise soft labels first "
                         "(llm2diff.prm.metrics.binarise)")
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative labels")
    ranks = average_ranks([float(s) for s in scores])
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def step_label_accuracy(scores: Sequence[float], labels: Sequence[float], threshold: float = 0.5) -> float:
    """Fraction of steps where (score >= threshold) agrees with (label >= 0.5)."""
    _check_lengths(scores, labels)
    truth = binarise(labels)
    return sum(int(float(s) >= threshold) == y for s, y in zip(scores, truth)) / len(scores)


def evaluate_prm(prm, rows: Iterable[dict], threshold: float = 0.5, batch_size: int = 16) -> dict[str, Any]:
    """Score every step of `rows` (PRM rows, e.g. a `datasets.Dataset`) and compare with their labels.

    Returns `{"accuracy", "auroc", "num_steps", "positive_rate"}`; `auroc` is None when the labels hold only one
    class (the AUROC is undefined then), `positive_rate` is the fraction of steps labelled good.
    """
    from llm2diff.prm.rows import check_row

    rows = list(rows)
    for i, row in enumerate(rows):
        check_row(i, row)
    scores = prm.step_scores([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                             [r["step_ends"] for r in rows], batch_size=batch_size)
    flat_scores = [s for row in scores for s in row]
    flat_labels = [float(y) for r in rows for y in r["step_labels"]]
    truth = binarise(flat_labels)
    both_classes = 0 < sum(truth) < len(truth)
    return {
        "accuracy": step_label_accuracy(flat_scores, flat_labels, threshold),
        "auroc": auroc(flat_scores, truth) if both_classes else None,
        "num_steps": len(flat_scores),
        "positive_rate": sum(truth) / len(truth),
    }
