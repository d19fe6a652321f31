"""Choosing one answer among k sampled solutions: the first sample, a majority vote, or the PRM's best.

    result = compare_selection(dlm, task, rows, k=8, prm=load_prm("outputs/prm"), seed=0)
    print(selection_table(result))

Every problem is sampled k times once (the block sampler at the decoding's temperature, `complete`), and each rule
chooses among the same k solutions, so the rules differ only in how they choose:
  - `single`: the first sample (what one sampled solution scores, at 1/k of the passes);
  - `majority`: the most frequent final answer among the k (ties: the answer met first; self-consistency);
  - `prm-min` / `prm-last`: the solution whose PRM step scores have the highest minimum / last value (best-of-k by
    the process reward model; each solution's steps end at its lines, as the PRM was trained);
  - `oracle`: right if any sample is (pass@k, the ceiling of any rule);
  - `prm-steps` (with `step_search=True`): not a choice among the k samples but a PRM-guided search that builds one
    solution line by line: k candidate continuations of the solution so far, each up to the end of its next line
    (the block sampler, committing blocks until the line ends), the PRM scores each candidate's new step, the best
    is kept (`prm_step_search`). About the same policy passes as k whole samples, one PRM pass per candidate.
Passes per problem are the policy's forward passes for what the rule needs (k samples, or one), and the PRM's
passes are counted apart (one per solution scored).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

RULES = ("single", "majority", "prm-min", "prm-last", "oracle")


@dataclass
class Candidate:
    """One sampled solution: its text and tokens, whether it is right, its final answer and its PRM step scores."""

    text: str
    tokens: list[int]
    correct: bool
    answer: str | None
    passes: int
    step_scores: list[float] | None = None


def majority_vote(answers: Sequence[str | None]) -> int:
    """Index of the first solution carrying the most frequent answer (None answers never win unless all are None)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def best_by_prm(scores: Sequence[Sequence[float] | None], aggregate: str = "min") -> int:
    """Index of the solution with the highest aggregated step score ("min" or "last"); ties: the earliest.
    A solution without steps scores lowest."""
    if aggregate not in ("min", "last"):
        raise ValueError(f"aggregate must be 'min' or 'last', got {aggregate!r}")

    def value(s):
        if not s:
            return float("-inf")
        return min(s) if aggregate == "min" else s[-1]

    values = [value(s) for s in scores]
    return values.index(max(values))


def choose(candidates: Sequence[Candidate], rule: str) -> int | None:
    """The index `rule` picks among `candidates` (None for `oracle`, which is right if any is)."""
    if rule == "single":
        return 0
    if rule == "majority":
        return majority_vote([c.answer for c in candidates])
    if rule in ("prm-min", "prm-last"):
        if any(c.step_scores is None for c in candidates):
            raise ValueError(f"rule {rule!r} needs PRM step scores: pass a process reward model")
        return best_by_prm([c.step_scores for c in candidates], rule.split("-")[1])
    if rule == "oracle":
        return None
    raise ValueError(f"unknown selection rule {rule!r}; available: {', '.join(RULES)}")


@dataclass
class SelectionResult:
    """Per rule: problems right, and the policy's passes per problem; the PRM's passes apart."""

    k: int
    problems: int
    correct: dict[str, int] = field(default_factory=dict)
    passes_per_problem: dict[str, float] = field(default_factory=dict)
    prm_passes_per_problem: float = 0.0
    decoding: dict | None = None
    chosen: list[dict] = field(default_factory=list)

    def accuracy(self, rule: str) -> float:
        return self.correct[rule] / self.problems if self.problems else 0.0

    def to_dict(self) -> dict:
        return {"k": self.k, "problems": self.problems, "correct": self.correct,
                "accuracy": {r: self.accuracy(r) for r in self.correct}, "passes_per_problem": self.passes_per_problem,
                "prm_passes_per_problem": self.prm_passes_per_problem, "decoding": self.decoding}


def prm_step_search(dlm, prm, prompt: Sequence[int], k: int, decoding: dict, seed: int = 0
                    ) -> tuple[list[int], int, int]:
    """One solution built step by step under a process reward model's guidance.

    At each step, k continuations of the solution so far are sampled up to the end of their next line (stop string
    "\\n"; the block sampler at `decoding`, which holds `max_new_tokens`, the budget of the whole solution), the PRM
    scores each candidate's new step after the prompt and the chosen lines, and the best candidate is kept; the
    search ends with the first chosen candidate that ends the text (end of sequence, or no line end within the
    budget). Returns (the solution's tokens, the policy's passes, the PRM's passes).
    """
    import torch

    from llm2diff.evaluation.completions import complete
    from llm2diff.prm.steps import step_ends

    budget = int(decoding["max_new_tokens"])
    tok, eos = dlm.tokenizer, set(dlm.eos_token_ids)
    chosen: list[int] = []
    passes = prm_passes = 0
    for step in range(budget):  # every step adds at least one token
        prefix = torch.tensor([chosen] * k, dtype=torch.long) if chosen else None
        layer = {**decoding, "max_new_tokens": budget - len(chosen), "stop_strings": ["\n"]}
        done = complete(dlm, [list(prompt)] * k, layer, seed=seed + step, response_prefix=prefix)
        passes += sum(c.passes for c in done.rows)
        full = [chosen + c.tokens for c in done.rows]
        ends = [step_ends(f, tok, "lines", eos_ids=list(eos)) for f in full]
        live = [i for i in range(k) if done.rows[i].tokens and ends[i] and ends[i][-1] >= len(chosen)]
        if not live:
            break
        scores = prm.step_scores([list(prompt)] * len(live), [full[i] for i in live], [[ends[i][-1]] for i in live])
        prm_passes += len(live)
        best = live[max(range(len(live)), key=lambda j: (scores[j][0], -j))]
        new = done.rows[best].tokens
        chosen = full[best]
        line_ended = "\n" in tok.decode([new[-1]]) and new[-1] not in eos
        if not line_ended or len(chosen) >= budget:
            break
    return chosen, passes, prm_passes


def compare_selection(dlm, task, rows: list[dict], k: int = 8, prm=None, decoding: dict | None = None,
                      seed: int = 0, batch_size: int = 32, render=None, step_search: bool = False
                      ) -> SelectionResult:
    """Sample k solutions per row once and score every rule on them (see the module docstring).

    `decoding`: the sampling settings over the model's saved decoding (default: the block sampler at temperature
    0.7); `render`: prompt renderer (default: the evaluation runner's, the model's saved prompt format);
    `step_search`: also run the PRM-guided step search with k candidates per step (rule `prm-steps`; needs `prm`).
    """
    from llm2diff.evaluation.completions import complete
    from llm2diff.evaluation.runner import PromptRenderer
    from llm2diff.prm.steps import step_ends

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if prm is not None:
        from llm2diff.prm.model import check_tokenizer_match

        check_tokenizer_match(prm, dlm.tokenizer)
    layer = {"temperature": 0.7, **(decoding or {}), "mode": "block"}
    render = render or PromptRenderer(dlm)
    if step_search and prm is None:
        raise ValueError("step_search needs a process reward model (prm)")
    rules = [r for r in RULES if prm is not None or not r.startswith("prm")]
    result = SelectionResult(k=k, problems=len(rows), correct=dict.fromkeys(rules, 0), decoding=layer)
    passes = dict.fromkeys(rules, 0)
    per_batch = max(1, batch_size // k)
    for lo in range(0, len(rows), per_batch):
        batch = rows[lo : lo + per_batch]
        prompts = [render(task, row, []) for row in batch for _ in range(k)]
        done = complete(dlm, prompts, layer, seed=seed + lo)
        scores = None
        if prm is not None:
            ends = [step_ends(c.tokens, dlm.tokenizer, "lines", eos_ids=dlm.eos_token_ids) for c in done.rows]
            scored = [i for i, e in enumerate(ends) if e]
            values = prm.step_scores([prompts[i] for i in scored], [done.rows[i].tokens for i in scored],
                                     [ends[i] for i in scored])
            scores = [None] * len(done.rows)
            for i, v in zip(scored, values):
                scores[i] = v
            result.prm_passes_per_problem += len(scored)
        for j, row in enumerate(batch):
            candidates = []
            for s in range(k):
                c = done.rows[j * k + s]
                grade = task.grade(c.text, row)
                candidates.append(Candidate(c.text, c.tokens, bool(grade.correct),
                                            None if grade.prediction is None else str(grade.prediction), c.passes,
                                            None if scores is None else (scores[j * k + s] or [])))
            picks = {}
            for rule in rules:
                index = choose(candidates, rule)
                picks[rule] = index
                right = any(c.correct for c in candidates) if index is None else candidates[index].correct
                result.correct[rule] += right
                passes[rule] += candidates[0].passes if rule == "single" else sum(c.passes for c in candidates)
            result.chosen.append({"problem": lo + j, "picks": picks, "correct": [c.correct for c in candidates],
                                  "answers": [c.answer for c in candidates]})
    if step_search:
        from llm2diff.sampling.config import DecodingConfig

        budget = DecodingConfig.resolve(dlm.decoding, layer).max_new_tokens
        result.correct["prm-steps"], passes["prm-steps"] = 0, 0
        for i, row in enumerate(rows):
            tokens, used, scored = prm_step_search(dlm, prm, render(task, row, []), k,
                                                   {**layer, "max_new_tokens": budget}, seed=seed + 7919 * (i + 1))
            right = bool(task.grade(dlm.tokenizer.decode(tokens, skip_special_tokens=True), row).correct)
            result.correct["prm-steps"] += right
            passes["prm-steps"] += used
            result.prm_passes_per_problem += scored
            result.chosen[i]["step_search_correct"] = right
        rules.append("prm-steps")
    n = max(len(rows), 1)
    result.passes_per_problem = {rule: passes[rule] / n for rule in rules}
    result.prm_passes_per_problem /= n
    return result


def selection_table(result: SelectionResult) -> str:
    lines = [f"| rule (k={result.k}) | accuracy | policy passes per problem |", "|---|---|---|"]
    for rule in result.correct:
        lines.append(f"| {rule} | {result.accuracy(rule):.1%} ({result.correct[rule]}/{result.problems}) "
                     f"| {result.passes_per_problem[rule]:.1f} |")
    if any(r.startswith("prm") for r in result.correct):
        lines.append(f"\nThe PRM scored {result.prm_passes_per_problem:.1f} solutions per problem (one pass each).")
    return "\n".join(lines)
