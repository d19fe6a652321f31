"""Generate for a batch of prompts and cut each row where it stops: the one generation step behind every grader.

    batch = complete(dlm, prompts, decoding)                     # the diffusion model, as `decoding` says
    batch = complete(dlm, prompts, decoding, ar_parent=True)     # its AR parent (adapter off), same budget/stops
    for row in batch.rows:
        grade(row.text)                                          # row.tokens, row.passes too
    throughput.add(batch)

`llm2diff eval`, the training run's final evaluation, STaR sampling, PRM rollouts and lm-eval all generate through
`complete`, so they pad, stop, decode and count passes the same way: prompts are left-padded; a row's new tokens
end where its decoder stopped it (end-of-sequence kept; stop strings by `llm2diff.sampling.stops`, the rule the
decoders themselves use); `passes` are the forward passes that served the row (the AR parent: one per token).
The AR parent decodes greedily at temperature 0, and otherwise samples with the decoding's temperature, top-k,
top-p and seed (`generate(do_sample=True)`); its token budget and stop strings are the decoding's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Completion:
    """One row's answer: its new tokens up to the stop, their text (special tokens skipped), its forward passes."""

    tokens: list[int]
    text: str
    passes: int


@dataclass
class Completions:
    """A batch's rows, in prompt order, with the batch's forward passes (`nfe`; lossless: both models') and time."""

    rows: list[Completion]
    nfe: int
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)

    @property
    def passes(self) -> int:
        return sum(r.passes for r in self.rows)


@dataclass
class Throughput:
    """Generation cost summed over batches: tokens/s and forward passes per token (of each row, summed)."""

    seconds: float = 0.0
    new_tokens: int = 0
    row_forwards: int = 0
    sequences: int = 0
    nfe: int = field(default=0, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def nfe_per_token(self) -> float:
        return self.row_forwards / self.new_tokens if self.new_tokens else 0.0

    def add(self, seconds: float, tokens: int, forwards: int, sequences: int, nfe: int = 0) -> None:
        self.seconds += seconds
        self.new_tokens += tokens
        self.row_forwards += forwards
        self.sequences += sequences
        self.nfe += nfe

    def add_batch(self, batch: Completions) -> None:
        self.add(batch.seconds, batch.new_tokens, batch.passes, len(batch.rows), batch.nfe)

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "new_tokens": self.new_tokens, "row_forwards": self.row_forwards,
                "sequences": self.sequences, "tokens_per_second": round(self.tokens_per_second, 2),
                "nfe_per_token": round(self.nfe_per_token, 4)}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `(batch, max_len)` ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def complete(dlm, prompts: Sequence[Sequence[int]], decoding: Any = None, *, ar_parent: bool = False,
             response_prefix: torch.Tensor | None = None, **settings: Any) -> Completions:
    """Generate after each prompt (token lists) and cut each row where it stops.

    Args:
        dlm: a `DiffusionLM`.
        decoding: a resolved `DecodingConfig` (used exactly), or a mapping of settings layered over the model's
            saved decoding (`DiffusionLM.generate`'s rule), or None (the saved decoding).
        ar_parent: generate with the AR parent instead (adapter off), with the decoding's `max_new_tokens`,
            `stop_strings`, `temperature`, `top_k`, `top_p` and `seed`.
        response_prefix: `(batch, P)` response tokens to continue (the diffusion model); rows hold the new tokens
            after it.
        settings: single settings over `decoding` (e.g. `seed=3`).
    """
    from llm2diff.sampling.config import DecodingConfig

    tok = dlm.tokenizer
    ids, mask = left_pad(prompts, tok.pad_token_id)
    start = time.perf_counter()
    layer = decoding.to_dict() if isinstance(decoding, DecodingConfig) else decoding
    if ar_parent:  # the library defaults under the layer, not the diffusion model's saved decoding
        rows, nfe = _parent_rows(dlm, ids, mask, DecodingConfig.resolve(layer, settings))
    else:
        out = dlm.generate(ids, mask, decoding=layer, response_prefix=response_prefix, **settings)
        head = ids.shape[1] + (0 if response_prefix is None else response_prefix.shape[1])
        sequences, num_new = out.sequences.cpu(), out.num_new_tokens.cpu().tolist()
        passes = out.nfe_per_row.cpu().tolist()
        rows = [(sequences[k, head : head + num_new[k]].tolist(), passes[k]) for k in range(len(prompts))]
        nfe = int(out.nfe)
    seconds = time.perf_counter() - start
    return Completions([Completion(t, tok.decode(t, skip_special_tokens=True), p) for t, p in rows], nfe, seconds)


def _parent_rows(dlm, ids: torch.Tensor, mask: torch.Tensor, decoding) -> tuple[list[tuple[list[int], int]], int]:
    """The AR parent's rows (new tokens, passes) and the batch's passes under `decoding`."""
    from llm2diff.sampling.stops import StopRule

    stops = StopRule(dlm.eos_token_ids, decoding.stop_strings, dlm.tokenizer)
    kwargs: dict[str, Any] = {}
    if stops.strings:
        kwargs["stopping_criteria"] = stops.stopping_criteria(ids.shape[1])
    if decoding.temperature > 0:
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p)
    sequences = dlm.ar_generate(ids, mask, max_new_tokens=decoding.max_new_tokens, **kwargs).cpu()
    rows = []
    for prompt, row in zip(ids, sequences[:, ids.shape[1]:].tolist()):
        # `generate` pads a row after its stop; a row that did not stop runs to the end (padding ids it emitted
        # itself are its tokens, as in the decoders' rows)
        stop = stops.first_stop(prompt, row)
        tokens = row if stop is None else row[:stop]
        rows.append((tokens, len(tokens)))  # prefill + one pass per further token
    return rows, sequences.shape[1] - ids.shape[1]

