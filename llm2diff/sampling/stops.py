"""Where a row of generated text stops: the one rule every decoder and the AR parent's `generate` share.

    rule = StopRule(dlm.eos_token_ids, ["\\n\\n"], dlm.tokenizer)
    n = rule.first_stop(prompt_row, new_tokens)   # keep new_tokens[:n]; None: no stop yet

A row stops after its first end-of-sequence token, or after the token that completes a stop string. Stop strings
are matched by transformers' own `StopStringCriteria` on the prompt followed by the new tokens, exactly as
`generate(stop_strings=..., tokenizer=...)` matches them, so the block sampler, verified decoding, lossless mode and
the AR parent stop at the same token. A tokenizer that `StopStringCriteria` cannot read (it maps every vocabulary
entry to text; word-level tokenizers defeat it, and `generate` with it) falls back on the decoded new tokens: the
row stops at the first token after which they contain a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class StopRule:
    """End-of-sequence ids and stop strings of one decoding, and where they stop a row."""

    def __init__(self, eos_token_ids: Iterable[int], stop_strings: Sequence[str] | str | None, tokenizer) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.eos = {int(i) for i in eos_token_ids}
        self.strings = tuple(s for s in stop_strings or () if s)
        self.tokenizer, self.criteria = tokenizer, None
        if self.strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer that decodes the tokens")
        if self.strings:
            from transformers import StopStringCriteria

            try:
                self.criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(self.strings))
            except ValueError:  # a tokenizer it cannot read: decode instead
                self.criteria = None

    def first_stop(self, context: torch.Tensor | None, new: Sequence[int], start: int = 0) -> int | None:
        """Smallest n > `start` such that the row stops after `new[:n]`, or None. `context`: the row's prompt (and any
        given response prefix) as a 1-D tensor, padding included; `start`: tokens already known not to stop it."""
        new = [int(t) for t in new]
        eos_at = next((n for n in range(start + 1, len(new) + 1) if new[n - 1] in self.eos), None)
        end = self.first_string_end(context, new[: eos_at or len(new)], start)
        return end if end is not None else eos_at

    def first_string_end(self, context: torch.Tensor | None, new: list[int], start: int = 0) -> int | None:
        """Smallest n > `start` such that `new[:n]` completes a stop string, or None."""
        if not self.strings or len(new) <= start:
            return None
        if self.criteria is None:
            if not any(s in self.tokenizer.decode(new, skip_special_tokens=False) for s in self.strings):
                return None  # one decode rules out the common case
            return next((n for n in range(start + 1, len(new) + 1) if self._decoded_holds(new[:n])), None)
        device = context.device if context is not None else "cpu"
        head = context.reshape(-1).long() if context is not None else torch.empty(0, dtype=torch.long, device=device)
        ids = torch.cat([head, torch.tensor(new, dtype=torch.long, device=device)])
        for n in range(start + 1, len(new) + 1):
            if bool(self.criteria(ids[None, : len(head) + n], None)[0]):
                return n
        return None

    def _decoded_holds(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return any(s in text for s in self.strings)

    def stopping_criteria(self, prompt_width: int):
        """A `StoppingCriteriaList` for the AR parent's `generate` that ends a row where this rule does (its stop
        strings; `generate` ends rows at end-of-sequence itself). `prompt_width`: the padded prompts' width."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        rule = self

        class StopOnRule(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
                if rule.criteria is not None:
                    return rule.criteria(input_ids, scores)
                done = [rule._decoded_holds(row) for row in input_ids[:, prompt_width:].tolist()]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([StopOnRule()]) if self.strings else StoppingCriteriaList()


def cut_text_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `stop_strings` (the answer without its stop,
    as lm-evaluation-harness expects it)."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]
