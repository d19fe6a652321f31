"""`llm2diff chat`: replies are `generate` on the rendered history, /reset clears it, the oldest exchanges give way
to fit the model, the plain prompt_template path, streaming block by block, commands and the end of the input."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_model, make_tokenizer
from helpers_tokenizer import make_chat_tokenizer

from llm2diff import adapt
from llm2diff.chat import HELP, BlockPrinter, ChatSession, run_chat
from llm2diff.cli import main

NEW = 8  # two blocks of 4
FIRST, SECOND = "tom has 5 apples", "how many pears does ana have"
BANNER = "llm2diff chat (block size 4): /help for commands, /exit to quit\n"


@pytest.fixture
def dlm():
    return adapt(make_model("qwen3"), make_tokenizer(), block_size=4)


@pytest.fixture
def calls(dlm, monkeypatch):
    """Every `dlm.generate` call of the session: (prompt ids, output)."""
    seen = []
    original = dlm.generate

    def spy(input_ids, *args, **kwargs):
        out = original(input_ids, *args, **kwargs)
        seen.append((input_ids[0].tolist(), out))
        return out

    monkeypatch.setattr(dlm, "generate", spy)
    return seen


def chat_ids(dlm, messages) -> list[int]:
    text = dlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dlm.tokenizer(text, add_special_tokens=False).input_ids


def reply_of(dlm, ids: list[int]) -> str:
    """What the model answers to `ids`, generated here directly."""
    out = dlm.generate(torch.tensor([ids]), max_new_tokens=NEW, seed=0)
    new = out.sequences[0, len(ids): len(ids) + int(out.num_new_tokens[0])]
    return dlm.tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(dlm, script: str, **session_args) -> str:
    output = io.StringIO()
    assert run_chat(dlm, io.StringIO(script), output, max_new_tokens=NEW, sampling={"seed": 0}, **session_args) == 0
    return output.getvalue()


def test_replies_are_generate_on_the_history_and_reset_clears_it(dlm, calls):
    shown = chat(dlm, f"{FIRST}\n/reset\n{SECOND}\n/exit\nnever read\n")
    first_ids, second_ids = chat_ids(dlm, [{"role": "user", "content": FIRST}]), chat_ids(dlm, [{"role": "user", "content": SECOND}])
    assert [ids for ids, _ in calls] == [first_ids, second_ids]  # after /reset only the second message
    first, second = reply_of(dlm, first_ids), reply_of(dlm, second_ids)
    assert first and second
    assert shown == (f"{BANNER}you> bot> {first}\nyou> [conversation cleared]\nyou> bot> {second}\nyou> ")


def test_history_carries_over_and_the_end_of_input_quits(dlm, calls):
    shown = chat(dlm, f"{FIRST}\n{SECOND}\n")
    first = reply_of(dlm, calls[0][0])
    history = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first},
               {"role": "user", "content": SECOND}]
    assert calls[1][0] == chat_ids(dlm, history)
    second = reply_of(dlm, calls[1][0])
    assert shown == f"{BANNER}you> bot> {first}\nyou> bot> {second}\nyou> \n"


def test_system_prompt_comes_first(dlm, calls):
    session = ChatSession(dlm, max_new_tokens=NEW, system_prompt="answer with a number", output=io.StringIO())
    session.reply(FIRST)
    assert calls[0][0] == chat_ids(dlm, [{"role": "system", "content": "answer with a number"},
                                         {"role": "user", "content": FIRST}])


def test_oldest_exchange_dropped_to_fit_the_model(dlm, calls):
    output = io.StringIO()
    session = ChatSession(dlm, max_new_tokens=NEW, sampling={"seed": 0}, output=output)
    first = session.reply(FIRST)
    full = chat_ids(dlm, [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first},
                          {"role": "user", "content": SECOND}])
    dlm.model.config.max_position_embeddings = len(full) + NEW - 1  # one token short of the whole history
    second = session.reply(SECOND)
    assert calls[1][0] == chat_ids(dlm, [{"role": "user", "content": SECOND}])
    assert session.history == [{"role": "user", "content": SECOND}, {"role": "assistant", "content": second}]
    assert output.getvalue() == (f"bot> {first}\n[dropped the 1 oldest exchange to fit the model's maximum length "
                                 f"{len(full) + NEW - 1}]\nbot> {second}\n")


def test_a_message_too_long_for_the_model_is_refused_and_forgotten(dlm, calls):
    dlm.model.config.max_position_embeddings = 20
    shown = chat(dlm, f"{FIRST} {FIRST} {FIRST}\n/exit\n")
    assert calls == []
    long_ids = chat_ids(dlm, [{"role": "user", "content": f"{FIRST} {FIRST} {FIRST}"}])
    assert shown == (f"{BANNER}you> [error: the message is too long: {len(long_ids)} prompt tokens + max_new_tokens "
                     f"{NEW} exceed the model's maximum length 20; send a shorter message or lower "
                     f"--max-new-tokens]\nyou> ")


def test_plain_prompt_template_turn_by_turn(dlm, calls):
    dlm.config.use_chat_template = False
    dlm.config.prompt_template = "question {question} answer "
    session = ChatSession(dlm, max_new_tokens=NEW, system_prompt="the answer is a number", output=io.StringIO())
    first = session.reply(FIRST)
    session.reply(SECOND)
    transcript = f"the answer is a number\nquestion {FIRST} answer {first}\nquestion {SECOND} answer "
    assert calls[1][0] == dlm.tokenizer(transcript, add_special_tokens=False).input_ids


def test_no_stream_prints_the_same_replies(dlm):
    script = f"{FIRST}\n{SECOND}\n/exit\n"
    assert chat(dlm, script, stream=False) == chat(dlm, script)


def test_help_and_unknown_commands(dlm, calls):
    shown = chat(dlm, "/help\n/frobnicate\n\n/quit\n")
    assert calls == []
    assert shown == f"{BANNER}you> {HELP}\nyou> unknown command /frobnicate; /help lists the commands\nyou> you> "


def test_block_printer_writes_each_block_and_holds_back_what_may_change():
    tok = make_chat_tokenizer()
    stream = io.StringIO()
    printer = BlockPrinter(tok, stream)
    prompt = tok("Question: hi", add_special_tokens=False).input_ids
    ids = tok(" Paris é!  ", add_special_tokens=False).input_ids
    split = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))  # inside "é"
    printer.put(torch.tensor([prompt]))
    assert stream.getvalue() == ""  # the prompt is not printed
    printer.put(torch.tensor([ids[:split]]))
    assert stream.getvalue() == "Paris"  # the leading space dropped, the half character held back
    printer.put(torch.tensor([ids[split:] + [tok.eos_token_id]]))
    assert stream.getvalue() == "Paris é!"  # trailing spaces held back, end-of-sequence not printed
    printer.end()
    assert stream.getvalue() == tok.decode(ids, skip_special_tokens=True).strip() + "\n"


def test_chat_streams_block_by_block(dlm):
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    session = ChatSession(dlm, max_new_tokens=NEW, sampling={"seed": 0}, output=Recorder())
    answer = session.reply(FIRST)
    assert writes[0] == "bot> " and writes[-1] == "\n"
    assert "".join(writes[1:-1]) == answer
    assert len([w for w in writes[1:-1] if w]) == 2  # one piece per block of 4


def test_cli_chat_reads_stdin_until_its_end(dlm, tmp_path, monkeypatch, capsys):
    dlm.save_pretrained(tmp_path / "dlm")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{FIRST}\n"))
    assert main(["chat", "--model", str(tmp_path / "dlm"), "--max-new-tokens", str(NEW), "--seed", "0"]) == 0
    first = reply_of(dlm, chat_ids(dlm, [{"role": "user", "content": FIRST}]))
    assert capsys.readouterr().out == f"{BANNER}you> bot> {first}\nyou> \n"
