"""`llm2diff chat`: talk with a saved block-diffusion model in the terminal, each reply printed block by block.

    llm2diff chat --model outputs/quickstart [--max-new-tokens 256] [--system TEXT] [--no-stream] [sampler flags]

    you> Tom has 12 apples. He buys 5 more apples. How many apples does Tom have now?
    bot> Tom starts with 12 apples. ...

Commands: `/reset` forgets the conversation, `/help` lists the commands, `/exit` (or `/quit`, or the end of the
input: Ctrl-D) quits.

The conversation is kept as chat messages and rendered the way the model's training prompts were:

  - trained with a chat template (`use_chat_template` in `diffusion_config.json`): the tokenizer's chat template over
    the whole history, with the generation prompt added and the system prompt (the model's saved one, or `--system`)
    first;
  - trained without one: turn by turn with the model's `prompt_template`, each earlier reply followed by a newline,
    the system prompt on a line of its own first:

        {system}\\n{prompt_template(question=user 1)}{reply 1}\\n{prompt_template(question=user 2)}

A reply ends at end-of-sequence or after `max_new_tokens`. When the prompt plus `max_new_tokens` would exceed the
model's maximum length, the oldest exchanges (a message and its reply) are dropped first.

From Python:

    from llm2diff.chat import ChatSession, run_chat
    session = ChatSession(dlm, max_new_tokens=128, sampling={"tokens_per_step": 2})
    text = session.reply("Tom has 12 apples. ...")      # streamed to sys.stdout as it is decoded, and returned
    run_chat(dlm, input_stream=open("questions.txt"))   # one message a line
"""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO

import torch

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "
HELP = """commands:
  /reset   forget the conversation so far
  /help    this list
  /exit    quit (also /quit, or the end of the input: Ctrl-D)"""


class BlockPrinter:
    """A streamer for `DiffusionLM.generate` (transformers' `BaseStreamer` protocol: `put`, `end`) that writes the
    response to `stream` as each block is finished, exactly as `tokenizer.decode(new_tokens,
    skip_special_tokens=True).strip()` reads at the end, followed by a newline.

    The first `put` (the prompt) is skipped. Trailing whitespace and an incomplete character (a multi-byte
    character split across blocks decodes as U+FFFD) are held back until later text shows they belong.
    """

    def __init__(self, tokenizer, stream: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stream = sys.stdout if stream is None else stream
        self.tokens: list[int] = []
        self.text = ""  # what has been written so far
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError(f"BlockPrinter prints one response, got a batch of {value.shape[0]}")
            value = value[0]
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.tolist())
        self._write(self._decoded().rstrip("\ufffd").rstrip())

    def end(self) -> None:
        self._write(self._decoded())
        self.stream.write("\n")
        self.stream.flush()

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()

    def _write(self, text: str) -> None:
        # decoding more tokens only appends text; should a tokenizer ever rewrite the tail, what was printed stays
        if len(text) > len(self.text):
            self.stream.write(text[len(self.text):])
            self.stream.flush()
            self.text = text


class ChatSession:
    """A conversation with a `DiffusionLM`: the history as chat messages and the settings of every reply.

    Args:
        dlm: the model (`llm2diff.load(...)`).
        max_new_tokens: the longest reply, in tokens.
        system_prompt: the system prompt; None: the model's saved one; "": none.
        sampling: further keyword arguments of `dlm.generate` (commit rule, threshold, seed, `lossless`, ...).
        stream: print each reply as it is decoded: block by block, or with verified decoding what each verify
            pass adds (`lossless` replies are printed whole).
        output: where replies are printed (default sys.stdout).
    """

    def __init__(self, dlm, max_new_tokens: int = 256, system_prompt: str | None = None,
                 sampling: dict | None = None, stream: bool = True, output: TextIO | None = None):
        self.dlm = dlm
        self.max_new_tokens = max_new_tokens
        self.system_prompt = dlm.config.system_prompt if system_prompt is None else system_prompt
        self.sampling = dict(sampling or {})
        self.stream = stream and not self.sampling.get("lossless", False)
        self.output = sys.stdout if output is None else output
        self.use_chat_template = bool(dlm.config.use_chat_template)
        if self.use_chat_template and not getattr(dlm.tokenizer, "chat_template", None):
            raise ValueError("the model was trained with a chat template but its tokenizer has none; save the "
                             "tokenizer with its chat_template, or set use_chat_template to false in "
                             "diffusion_config.json to chat with the plain prompt_template")
        self.history: list[dict[str, str]] = []
        self.last_output = None  # the GenerateOutput (or LosslessOutput) of the last reply

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` (alternating user and assistant turns, ending with a user turn), rendered as
        the model's training prompts were (see the module docstring)."""
        from llm2diff.training.arguments import DataArguments
        from llm2diff.training.data import render_example

        tok = self.dlm.tokenizer
        if self.use_chat_template:
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            text = tok.apply_chat_template(system + messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False).input_ids)
        template = self.dlm.config.prompt_template
        turns = []
        for message in messages:
            if message["role"] != "user":
                turns.append(message["content"] + "\n")
                continue
            try:
                turns.append(template.format_map({"question": message["content"]}))
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"the model's prompt_template {template!r} cannot be filled with a chat message "
                                 f"({err!r}): chat fills only {{question}}") from err
        # a plain prompt string: render_example adds the system line, and bos where the tokenizer adds one
        plain = DataArguments(use_chat_template=False, system_prompt=self.system_prompt or None)
        return render_example({"prompt": "".join(turns), "completion": ""}, tok, plain)[0]

    def prompt_ids(self) -> list[int]:
        """The rendered history, its oldest exchanges dropped until prompt + max_new_tokens fit the model."""
        limit = getattr(self.dlm.model.config, "max_position_embeddings", None)
        dropped = 0
        while True:
            ids = self.render(self.history)
            if limit is None or len(ids) + self.max_new_tokens <= limit:
                break
            if len(self.history) <= 1:
                raise ValueError(f"the message is too long: {len(ids)} prompt tokens + max_new_tokens "
                                 f"{self.max_new_tokens} exceed the model's maximum length {limit}; send a shorter "
                                 f"message or lower --max-new-tokens")
            del self.history[:2]  # the oldest message and its reply
            dropped += 1
        if dropped:
            self.output.write(f"[dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the "
                              f"model's maximum length {limit}]\n")
        return ids

    def reply(self, text: str) -> str:
        """Add the user's message, generate the reply (printed to `output` after `bot> `), add it, return it.

        If generation fails or is interrupted, the message is taken out of the history again.
        """
        self.history.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
            printer = BlockPrinter(self.dlm.tokenizer, self.output) if self.stream else None
            self.output.write(BOT_PROMPT)
            self.output.flush()
            out = self.dlm.generate(torch.tensor([ids]), None, max_new_tokens=self.max_new_tokens,
                                    streamer=printer, **self.sampling)
        except BaseException:
            self.history.pop()
            raise
        new = out.sequences[0, len(ids): len(ids) + int(out.num_new_tokens[0])]
        answer = self.dlm.tokenizer.decode(new, skip_special_tokens=True).strip()
        if printer is None:
            self.output.write(answer + "\n")
            self.output.flush()
        self.history.append({"role": "assistant", "content": answer})
        self.last_output = out
        return answer


def run_chat(dlm, input_stream: TextIO | None = None, output_stream: TextIO | None = None, **session_args) -> int:
    """The chat loop: read a message a line from `input_stream`, print each reply to `output_stream`.

    `input_stream=None` reads the terminal with line editing (`input()`); `session_args` go to `ChatSession`.
    Returns 0 at `/exit` or the end of the input.
    """
    output = sys.stdout if output_stream is None else output_stream
    session = ChatSession(dlm, output=output, **session_args)
    output.write(f"llm2diff chat (block size {dlm.config.block_size}): /help for commands, /exit to quit\n")
    while True:
        try:
            line = _read_line(input_stream, output)
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits too
            line = None
        if line is None:  # end of the input
            output.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        command = text.split()[0].lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            output.write("[conversation cleared]\n")
        elif command == "/help":
            output.write(HELP + "\n")
        elif command.startswith("/") and command[1:].isalpha():
            output.write(f"unknown command {command}; /help lists the commands\n")
        else:
            try:
                session.reply(text)
            except KeyboardInterrupt:
                output.write("\n[interrupted; the message was dropped]\n")
            except ValueError as err:
                output.write(f"[error: {err}]\n")
    output.flush()
    return 0


def _read_line(input_stream: TextIO | None, output: TextIO) -> str | None:
    """One line after the `you> ` prompt, or None at the end of the input."""
    if input_stream is None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        try:
            return input(USER_PROMPT)
        except EOFError:
            return None
    output.write(USER_PROMPT)
    output.flush()
    return input_stream.readline() or None
