"""Choosing among k samples (`llm2diff.prm.select`): the rules' exact picks, and `compare_selection` scoring every rule
on the same k samples (a perfect PRM matches the oracle; the single sample costs 1/k of the passes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_lossless import make_dlm

from llm2diff.prm.model import tokenizer_fingerprint
from llm2diff.prm.select import Candidate, best_by_prm, choose, compare_selection, majority_vote, selection_table
from llm2diff.tasks.base import EvalTask, Grade


def test_majority_vote_picks_the_first_of_the_most_frequent_answer():
    assert majority_vote(["3", "5", "5", "3", "5"]) == 1
    assert majority_vote(["3", "5", "5", "3"]) == 0  # a tie: the answer met first
    assert majority_vote([None, None, "7"]) == 2  # no answer never wins
    assert majority_vote([None, None]) == 0


def test_best_by_prm_by_minimum_or_last_step():
    scores = [[0.9, 0.2, 0.95], [0.6, 0.7, 0.6], [], [0.5, 0.5, 0.99]]
    assert best_by_prm(scores, "min") == 1
    assert best_by_prm(scores, "last") == 3
    assert best_by_prm([[], []]) == 0
    with pytest.raises(ValueError, match="aggregate must be"):
        best_by_prm(scores, "mean")


def test_choose_needs_scores_for_the_prm_rules():
    candidates = [Candidate("a", [1], False, "1", 3), Candidate("b", [2], True, "2", 3)]
    assert choose(candidates, "single") == 0 and choose(candidates, "oracle") is None
    with pytest.raises(ValueError, match="needs PRM step scores"):
        choose(candidates, "prm-min")
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        choose(candidates, "best")


class FirstWordTask(EvalTask):
    """Right when the completion's first word is the row's target word."""

    name = "first-word"

    def question(self, row):
        return row["question"]

    def target(self, row):
        return row["target"]

    def grade(self, completion, row):
        words = completion.split()
        prediction = words[0] if words else None
        return Grade(correct=prediction == row["target"], prediction=prediction)


def test_every_rule_on_the_same_samples():
    dlm = make_dlm("qwen2", 4, scale=0.5)
    tok = dlm.tokenizer
    task = FirstWordTask()
    layer = {"temperature": 1.5, "max_new_tokens": 4}
    rows = [{"question": q, "target": None} for q in ("tom has", "5 apples", "has")]
    k = 6
    # the targets: the first word of each row's last sample (the same samples again below: the same seed), so that
    # every row has a right sample and some have wrong ones
    first = compare_selection(dlm, task, rows, k=k, decoding=layer, seed=0, batch_size=12)
    for row, pick in zip(rows, first.chosen):
        row["target"] = pick["answers"][-1]

    from llm2diff.evaluation.runner import PromptRenderer

    render = PromptRenderer(dlm)
    row_of = {tuple(render(task, row, [])): row for row in rows}

    def oracle_scores(prompts, responses, ends):  # a perfect PRM: 1 on every step of a right solution
        out = []
        for prompt, response, e in zip(prompts, responses, ends):
            row = row_of[tuple(prompt)]
            out.append([float(task.grade(tok.decode(response, skip_special_tokens=True), row).correct)] * len(e))
        return out

    prm = SimpleNamespace(config=SimpleNamespace(tokenizer_fingerprint=tokenizer_fingerprint(tok)),
                          step_scores=oracle_scores)
    result = compare_selection(dlm, task, rows, k=k, prm=prm, decoding=layer, seed=0, batch_size=12)
    assert set(result.correct) == {"single", "majority", "prm-min", "prm-last", "oracle"}
    for pick in result.chosen:
        assert pick["picks"]["single"] == 0 and pick["picks"]["majority"] == majority_vote(pick["answers"])
    assert result.correct["single"] == sum(p["correct"][0] for p in result.chosen)
    assert result.correct["majority"] == sum(p["correct"][p["picks"]["majority"]] for p in result.chosen)
    assert result.correct["oracle"] == sum(any(p["correct"]) for p in result.chosen)
    assert result.correct["prm-min"] == result.correct["prm-last"] == result.correct["oracle"]  # the perfect PRM
    assert result.correct["oracle"] == len(rows)
    assert sum(sum(p["correct"]) for p in result.chosen) < k * len(rows)  # not every sample is right
    assert result.passes_per_problem["majority"] == result.passes_per_problem["oracle"] > \
        result.passes_per_problem["single"]
    assert 0 < result.prm_passes_per_problem <= k  # every solution with a step (an empty one has none)
    assert "| prm-min |" in selection_table(result)
    # the step search: its own solutions (its own samples), graded and counted as a rule
    searched = compare_selection(dlm, task, rows, k=k, prm=prm, decoding=layer, seed=0, batch_size=12,
                                 step_search=True)
    assert {r: searched.correct[r] for r in result.correct} == result.correct  # the other rules are unchanged
    assert searched.correct["prm-steps"] == sum(p["step_search_correct"] for p in searched.chosen)
    assert searched.passes_per_problem["prm-steps"] > searched.passes_per_problem["single"]
    assert "| prm-steps |" in selection_table(searched)
    with pytest.raises(ValueError, match="step_search needs a process reward model"):
        compare_selection(dlm, task, rows, k=2, step_search=True)
    # without a PRM the PRM rules are left out; with another tokenizer's PRM, refused
    plain = compare_selection(dlm, task, rows, k=2, decoding={"temperature": 1.5, "max_new_tokens": 4})
    assert set(plain.correct) == {"single", "majority", "oracle"}
    other = SimpleNamespace(config=SimpleNamespace(tokenizer_fingerprint={"vocab_size": 1, "sha256": "x"}))
    with pytest.raises(ValueError, match="different tokenizer"):
        compare_selection(dlm, task, rows, k=2, prm=other)


def test_prm_step_search_keeps_the_best_scored_line_at_each_step(monkeypatch):
    """The search with scripted candidates and a PRM scoring each step by its first token: the kept line is the
    best-scored one, the next step continues it (the response prefix), the budget shrinks, and the search ends
    with the first kept candidate that ends the text."""
    import llm2diff.evaluation.completions as completions
    from llm2diff.prm.select import prm_step_search

    dlm = make_dlm("qwen2", 4, scale=0.5)
    tok = dlm.tokenizer
    nl = tok.convert_tokens_to_ids("\n")
    assert tok.decode([nl]) == "\n"
    eos = dlm.eos_token_ids[0]
    a, b, c, d, e = tok.encode("tom has 5 apples 3", add_special_tokens=False)
    script = [[[a, nl], [b, nl], [c, nl]], [[d, nl], [e, eos], [c, nl]]]
    score_of = {a: 0.2, b: 0.9, c: 0.5, d: 0.3, e: 0.8}
    calls = []

    def fake_complete(policy, prompts, layer, *, seed, response_prefix=None):
        prefix = None if response_prefix is None else response_prefix.tolist()
        calls.append({"budget": layer["max_new_tokens"], "stops": layer["stop_strings"], "prefix": prefix, "seed": seed})
        cut = [t[: layer["max_new_tokens"]] for t in script[len(calls) - 1]]
        rows = [completions.Completion(t, tok.decode(t), 2) for t in cut]
        return completions.Completions(rows, 6, 0.0)

    def step_scores(prompts, responses, ends):  # one end per candidate: its new step; scored by the step's first token
        return [[score_of[r[e[0] - 1] if r[e[0]] in (nl, eos) else r[e[0]]]] for r, e in zip(responses, ends)]

    monkeypatch.setattr(completions, "complete", fake_complete)
    prm = SimpleNamespace(step_scores=step_scores)
    tokens, passes, prm_passes = prm_step_search(dlm, prm, [5, 6], 3, {"max_new_tokens": 10}, seed=4)
    assert tokens == [b, nl, e, eos]  # b (0.9) over c and a; then e (0.8) over c and d, which ends the text
    assert [call["prefix"] for call in calls] == [None, [[b, nl]] * 3]
    assert [call["budget"] for call in calls] == [10, 8] and calls[0]["stops"] == ["\n"]
    assert [call["seed"] for call in calls] == [4, 5]
    assert (passes, prm_passes) == (12, 6)

    script[:] = [[[a, nl], [b, nl]]] * 10  # every candidate ends a line: the budget ends the search
    calls.clear()
    tokens, _, _ = prm_step_search(dlm, prm, [5], 2, {"max_new_tokens": 5}, seed=0)
    assert tokens == [b, nl, b, nl, b]  # the last step had one token of budget left: cut at the budget
    assert [call["budget"] for call in calls] == [5, 3, 1]
