"""ARC-Challenge: loading rows in the hub layout, clear errors, prompts, generative grading, and log-likelihood
scoring of the choices (diffusion ELBO and AR parent) on a tiny model trained to pick planted answers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.evaluation.likelihood import ar_loglikelihood
from llm2diff.tasks.arc_challenge import ARCChallengeTask, default_render, extract_choice
from llm2diff.tasks.base import Grade, get_task
from llm2diff.training.layout import build_layout, pad_response_to_blocks
from llm2diff.training.objective import diffusion_loss

# Questions and choices in the tiny tokenizer's words (other words become <unk>), as in the hub layout.
ROWS = [
    {"id": "q1", "question": "tom has 3 apples . he eats 1 . how many now ?",
     "choices": {"text": ["2", "4", "3 apples", "more pears"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q2", "question": "ana buys books . she gives sam cards . what has ana ?",
     "choices": {"text": ["pears", "cookies", "the books", "cards", "apples"], "label": ["A", "B", "C", "D", "E"]},
     "answerKey": "C"},
    {"id": "q3", "question": "max finds cookies then loses them . how many has max ?",
     "choices": {"text": ["5 cookies", "the cookies", "cards", "0"], "label": ["1", "2", "3", "4"]},
     "answerKey": "4"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def arc_file(tmp_path):
    return _write_jsonl(tmp_path / "arc.jsonl", ROWS)


# -- loading --------------------------------------------------------------------------------------------------------
def test_load_rows_from_a_local_file(arc_file):
    task = get_task("arc_challenge")
    assert isinstance(task, ARCChallengeTask) and task.mode == "loglikelihood"
    rows = task.load_rows(str(arc_file), split="train")
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    assert rows[1]["choices"] == ROWS[1]["choices"] and rows[2]["answerKey"] == "4"
    assert [r["id"] for r in task.load_rows(str(arc_file), split="train", limit=2)] == ["q1", "q2"]
    assert [task.row_id(r, i) for i, r in enumerate(rows)] == ["q1", "q2", "q3"]


def test_load_rows_by_split_from_a_directory_and_without_ids(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    _write_jsonl(tmp_path / "test.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in ROWS[1:]])
    rows = ARCChallengeTask().load_rows(str(tmp_path), split="test")
    assert [r["question"] for r in rows] == [ROWS[1]["question"], ROWS[2]["question"]]
    assert [r["id"] for r in rows] == ["test-0", "test-1"]


def test_default_source_is_the_hub_challenge_set(monkeypatch):
    import datasets

    import llm2diff.sources as data

    seen = {}

    def fake_load(name, config, split):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(data, "load_hub_dataset", fake_load)
    assert len(ARCChallengeTask().load_rows(None, split="validation", limit=2)) == 2
    assert seen == {"name": "allenai/ai2_arc", "config": "ARC-Challenge", "split": "validation"}


@pytest.mark.parametrize("rows,message", [
    ([{k: v for k, v in ROWS[0].items() if k != "answerKey"}], "lacks ['answerKey']"),
    ([{"id": "x", "question": "q ?"}], "lacks ['choices', 'answerKey']"),
    ([{**ROWS[0], "answerKey": "F"}], "answerKey 'F' is not one of the choice labels"),
    ([{**ROWS[0], "choices": {"text": ["a", "b"], "label": ["A"]}}], "as many texts as labels"),
])
def test_bad_rows_fail_with_a_clear_message(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ARCChallengeTask().load_rows(str(path), split="train")


def test_empty_data_limit_and_mode_errors(tmp_path, arc_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="ARC-Challenge data .* is empty"):
        ARCChallengeTask().load_rows(str(empty), split="train")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="ARC-Challenge data .* is empty"):
        ARCChallengeTask().load_rows(str(tmp_path / "empty.json"), split="train")
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        ARCChallengeTask().load_rows(str(arc_file), split="train", limit=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ARCChallengeTask().load_rows(str(tmp_path / "missing.jsonl"), split="train")
    with pytest.raises(ValueError, match="unknown arc_challenge mode 'mc'"):
        ARCChallengeTask(mode="mc")


# -- prompts ----------------------------------------------------------------------------------------------------------
def test_question_lists_the_labelled_choices():
    ll, gen = ARCChallengeTask(), ARCChallengeTask(mode="generative")
    assert ll.question(ROWS[0]) == ("Question: tom has 3 apples . he eats 1 . how many now ?\n"
                                    "A. 2\nB. 4\nC. 3 apples\nD. more pears\nAnswer:")
    assert gen.question(ROWS[0]).endswith("D. more pears\nAnswer with the letter of the correct choice "
                                          "(A, B, C, D).\nAnswer:")
    assert "1. 5 cookies\n2. the cookies\n3. cards\n4. 0\nAnswer with the number" in gen.question(ROWS[2])
    assert gen.target(ROWS[1]) == "C" and ll.target(ROWS[1]) == "the books"  # what each mode's answer looks like
    assert ll.answer_label(ROWS[1]) == "C"
    # the plain prompt keeps the question's own frame (no doubled "Question:")
    plain = gen.plain_prompt(ROWS[1], shots=[ROWS[0]])
    assert plain.count("Question:") == 2 and plain.startswith(gen.question(ROWS[0]) + " A\n\n")
    assert plain.endswith(gen.question(ROWS[1]))


def test_default_render_uses_the_chat_template_or_plain_text():
    tok = make_tokenizer()
    dlm = adapt(make_model("qwen2"), tok, block_size=4)
    task = ARCChallengeTask()
    messages = task.messages(ROWS[0])
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert default_render(dlm)(messages) == tok(chat, add_special_tokens=False).input_ids
    dlm.config.use_chat_template = False
    assert default_render(dlm)(messages) == tok(task.question(ROWS[0])).input_ids


# -- generative grading -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion,row,prediction,correct", [
    ("The answer is A.", 0, "A", True),
    ("A", 0, "A", True),
    ("B", 0, "B", False),
    ("(C)", 1, "C", True),
    ("C. the books", 1, "C", True),
    ("**C**", 1, "C", True),
    ("A plant needs light, so the answer is (C)", 1, "C", True),
    ("Answer: 4", 2, "4", True),
    ("the answer is 4.", 2, "4", True),
    ("14 cookies or 4.5 cookies", 2, None, False),
    ("2", 2, "2", False),
    ("I do not know", 0, None, False),
    ("", 1, None, False),
    ("a cat", 0, None, False),  # the article is not the label
])
def test_generative_grading(completion, row, prediction, correct):
    grade = ARCChallengeTask(mode="generative").grade(completion, ROWS[row])
    assert grade == Grade(correct=correct, prediction=prediction)


def test_extract_choice_prefers_an_explicit_answer():
    assert extract_choice("B is wrong; the answer is D", list("ABCD")) == "D"
    assert extract_choice("B is wrong, D is right", list("ABCD")) == "B"
    assert extract_choice("anything", []) is None


# -- log-likelihood scoring ----------------------------------------------------------------------------------------
def _train(dlm, pairs, steps, lr=1e-2, copies=2):
    model, cfg, tok = dlm.model, dlm.config, dlm.tokenizer
    prompts = [p for p, _ in pairs] * copies
    responses = [pad_response_to_blocks(r, cfg.block_size, tok.eos_token_id) for _, r in pairs] * copies
    layout = build_layout(prompts, responses, cfg.block_size, pad_id=tok.pad_token_id, shift=cfg.shift)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss, _ = diffusion_loss(model, layout, cfg.mask_token_id, t_min=0.1, weighting="mean", generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_score_choices_picks_the_planted_answers():
    tok = make_tokenizer()
    dlm = adapt(make_model("llama", seed=2), tok, block_size=4)
    task = ARCChallengeTask(num_samples=8, seed=0)
    render = default_render(dlm)
    before = [task.score_choices(dlm, row, render=render) for row in ROWS]
    assert not all(g.correct for g in before)  # chance: the check below is not vacuous
    pairs = [(render(task.messages(row)), tok(" " + task.target(row), add_special_tokens=False).input_ids)
             for row in ROWS]
    _train(dlm, pairs, steps=60)
    for row in ROWS:
        grade = task.score_choices(dlm, row)
        assert grade.correct and grade.prediction == row["answerKey"], row["id"]
        assert grade.metrics == {"acc_norm": 1.0}, row["id"]
    # the seed is fixed per task: scoring again gives the same verdict
    assert task.score_choices(dlm, ROWS[1]) == task.score_choices(dlm, ROWS[1])
    with pytest.raises(ValueError, match="mode='loglikelihood'"):
        ARCChallengeTask(mode="generative").score_choices(dlm, ROWS[0])


def test_score_choices_with_the_ar_parent():
    from peft import LoraConfig

    tok = make_tokenizer()
    dlm = adapt(make_model("qwen2"), tok, block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    task = ARCChallengeTask()
    row = ROWS[1]
    context = default_render(dlm)(task.messages(row))
    with dlm.ar_parent() as parent:
        scores = [ar_loglikelihood(parent, context, tok(" " + t, add_special_tokens=False).input_ids)
                  for t in row["choices"]["text"]]
    lengths = [len(tok(" " + t, add_special_tokens=False).input_ids) for t in row["choices"]["text"]]
    best = row["choices"]["label"][max(range(5), key=scores.__getitem__)]
    best_norm = row["choices"]["label"][max(range(5), key=lambda i: scores[i] / lengths[i])]
    grade = task.score_choices(dlm, row, use_parent=True)
    assert grade.prediction == best and grade.correct == (best == "C")
    assert grade.metrics == {"acc_norm": float(best_norm == "C")}
