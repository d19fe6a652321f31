"""How sure a measured change is: paired differences over the same problems, and spread over seeds.

    before = read_correct("outputs/star/round-0/eval/results.jsonl")
    after = read_correct("outputs/star/round-3/eval/results.jsonl")
    d = paired_difference(before, after)      # after - before, paired by problem id
    print(format_difference(d))               # "+12.3 points [+8.0, +16.7] (n=300, 45 gained, 8 lost)"

Two variants graded on the same problems differ only where they disagree, so the interval is over problems and
paired: a percentile bootstrap of the mean per-problem difference (`resamples` draws of the problems with
replacement, seeded), and McNemar's exact test on the discordant pairs (`mcnemar_p`, two-sided). Over seeds,
`spread` gives the mean, minimum, maximum and standard deviation. See docs/star.md for how the tables use them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PairedDifference:
    """`after` minus `before` accuracy (fractions) on `n` shared problems, with a `confidence` bootstrap interval."""

    n: int
    before: float
    after: float
    difference: float
    low: float
    high: float
    gained: int  # problems right after, wrong before
    lost: int  # problems wrong after, right before
    mcnemar_p: float
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n", "before", "after", "difference", "low", "high", "gained", "lost",
                                              "mcnemar_p", "confidence")}


def read_correct(results: str | Path) -> dict[str, bool]:
    """`{problem id: correct}` from an evaluation's `results.jsonl` (`llm2diff eval`, a STaR round's `eval/`)."""
    path = Path(results)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation results at {path}: give an evaluation's output directory or its "
                                "results.jsonl")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[str(record["id"])] = bool(record["correct"])
    return out


def paired_difference(before: Mapping[str, bool] | Sequence[bool], after: Mapping[str, bool] | Sequence[bool],
                      confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """The paired accuracy difference `after - before` over the problems both graded (by id for mappings, by
    position for sequences), with a percentile-bootstrap interval and McNemar's exact p-value."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(before, Mapping) != isinstance(after, Mapping):
        raise TypeError("give both results as {id: correct} mappings or both as sequences")
    if isinstance(before, Mapping):
        ids = [i for i in before if i in after]
        pairs = [(bool(before[i]), bool(after[i])) for i in ids]
    else:
        if len(before) != len(after):
            raise ValueError(f"the two sequences grade different numbers of problems ({len(before)} vs {len(after)})")
        pairs = [(bool(b), bool(a)) for b, a in zip(before, after)]
    if not pairs:
        raise ValueError("no problem was graded in both evaluations: they cannot be paired")
    n = len(pairs)
    delta = torch.tensor([float(a) - float(b) for b, a in pairs], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    means = delta[torch.randint(n, (resamples, n), generator=generator)].mean(dim=1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    gained = sum(1 for b, a in pairs if a and not b)
    lost = sum(1 for b, a in pairs if b and not a)
    return PairedDifference(n=n, before=sum(b for b, _ in pairs) / n, after=sum(a for _, a in pairs) / n,
                            difference=float(delta.mean()), low=low, high=high, gained=gained, lost=lost,
                            mcnemar_p=mcnemar_exact(gained, lost), confidence=confidence)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `gained` against `lost` discordant pairs at 1/2."""
    total = gained + lost
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(gained, lost) + 1)) / 2**total
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Spread:
    """A measurement over seeds: mean, minimum, maximum and (sample) standard deviation."""

    mean: float
    low: float
    high: float
    std: float
    count: int


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.fmean(values), min(values), max(values), std, len(values))


def format_difference(d: PairedDifference) -> str:
    """`+12.3 points [+8.0, +16.7] (n=300, 45 gained, 8 lost)`."""
    return (f"{100 * d.difference:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}] "
            f"(n={d.n}, {d.gained} gained, {d.lost} lost)")


def format_spread(s: Spread, percent: bool = True) -> str:
    """`45.2% (41.0-49.3, sd 4.2, 3 seeds)`."""
    k = 100 if percent else 1
    unit = "%" if percent else ""
    return f"{k * s.mean:.1f}{unit} ({k * s.low:.1f}-{k * s.high:.1f}, sd {k * s.std:.1f}, {s.count} seeds)"
