"""`benchmarks/retraction.py`: where errors are planted, and that without correction a planted token always stays
(so "detected" measures the correction, not the decoding around it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, make_model, make_tokenizer

from llm2diff import adapt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("retraction")


def test_errors_are_planted_past_a_blocks_first_token_after_the_first_block(bench):
    eos = 2
    reference = [10, 11, 12, 13, 14, 15, 16, eos, eos]
    seen = {bench.plant_position(reference, 4, [eos], random.Random(s)) for s in range(50)}
    assert seen == {5, 6}  # block 1 without its first token (4), before the end-of-sequence (7)
    assert bench.plant_position([10, 11, 12, 13, eos], 4, [eos], random.Random(0)) is None
    assert set(bench.methods(0.4)) == {"none", "heuristic", "replace", "remask", "reopen"}
    assert bench.methods(0.4)["replace"]["edit_threshold"] == 0.4
    swept = bench.methods(0.4, [0.3, 0.9])
    assert swept["reopen@0.9"] == {**swept["reopen"], "reopen_threshold": 0.9}
    assert swept["reopen@0.3"]["reopen_threshold"] == 0.3 and swept["reopen"]["reopen_threshold"] == 0.4
    assert swept["reopen-last@0.9"] == {**swept["reopen@0.9"], "reopen_last": True, "reopen_last_below": 0.9}


def test_a_planted_token_stays_without_correction(bench):
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    dlm.model.generation_config.eos_token_id = None
    dlm.tokenizer.eos_token = "<|im_start|>"  # a token this random model never picks: answers run to the budget
    prompts = [[5, 6, 7, 8], [9, 10, 11], [5, 9]]
    for source in ("model", "parent"):
        counts = bench.planted_errors(dlm, prompts, 12, bench.methods(0.05), seed=1, source=source)
        for scenario in ("early", "finished"):
            assert all(c["planted"] == 3 for c in counts[scenario].values())
            assert counts[scenario]["none"]["detected"] == counts[scenario]["none"]["fixed"] == 0
            assert all(c["fixed"] <= c["detected"] for c in counts[scenario].values())
        # in a finished block only reopening can change anything
        assert all(counts["finished"][m]["detected"] == 0 for m in ("heuristic", "replace", "remask"))
    reference = bench.reference_answer(dlm, prompts[0], 12)
    own = bench.model_alternative(dlm, prompts[0], reference, 5)
    with torch.no_grad():
        from llm2diff.sampling.block_cache import BlockContext

        ids = torch.tensor([prompts[0]])
        ctx = BlockContext(dlm.model, ids, torch.ones_like(ids), 4)
        ctx.commit(torch.tensor([reference[:4]]))
        logits = ctx.block_logits(torch.full((1, 4), dlm.config.mask_token_id))[0, 1]
    logits[[reference[5], dlm.config.mask_token_id]] = float("-inf")
    assert own == int(logits[: dlm.config.vocab_size].argmax())  # the model's own second choice, block masked
    wrong = bench.parent_alternative(dlm, prompts[0], reference, 5)
    assert wrong != reference[5] and wrong != dlm.config.mask_token_id
    with torch.no_grad():
        logits = dlm.model(input_ids=torch.tensor([prompts[0] + reference[:5]])).logits[0, -1]
    logits[[reference[5], dlm.config.mask_token_id]] = float("-inf")
    assert wrong == int(logits[: dlm.config.vocab_size].argmax())  # the parent's most likely other token


def test_planted_runs_decode_to_the_end_and_grade_the_answer(bench):
    """With `grade`, each planted run decodes on to the end of the answer: the reference before the planted block,
    then what was decoded (the reference's own block put back under one-token-per-step decoding gives the reference
    answer again); plants are recorded, and harmful / recovered count answers, not tokens."""
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    dlm.model.generation_config.eos_token_id = None
    dlm.tokenizer.eos_token = "<|im_start|>"  # answers run to the budget
    prompts = [[5, 6, 7, 8], [9, 10, 11], [5, 9]]
    reference = bench.reference_answer(dlm, prompts[0], 12)
    token, block, answer = bench.planted(dlm, prompts[0], reference, 5, reference[5], bench.ONE_PER_STEP,
                                         reference[4:8], to_end=12)
    assert (token, block, answer) == (reference[5], reference[4:8], reference)
    wrong = bench.model_alternative(dlm, prompts[0], reference, 5)
    token, block, answer = bench.planted(dlm, prompts[0], reference, 5, wrong, bench.methods(0.5)["none"],
                                         to_end=12)
    assert token == wrong and answer[5] == wrong and answer[:4] == reference[:4] and len(answer) == 12
    assert bench.planted(dlm, prompts[0], reference, 5, wrong, bench.methods(0.5)["none"])[2][:4] == reference[:4]

    references = [bench.reference_answer(dlm, p, 12) for p in prompts]
    graded = []

    def grade(i, tokens):  # right: the reference answer itself, token for token
        graded.append(i)
        return tokens == references[i]

    records = []
    layers = bench.methods(0.05)
    counts = bench.planted_errors(dlm, prompts, 12, layers, seed=1, grade=grade, records=records)
    assert [r["problem"] for r in records] == [0, 1, 2] and set(graded) == {0, 1, 2}
    assert all(r["reference_right"] and r["after"][s]["none"] == {"token": r["wrong"], "right": False}
               for r in records for s in ("early", "finished"))
    for scenario in ("early", "finished"):
        none = counts[scenario]["none"]
        assert none == {"planted": 3, "detected": 0, "fixed": 0, "right": 0, "harmful": 3, "recovered": 0}
        for name, c in counts[scenario].items():
            assert c["harmful"] == 3 and c["recovered"] == c["right"] <= c["fixed"], name  # right needs the token
            assert c["right"] == sum(r["after"][scenario][name]["right"] for r in records)
            assert c["fixed"] == sum(r["after"][scenario][name]["token"] == r["reference"] for r in records)
    assert "right" not in bench.planted_errors(dlm, prompts[:1], 12, layers, seed=1)["early"]["none"]

    class Exact:  # a task whose answer is right when its text is the row
        @staticmethod
        def grade(text, row):
            return type("Graded", (), {"correct": text == row})()

    text = dlm.tokenizer.decode(references[1], skip_special_tokens=True)
    grade = bench.answer_grader(dlm, Exact, ["other", text])
    assert grade(1, references[1]) is True and grade(0, references[1]) is False


def test_reopen_thresholds_are_read_as_probabilities_with_a_clear_refusal(bench, monkeypatch, capsys):
    import argparse

    assert bench.thresholds("0.3, 0.7,0.9") == [0.3, 0.7, 0.9] and bench.thresholds("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="'high' is not a number: give probabilities"):
        bench.thresholds("0.3,high")
    with pytest.raises(argparse.ArgumentTypeError, match=r"1.5 is not a probability in \(0, 1\]"):
        bench.thresholds("1.5")
    monkeypatch.setattr("sys.argv", ["retraction.py", "--reopen-thresholds", "0.3,x"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "argument --reopen-thresholds: 'x' is not a number" in capsys.readouterr().err


def test_every_method_runs_on_a_causal_clean_model_whose_saved_decoding_is_verified(bench):
    """A causal-clean model saves verified decoding: the methods run the block sampler over it (reopening judged by
    the AR stream), and its accuracy rows add verified decoding itself."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.tasks.base import get_task

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, clean_attention="causal")
    dlm.decoding = dlm.decoding.replace(mode="verified", threshold=0.7)
    for name, layer in {**bench.methods(0.5, [0.9]), "1/step": bench.ONE_PER_STEP}.items():
        resolved = DecodingConfig.resolve(dlm.decoding, layer)
        assert resolved.mode == "block" and resolved.threshold == (None if name == "1/step" else 0.7), name
    assert DecodingConfig.resolve(dlm.decoding, bench.VERIFIED).mode == "verified"
    task = get_task("arithmetic", num_problems=2)
    rows = task.load_rows(None, "test", 2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for layer in (bench.methods(0.5)["reopen"], bench.VERIFIED):
        measured = bench.accuracy(dlm, task, rows, prompts, layer, max_new_tokens=8)
        assert len(measured["correct"]) == 2 and measured["passes_per_token"] > 0
