"""Tests for llm2diff.training.data: loading, format detection, rendering, tokenizing, splits.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_data.py -q
Uses a tiny in-memory ChatML tokenizer (tests/helpers_tokenizer.py); no network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from helpers_tokenizer import make_chat_tokenizer
from llm2diff.training.arguments import DataArguments
from llm2diff.training.data import (
    detect_format,
    load_raw_dataset,
    load_train_eval,
    looks_like_local_path,
    render_example,
    rendered_prompt_template,
    tokenize_dataset,
)

GSM8K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

QA_ROWS = [
    {"question": "Tom has 12 apples. He buys 5 more apples. How many apples does Tom have now?",
     "answer": "Tom starts with 12 apples.\n12 + 5 = 17\n#### 17"},
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
]
PC_ROWS = [{"prompt": r["question"], "completion": r["answer"]} for r in QA_ROWS]
MSG_ROWS = [
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 2?"},
        {"role": "assistant", "content": "2 * 5 = 10\n#### 10"},
    ]},
    {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return make_chat_tokenizer(chat_template=False)


def ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return ids(tokenizer, text)


def tokenized_rows(ds) -> list[tuple[list[int], list[int]]]:
    return list(zip(ds["prompt_ids"], ds["response_ids"]))


# ----------------------------------------------------------------------------- formats


def test_detect_format() -> None:
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["question", "answer", "steps", "final"]) == "question_answer"
    with pytest.raises(ValueError) as excinfo:
        detect_format(["text", "label"])
    message = str(excinfo.value)
    assert "['label', 'text']" in message
    assert "messages" in message and "prompt/completion" in message and "question/answer" in message


def test_question_answer_chat_path(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    args = DataArguments(dataset_name=str(path))
    train, evaluation = load_train_eval(args, tok)
    assert evaluation is None
    assert train.column_names == ["prompt_ids", "response_ids"]
    assert len(train) == 3
    for (prompt, response), row in zip(tokenized_rows(train), QA_ROWS):
        assert prompt == chat_prompt(tok, [{"role": "user", "content": row["question"]}])
        assert response[-1] == tok.eos_token_id
        assert response[:-1] == ids(tok, row["answer"])
        assert tok.decode(response[:-1]) == row["answer"]
        # prompt + response is exactly the template's rendering of the full chat (minus the trailing "\n").
        full = tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
            tokenize=False,
        )
        assert full.endswith("<|im_end|>\n")
        assert prompt + response == ids(tok, full[: -len("\n")])


def test_question_answer_plain_path(tmp_path: Path, plain_tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    args = DataArguments(dataset_name=str(path), use_chat_template=False)
    train, _ = load_train_eval(args, plain_tok)
    prompt, response = tokenized_rows(train)[0]
    assert prompt == ids(plain_tok, f"Question: {QA_ROWS[0]['question']}\nAnswer: ")
    assert response == ids(plain_tok, QA_ROWS[0]["answer"]) + [plain_tok.eos_token_id]
    assert plain_tok.decode(response, skip_special_tokens=True) == QA_ROWS[0]["answer"]


def test_prompt_template_can_use_other_columns(plain_tok) -> None:
    args = DataArguments(use_chat_template=False, prompt_template="[{topic}] Q: {question}\nA: ")
    example = {"question": "What is 2 + 3?", "answer": "5", "topic": "math"}
    prompt, _ = render_example(example, plain_tok, args)
    assert plain_tok.decode(prompt) == "[math] Q: What is 2 + 3?\nA: "
    with pytest.raises(ValueError, match=r"prompt_template .*\{missing\}|prompt_template .*missing"):
        render_example(example, plain_tok, DataArguments(use_chat_template=False, prompt_template="{missing}"))


def test_plain_path_keeps_bos_when_tokenizer_adds_it() -> None:
    bos_tok = make_chat_tokenizer(chat_template=False, add_bos=True)
    args = DataArguments(use_chat_template=False)
    prompt, response = render_example({"prompt": "Hello Tom", "completion": "Hi"}, bos_tok, args)
    assert prompt == [bos_tok.bos_token_id] + ids(bos_tok, "Hello Tom")
    assert bos_tok.bos_token_id not in response
    assert response == ids(bos_tok, "Hi") + [bos_tok.eos_token_id]


def test_prompt_completion_chat_and_plain(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", PC_ROWS)
    chat, _ = load_train_eval(DataArguments(dataset_name=str(path)), tok)
    plain, _ = load_train_eval(DataArguments(dataset_name=str(path), use_chat_template=False), tok)
    row = PC_ROWS[1]
    chat_prompt_ids, chat_response = tokenized_rows(chat)[1]
    plain_prompt_ids, plain_response = tokenized_rows(plain)[1]
    assert chat_prompt_ids == chat_prompt(tok, [{"role": "user", "content": row["prompt"]}])
    assert plain_prompt_ids == ids(tok, row["prompt"])
    assert chat_response == plain_response == ids(tok, row["completion"]) + [tok.eos_token_id]


@pytest.mark.parametrize("rows,column", [(QA_ROWS, "question"), (PC_ROWS, "prompt")])
def test_the_plain_path_records_the_template_eval_must_render_training_prompts_with(tmp_path, plain_tok, rows, column):
    """A plain-prompt model is evaluated with the template in its config: question/answer data used the recipe's,
    prompt/completion data its prompts as they are ("{question}"), so eval's prompt is the training prompt."""
    from types import SimpleNamespace

    from llm2diff.evaluation.prompts import PromptRenderer
    from llm2diff.tasks.base import EvalTask

    class Questions(EvalTask):
        def question(self, row):
            return row[column]

    args = DataArguments(dataset_name=str(write_jsonl(tmp_path / "rows.jsonl", rows)), use_chat_template=False,
                         system_prompt="Be brief.")
    template = rendered_prompt_template(args)
    assert template == ("{question}" if column == "prompt" else args.prompt_template)
    trained, _ = load_train_eval(args, plain_tok)
    config = SimpleNamespace(use_chat_template=False, system_prompt="Be brief.", prompt_template=template)
    render = PromptRenderer(SimpleNamespace(tokenizer=plain_tok, config=config))
    for row, (prompt_ids, _) in zip(rows, tokenized_rows(trained)):
        assert render(Questions(), row, []) == prompt_ids
    assert rendered_prompt_template(DataArguments(dataset_name="builtin:arc-agi-1", use_chat_template=False)) == \
        "{question}"
    assert rendered_prompt_template(DataArguments(dataset_name="builtin:arithmetic", use_chat_template=False)) == \
        args.prompt_template
    assert rendered_prompt_template(DataArguments(dataset_name=str(tmp_path / "rows.jsonl"))) == args.prompt_template


def test_conversational_prompt_completion(tok) -> None:
    example = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    prompt, response = render_example(example, tok, DataArguments())
    assert prompt == chat_prompt(tok, example["prompt"])
    assert response == ids(tok, "5") + [tok.eos_token_id]
    # A string completion with a conversational prompt is fine too.
    assert render_example({**example, "completion": "5"}, tok, DataArguments()) == (prompt, response)
    bad = {**example, "completion": [{"role": "user", "content": "5"}]}
    with pytest.raises(ValueError, match="exactly one assistant message"):
        render_example(bad, tok, DataArguments())


def test_messages_format(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", MSG_ROWS)
    train, _ = load_train_eval(DataArguments(dataset_name=str(path)), tok)
    for (prompt, response), row in zip(tokenized_rows(train), MSG_ROWS):
        messages = row["messages"]
        assert prompt == chat_prompt(tok, messages[:-1])
        assert tok.decode(response[:-1]) == messages[-1]["content"]
        assert response[-1] == tok.eos_token_id
        full = tok.apply_chat_template(messages, tokenize=False)
        assert prompt + response == ids(tok, full[: -len("\n")])


def test_system_prompt(tok, plain_tok) -> None:
    args = DataArguments(system_prompt="Be brief.")
    prompt, _ = render_example(QA_ROWS[2], tok, args)
    assert prompt == chat_prompt(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QA_ROWS[2]["question"]}]
    )
    # A conversation that already has a system message keeps it (no second system turn).
    prompt, _ = render_example(MSG_ROWS[0], tok, args)
    assert prompt == chat_prompt(tok, MSG_ROWS[0]["messages"][:-1])
    # Plain path: prepended with a newline.
    prompt, _ = render_example(QA_ROWS[2], plain_tok, DataArguments(use_chat_template=False, system_prompt="Be brief."))
    assert plain_tok.decode(prompt) == f"Be brief.\nQuestion: {QA_ROWS[2]['question']}\nAnswer: "


# ----------------------------------------------------------------------------- errors


def test_last_message_must_be_assistant(tok) -> None:
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                            {"role": "user", "content": "bye"}]}
    with pytest.raises(ValueError, match=r"last message must be the assistant's response.*'user'"):
        render_example(example, tok, DataArguments())


def test_error_names_example_index(tmp_path: Path, tok) -> None:
    rows = [MSG_ROWS[1], {"messages": [{"role": "user", "content": "no reply"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"Example 1 \(messages format\).*last message"):
        load_train_eval(DataArguments(dataset_name=str(path)), tok)


@pytest.mark.parametrize("example", [MSG_ROWS[1], QA_ROWS[0], PC_ROWS[0]])
def test_no_chat_template_error(example: dict[str, Any], plain_tok) -> None:
    with pytest.raises(ValueError) as excinfo:
        render_example(example, plain_tok, DataArguments(use_chat_template=True))
    message = str(excinfo.value)
    assert "no chat template" in message
    assert "use_chat_template: false" in message


def test_conversational_data_needs_chat_template_flag(tok) -> None:
    with pytest.raises(ValueError, match="use_chat_template: true"):
        render_example(MSG_ROWS[1], tok, DataArguments(use_chat_template=False))


def test_wrong_columns_error(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": 1}])
    with pytest.raises(ValueError, match=r"\['label', 'text'\].*accepted column sets"):
        load_train_eval(DataArguments(dataset_name=str(path)), tok)


@pytest.mark.parametrize("name", ["missing/train.jsonl", "./nope", "/definitely/not/here", "data.parquet"])
def test_missing_local_path_error(name: str, tok, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_raw_dataset(DataArguments(dataset_name=name), "train")
    message = str(excinfo.value)
    assert repr(name) in message
    assert ".jsonl" in message and ".parquet" in message and ".csv" in message


def test_local_path_detection(tmp_path: Path) -> None:
    assert not looks_like_local_path("openai/gsm8k")
    assert not looks_like_local_path("gsm8k")
    assert looks_like_local_path("data/train.jsonl")
    assert looks_like_local_path("./gsm8k")
    assert looks_like_local_path("~/data")
    assert looks_like_local_path("a/b/c")
    assert looks_like_local_path(str(tmp_path))


def test_dataset_name_required(tok) -> None:
    with pytest.raises(ValueError, match="dataset_name is not set"):
        load_train_eval(DataArguments(), tok)


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        DataArguments(eval_fraction=1.0)
    with pytest.raises(ValueError, match="only one"):
        DataArguments(eval_split="test", eval_fraction=0.1)
    with pytest.raises(ValueError, match="max_train_samples"):
        DataArguments(max_train_samples=0)


# ----------------------------------------------------------------------------- length filter


def test_length_filter_drops_and_warns(tmp_path: Path, tok, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    lengths = [len(p) + len(r) for p, r in (render_example(row, tok, DataArguments()) for row in QA_ROWS)]
    limit = sorted(lengths)[1]  # keeps the two shortest (lengths are distinct)
    assert len(set(lengths)) == 3
    with caplog.at_level(logging.WARNING, logger="llm2diff.training.data"):
        train, _ = load_train_eval(DataArguments(dataset_name=str(path)), tok, max_length=limit)
    assert len(train) == 2
    assert all(len(p) + len(r) <= limit for p, r in tokenized_rows(train))
    assert "Dropped 1 of 3 examples longer than max_length=" in caplog.text
    # An example exactly at max_length is kept.
    assert max(len(p) + len(r) for p, r in tokenized_rows(train)) == limit


def test_length_filter_all_dropped(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    shortest = min(len(p) + len(r) for p, r in (render_example(row, tok, DataArguments()) for row in QA_ROWS))
    with pytest.raises(ValueError) as excinfo:
        load_train_eval(DataArguments(dataset_name=str(path)), tok, max_length=shortest - 1)
    message = str(excinfo.value)
    assert f"All 3 examples are longer than max_length={shortest - 1}" in message
    assert f"shortest has {shortest} tokens" in message


# ----------------------------------------------------------------------------- splits and files


def _numbered_rows(n: int) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]


def test_eval_fraction_sizes_and_determinism(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", _numbered_rows(20))
    args = DataArguments(dataset_name=str(path), eval_fraction=0.25)
    train, evaluation = load_train_eval(args, tok)
    assert (len(train), len(evaluation)) == (15, 5)
    train2, evaluation2 = load_train_eval(args, tok)
    assert tokenized_rows(train) == tokenized_rows(train2)
    assert tokenized_rows(evaluation) == tokenized_rows(evaluation2)
    # Disjoint and together the whole data set.
    all_rows = {tuple(p) for p, _ in tokenized_rows(train)} | {tuple(p) for p, _ in tokenized_rows(evaluation)}
    assert len(all_rows) == 20
    _, other = load_train_eval(DataArguments(dataset_name=str(path), eval_fraction=0.25, builtin_seed=1), tok)
    assert tokenized_rows(other) != tokenized_rows(evaluation)
    # max_*_samples apply after the hold-out.
    capped_train, capped_eval = load_train_eval(
        DataArguments(dataset_name=str(path), eval_fraction=0.25, max_train_samples=4, max_eval_samples=2), tok
    )
    assert (len(capped_train), len(capped_eval)) == (4, 2)
    assert tokenized_rows(capped_eval) == tokenized_rows(evaluation)[:2]


def test_directory_with_split_files(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", _numbered_rows(6))
    write_jsonl(tmp_path / "d" / "test.jsonl", _numbered_rows(2))
    args = DataArguments(dataset_name=str(tmp_path / "d"), eval_split="test")
    train, evaluation = load_train_eval(args, tok)
    assert (len(train), len(evaluation)) == (6, 2)
    with pytest.raises(FileNotFoundError, match=r"No file for split 'validation'.*train.jsonl"):
        load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "d")), "validation")


def test_directory_of_unsplit_files_is_train(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "d" / "part-a.jsonl", _numbered_rows(3))
    write_jsonl(tmp_path / "d" / "sub" / "part-b.jsonl", _numbered_rows(2))
    (tmp_path / "d" / "LICENSE").write_text("not data")
    assert len(load_raw_dataset(DataArguments(dataset_name=str(tmp_path / "d")), "train")) == 5


def test_single_file_has_only_train_split(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(ValueError, match=r"only split is 'train'.*eval_fraction"):
        load_train_eval(DataArguments(dataset_name=str(path), eval_split="test"), tok)
    # eval_split may instead be the path of an eval file.
    eval_path = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:1])
    _, evaluation = load_train_eval(DataArguments(dataset_name=str(path), eval_split=str(eval_path)), tok)
    assert len(evaluation) == 1


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json"])
def test_other_local_formats(suffix: str, tmp_path: Path, tok) -> None:
    import datasets

    path = tmp_path / f"qa.{suffix}"
    ds = datasets.Dataset.from_list(QA_ROWS)
    if suffix == "parquet":
        ds.to_parquet(str(path))
    elif suffix == "csv":
        ds.to_csv(str(path), index=False)
    else:
        path.write_text(json.dumps(QA_ROWS))  # a JSON array
    train, _ = load_train_eval(DataArguments(dataset_name=str(path)), tok)
    assert len(train) == 3
    assert tok.decode(train[0]["response_ids"][:-1]) == QA_ROWS[0]["answer"]


def test_gsm8k_real_file(tok) -> None:
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not present")
    args = DataArguments(dataset_name=str(GSM8K), max_train_samples=5)
    train, evaluation = load_train_eval(args, tok)
    assert evaluation is None and len(train) == 5
    first = json.loads(GSM8K.open().readline())
    prompt, response = train[0]["prompt_ids"], train[0]["response_ids"]
    assert prompt == chat_prompt(tok, [{"role": "user", "content": first["question"]}])
    assert tok.decode(response[:-1]) == first["answer"]
    assert response[-1] == tok.eos_token_id


# ----------------------------------------------------------------------------- built-in task


def test_builtin_arithmetic(tok) -> None:
    pytest.importorskip("llm2diff.tasks.arithmetic")
    args = DataArguments(dataset_name="builtin:arithmetic", builtin_num_train=30, builtin_num_eval=7)
    train, evaluation = load_train_eval(args, tok)
    assert (len(train), len(evaluation)) == (30, 7)
    again, _ = load_train_eval(args, tok)
    assert tokenized_rows(again) == tokenized_rows(train)
    response = tok.decode(train[0]["response_ids"][:-1])
    assert "####" in response
    train_prompts = {tuple(p) for p, _ in tokenized_rows(train)}
    assert not train_prompts & {tuple(p) for p, _ in tokenized_rows(evaluation)}  # disjoint splits
    other, _ = load_train_eval(DataArguments(**{**args.__dict__, "builtin_seed": 1}), tok)
    assert tokenized_rows(other) != tokenized_rows(train)


def test_builtin_arithmetic_options(tok) -> None:
    pytest.importorskip("llm2diff.tasks.arithmetic")
    args = DataArguments(dataset_name="builtin:arithmetic", builtin_num_train=20, builtin_num_eval=0,
                         builtin_min_steps=3, builtin_max_steps=3, builtin_operations="*",
                         builtin_max_operand=3, use_chat_template=False)
    raw = load_raw_dataset(args, "train")
    assert len(raw) == 20 and all(len(steps) == 3 for steps in raw["steps"])
    assert all(" * " in answer for answer in raw["answer"])
    train, evaluation = load_train_eval(args, tok)
    assert evaluation is None and len(train) == 20
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        load_raw_dataset(DataArguments(dataset_name="builtin:nope"), "train")


# ----------------------------------------------------------------------------- real tokenizer


def test_smollm2_converted_tokenizer_if_cached() -> None:
    """With the real SmolLM2 ChatML tokenizer, prompt + response equals the template rendering."""
    from llm2diff.models.builtin import converted_model_dir, is_converted

    path = converted_model_dir("smollm2-135m-instruct")
    if not is_converted(path):
        pytest.skip("smollm2-135m-instruct not converted yet (run resolve_model_path once)")
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(path)
    row = QA_ROWS[0]
    prompt, response = render_example(row, real, DataArguments(system_prompt="You are a math tutor."))
    messages = [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]}]
    full = real.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert prompt + response == ids(real, full[:-1])
    assert response[-1] == real.convert_tokens_to_ids("<|im_end|>")


def test_tokenize_dataset_in_memory(tok) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{**row, "extra": i} for i, row in enumerate(QA_ROWS)])
    out = tokenize_dataset(ds, tok, DataArguments())
    assert out.column_names == ["prompt_ids", "response_ids"]
    assert tokenized_rows(out) == [render_example(row, tok, DataArguments()) for row in QA_ROWS]
    with pytest.raises(ValueError, match="no rows"):
        tokenize_dataset(ds.select([]), tok, DataArguments())


QWEN3_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)


def test_empty_think_block_of_the_generation_prompt_belongs_to_the_prompt() -> None:
    tok = make_chat_tokenizer()
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    args = DataArguments()
    prompt_ids, response_ids = render_example(QA_ROWS[0], tok, args)
    prompt_text = tok.decode(prompt_ids)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<think>" not in tok.decode(response_ids)
    assert tok.decode(response_ids) == QA_ROWS[0]["answer"] + "<|im_end|>"


def test_only_the_last_assistant_turn_is_the_response() -> None:
    tok = make_chat_tokenizer()
    prompt_ids, response_ids = render_example(MSG_ROWS[0], tok, DataArguments())
    prompt_text = tok.decode(prompt_ids)
    assert "<|im_start|>assistant\n5<|im_end|>" in prompt_text  # the earlier assistant turn is context
    assert tok.decode(response_ids) == "2 * 5 = 10\n#### 10<|im_end|>"
