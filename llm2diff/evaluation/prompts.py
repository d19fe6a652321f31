"""Prompts in a model's saved prompt format (chat template and system prompt as in training): `PromptRenderer`,
shared by `llm2diff eval`, the ARC solver and test-time training, and `plain_text` for models without a chat
template."""

from __future__ import annotations

from llm2diff.tasks.base import EvalTask


def plain_text(messages: list[dict[str, str]]) -> str:
    """Messages as plain text: the system turn and a newline, then each user turn followed by the assistant's reply
    after a space, demonstrations separated by blank lines."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    parts: list[str] = []
    for message in messages:
        if message["role"] == "user":
            parts.append(message["content"])
        elif message["role"] == "assistant" and parts:
            parts[-1] = f"{parts[-1]} {message['content']}"
    text = "\n\n".join(parts)
    return f"{system[0]}\n{text}" if system else text


class PromptRenderer:
    """Prompts -> token ids, in the model's saved prompt format (chat template and system prompt as in training)."""

    def __init__(self, dlm):
        self.tokenizer = dlm.tokenizer
        self.config = dlm.config

    @property
    def chat(self) -> bool:
        return bool(self.config.use_chat_template and self.tokenizer.chat_template is not None)

    def render_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages (ending with a user turn) -> ids with the generation prompt."""
        tok, cfg = self.tokenizer, self.config
        if cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        if self.chat:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False).input_ids)
        return list(tok(plain_text(messages)).input_ids)

    def __call__(self, task: EvalTask, row: dict, shots: list[dict], question: str | None = None) -> list[int]:
        """The prompt of one row (`question` replaces the row's question text, e.g. for an augmented ARC task)."""
        if self.chat:
            messages = task.messages(row, shots)
            if question is not None:
                messages[-1] = {"role": "user", "content": question}
            return self.render_messages(messages)
        text = task.plain_prompt(row, shots, self.config.prompt_template)
        if question is not None:
            text = text[: len(text) - len(self.config.prompt_template.format(question=task.question(row)))]
            text += self.config.prompt_template.format(question=question)
        if self.config.system_prompt:
            text = f"{self.config.system_prompt}\n{text}"
        return list(self.tokenizer(text).input_ids)
