"""Solving ARC rows: plain voting through the solver equals today's evaluation; search + product-of-experts scoring
run end to end inside `llm2diff eval` (per-row records written as they finish, resumable, the solver settings part
of what a resume must match); the AR parent refuses test-time training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHATML, SPECIALS, make_model

from llm2diff import adapt
from llm2diff.arc.solve import ARCSolverArguments, solve_row, views
from llm2diff.evaluation.runner import PromptRenderer
from llm2diff.sampling.config import DecodingConfig
from llm2diff.tasks.arc_agi import ARCAGITask

TASK = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]},
                  {"input": [[5, 6], [7, 8]], "output": [[8, 7], [6, 5]]}],
        "test": [{"input": [[1, 1], [2, 2]], "output": [[2, 2], [1, 1]]}]}


def grid_tokenizer():
    """A tiny tokenizer that writes grids as ARC prompts do: one token per digit and one for the newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("Input:", "Output:")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ("<unk>",) + tuple(str(d) for d in range(10)) + ("\n",) + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def grid_model(arch: str, tok, scale: float = 2.0):
    """A tiny model whose head only gives the grid alphabet's tokens logits away from 0 (so grids come out)."""
    model = make_model(arch)
    alphabet = [tok.convert_tokens_to_ids(t) for t in [*map(str, range(10)), "\n"]] + [tok.eos_token_id]
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[alphabet] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= scale
    return model


def _row():
    return {"id": "t0", "train": TASK["train"], "test_input": TASK["test"][0]["input"],
            "test_output": TASK["test"][0]["output"], "test_index": 0}


def test_plain_voting_through_the_solver_equals_todays_evaluation():
    from llm2diff.evaluation.runner import EvalConfig, _generate_records, eval_decoding

    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen3", tok), tok, block_size=4)
    task, row = ARCAGITask(num_augmentations=4), _row()
    cfg = EvalConfig(model="x", task="arc_agi", max_new_tokens=12, batch_size=4)
    decoding = eval_decoding(cfg, dlm)
    render = PromptRenderer(dlm)
    today = _generate_records(task, dlm, [(0, row)], ["t0"], cfg, render, [], task.transforms(0), decoding, seed=0)[0]
    solver = ARCSolverArguments(arc_proposal_views=4)
    assert not solver.active and ARCSolverArguments(arc_use_solver=True).active  # (benchmarks/arc.py's voting)
    solved = solve_row(dlm, task, row, solver, render, 12, decoding, seed=0)
    assert solved["prediction"] == today["prediction"] and solved["correct"] == today["correct"]
    assert solved["nfe"] == today["nfe"]


def test_views_are_identity_first_then_symmetries_then_colours():
    first = views(10, seed=0)
    assert str(first[0]) == str(views(1, 0)[0]) and len(first) == 10
    assert len({str(v) for v in first}) == 10


@pytest.mark.parametrize("ar_parent", [False, True])
def test_search_and_poe_solve_a_row(ar_parent):
    from peft import LoraConfig

    tok = grid_tokenizer()
    dlm = adapt(grid_model("llama", tok), tok, block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    task, row = ARCAGITask(), _row()
    solver = ARCSolverArguments(arc_proposal="search", arc_proposal_views=2, arc_floor=0.001, arc_max_candidates=4,
                                arc_max_passes=200, arc_scoring="poe", arc_scoring_views=2, arc_poe_samples=2)
    solved = solve_row(dlm, task, row, solver, PromptRenderer(dlm), 12, ar_parent=ar_parent, seed=0)
    candidates = solved["candidates"]
    assert candidates, "the test needs candidates"
    scores = [c["score"] for c in candidates if c["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    assert solved["attempts"] == [c["grid"] for c in candidates[:2]]
    for c in candidates:
        assert all(len(r) == len(c["grid"][0]) for r in c["grid"])
        assert 1 <= c["sources"] <= 2
    m = solved["metrics"]
    assert m["proposal_passes"] > 0 and m["scoring_evaluations"] == min(len(candidates), 8) * 2
    assert solved["correct"] == (row["test_output"] in solved["attempts"])


def test_the_ar_parent_has_no_adapter_to_train():
    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen2", tok), tok, block_size=4)
    with pytest.raises(ValueError, match="test-time training trains the model's adapter"):
        solve_row(dlm, ARCAGITask(), _row(), ARCSolverArguments(arc_ttt_steps=2), PromptRenderer(dlm), 8,
                  ar_parent=True)


def test_bad_solver_settings_are_refused():
    with pytest.raises(ValueError, match="unknown arc_proposal 'serch'.*Did you mean 'search'"):
        ARCSolverArguments(arc_proposal="serch")
    with pytest.raises(ValueError, match="unknown arc_scoring 'pe'"):
        ARCSolverArguments(arc_scoring="pe")
    with pytest.raises(ValueError, match=r"floor must be in \(0, 1\]"):
        ARCSolverArguments(arc_floor=0)


def test_eval_solves_rows_writes_them_and_resumes_only_the_same_solver(tmp_path, capsys):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from llm2diff.cli import main

    tok = grid_tokenizer()
    grid_model("qwen3", tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    dlm = adapt(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tok, block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear"), base_model_name_or_path=str(tmp_path / "base"))
    dlm.save_pretrained(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b"):
        (tasks / f"{name}.json").write_text(json.dumps(TASK))
    out = tmp_path / "results"
    argv = ["eval", "--model", str(tmp_path / "model"), "--task", "arc_agi", "--source", str(tasks),
            "--split", "evaluation", "--max_new_tokens", "12", "--output_dir", str(out), "--arc_proposal", "search",
            "--arc_proposal_views", "2", "--arc_floor", "0.001", "--arc_max_candidates", "3", "--arc_scoring", "poe",
            "--arc_scoring_views", "2", "--arc_poe_samples", "1"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a_0", "b_0"]
    assert all("attempts" in r and r["metrics"]["proposal_passes"] > 0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arc_solver"]["arc_proposal"] == "search" and summary["num_examples"] == 2
    assert main(argv) == 0  # finished rows are read back, not solved again
    assert (out / "results.jsonl").read_text().count("\n") == 2
    capsys.readouterr()
    assert main([*argv[:-2], "--arc_poe_samples", "2"]) == 2
    assert "arc_poe_samples" in capsys.readouterr().err


def test_test_time_training_inside_the_solver_leaves_the_model_as_it_was():
    from peft import LoraConfig

    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen2", tok), tok, block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    before = {k: v.clone() for k, v in dlm.model.state_dict().items()}
    solver = ARCSolverArguments(arc_proposal_views=2, arc_ttt_steps=2, arc_ttt_learning_rate=0.01,
                                arc_ttt_batch_size=2)
    solved = solve_row(dlm, ARCAGITask(), _row(), solver, PromptRenderer(dlm), 12, seed=0,
                       decoding=DecodingConfig(max_new_tokens=12))
    assert solved["ttt"]["steps"] == 2 and solved["metrics"]["ttt_seconds"] > 0
    after = dlm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_every_eval_config_parses_and_the_arc_configs_solve_with_all_three_components():
    import dataclasses
    from pathlib import Path

    from llm2diff.evaluation.runner import EvalConfig
    from llm2diff.recipe import parse_recipe

    root = Path(__file__).resolve().parents[1]
    configs = sorted((root / "eval").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg, solver, _ = parse_recipe(["--config", str(path)], classes=(EvalConfig, ARCSolverArguments))
        if cfg.task == "arc_agi":
            assert (solver.arc_proposal, solver.arc_scoring) == ("search", "poe") and solver.arc_ttt_steps > 0, path
            assert "llm2diff eval --config" in path.read_text().split("\ntask:")[0], path  # the command it runs
    docs = (root / "docs" / "arc.md").read_text()
    missing = [f.name for f in dataclasses.fields(ARCSolverArguments) if f"`{f.name}`" not in docs]
    assert not missing, f"document these keys in docs/arc.md: {missing}"


def test_a_search_that_finds_nothing_falls_back_to_one_decode_per_view():
    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen3", tok), tok, block_size=4)
    task, row, render = ARCAGITask(), _row(), PromptRenderer(dlm)
    nothing = ARCSolverArguments(arc_proposal="search", arc_proposal_views=2, arc_floor=1.0, arc_max_passes=50)
    sampled = solve_row(dlm, task, row, ARCSolverArguments(arc_proposal_views=2, arc_use_solver=True), render, 12)
    solved = solve_row(dlm, task, row, nothing, render, 12)
    assert solved["metrics"]["search_fallback"] == 1.0 and sampled["metrics"]["search_fallback"] == 0.0
    assert solved["attempts"] == sampled["attempts"] and solved["attempts"]
    assert solved["nfe"] > sampled["nfe"]  # the search's passes are counted too


def test_both_proposers_together_are_the_union_of_search_and_samples_with_their_votes_added():
    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen3", tok), tok, block_size=4)
    task, row, render = ARCAGITask(), _row(), PromptRenderer(dlm)
    settings = dict(arc_proposal_views=2, arc_floor=0.001, arc_max_candidates=2, arc_max_passes=200, arc_use_solver=True)
    runs = {proposal: solve_row(dlm, task, row, ARCSolverArguments(arc_proposal=proposal, **settings), render, 12)
            for proposal in ("sample", "search", "both")}
    votes = {proposal: {json.dumps(c["grid"]): c["sources"] for c in run["candidates"]} for proposal, run in runs.items()}
    assert votes["sample"] and votes["search"], "the test needs candidates from both"
    union = {key: votes["sample"].get(key, 0) + votes["search"].get(key, 0) for key in {*votes["sample"], *votes["search"]}}
    assert votes["both"] == union
    best = {json.dumps(c["grid"]): c["logprob"] for c in runs["search"]["candidates"]}
    assert {json.dumps(c["grid"]): c["logprob"] for c in runs["both"]["candidates"] if c["logprob"] is not None} == best
    assert runs["both"]["nfe"] == runs["sample"]["nfe"] + runs["search"]["nfe"]
    assert runs["both"]["metrics"]["search_fallback"] == 0.0


def test_both_proposers_without_any_grid_above_the_floor_count_the_samples_once():
    tok = grid_tokenizer()
    dlm = adapt(grid_model("qwen3", tok), tok, block_size=4)
    task, row, render = ARCAGITask(), _row(), PromptRenderer(dlm)
    sampled = solve_row(dlm, task, row, ARCSolverArguments(arc_proposal_views=2, arc_use_solver=True), render, 12)
    both = solve_row(dlm, task, row, ARCSolverArguments(arc_proposal="both", arc_proposal_views=2, arc_floor=1.0,
                                                        arc_max_passes=50), render, 12)
    assert [(c["grid"], c["sources"]) for c in both["candidates"]] == \
        [(c["grid"], c["sources"]) for c in sampled["candidates"]]  # no fallback decode on top of the samples
    assert both["metrics"]["search_fallback"] == 0.0 and both["nfe"] > sampled["nfe"]
