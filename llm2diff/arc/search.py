"""Candidate search with a probability floor: every output grid the model gives at least `floor` probability, best
first, instead of one sample per augmented view.

    from llm2diff.arc.search import SearchSettings, search
    result = search(dlm, prompt_ids, SearchSettings(floor=0.05, max_candidates=8))             # the diffusion model
    result = search(dlm, prompt_ids, SearchSettings(floor=0.05), use_parent=True)             # its AR parent
    result.candidates[0].grid, result.candidates[0].logprob, result.passes

A causal stream (the AR parent, the AR twin: block size 1) is searched depth first over tokens: the most likely
next token first, every token whose probability keeps the path's cumulative probability at or above `floor`, a
prefix abandoned as soon as it falls below (the ARChitects' search for ARC). The KV cache holds the current path:
going down appends one token's keys/values, backing out crops them, so branches share their prefix.

A block-diffusion model is searched the same way one denoising decision at a time. Within a block, each pass
predicts every masked position; positions the model is sure of (probability >= `threshold`) are committed together
as the threshold rule would, and the most confident of the rest is branched over: each of its tokens whose
probability keeps the path at or above the floor is tried in turn, the most likely first. A finished block is
committed to the cache (its clean pass) and the search goes on with the next one; backing out of it crops it off
again (`BlockContext.pop`). A path's probability is the product of the probabilities its tokens had when
committed: for a causal stream the exact probability of the sequence, for a diffusion model the probability of
that decoding path (rank the results with product-of-experts scoring, `llm2diff.arc.scoring`, for a likelihood).
Alternatives of tokens committed together above the threshold are not explored (each has probability at most
1 - threshold); `threshold=None` branches one position per pass everywhere.

Only the grid alphabet is ever proposed: the ten digits, the newline between rows and end-of-sequence (other
tokens' probability is dropped, not redistributed, so the floor stays a bound on the model's own probability).
With `grammar` (default) a path must also stay a rectangular grid of at most `max_side` x `max_side` cells: no
empty row, every row as long as the first, end-of-sequence only after a whole row. So the output's size (row
length, then number of rows) is searched like its cells. Bounded by `max_candidates` (the search stops when that
many grids are found), `max_passes` (forward passes) and `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from llm2diff.sampling.block_cache import BlockContext
from llm2diff.tasks.arc_agi import Grid, text_to_grid


@dataclass
class SearchSettings:
    """The search's floor and bounds (see the module docstring)."""

    floor: float = 0.05
    max_candidates: int = 8
    max_passes: int = 4000
    max_new_tokens: int = 931  # a 30 x 30 grid: 30 rows of 30 digits, 29 newlines, end-of-sequence
    threshold: float | None = 0.9
    grammar: bool = True
    max_side: int = 30

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1] (a probability), got {self.floor}")
        for name in ("max_candidates", "max_passes", "max_new_tokens", "max_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or None, got {self.threshold}")


@dataclass
class Candidate:
    """One grid the search found: its tokens (end-of-sequence excluded), text, grid (None if it does not parse)
    and the log-probability of the path that produced it."""

    tokens: list[int]
    text: str
    grid: Grid | None
    logprob: float


@dataclass
class SearchResult:
    candidates: list[Candidate]  # best first
    passes: int  # forward passes of the model (prefill included)
    exhausted: bool  # True when the search saw every path above the floor (not stopped by a bound)
    stopped_by: str | None = None  # "max_candidates", "max_passes" or None


@dataclass
class GridAlphabet:
    """Token ids of the grid alphabet: `digits[d]` writes digit d, `newline` ends a row, `eos` ends the grid."""

    digits: list[int]
    newline: int
    eos: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer, eos_ids) -> GridAlphabet:
        def single(text: str) -> int:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"the tokenizer writes {text!r} as {len(ids)} tokens {ids}; the grid search needs "
                                 "one token per digit and for the newline (true of the Llama, SmolLM2 and Qwen "
                                 "tokenizers)")
            return ids[0]

        if not eos_ids:
            raise ValueError("the grid search needs an end-of-sequence token to end a grid")
        return cls([single(str(d)) for d in range(10)], single("\n"), tuple(sorted(set(eos_ids))))

    @property
    def ids(self) -> list[int]:
        return [*self.digits, self.newline, *self.eos]


@dataclass
class _Shape:
    """The grammar state of a prefix: cells in the current row, finished rows, the first row's length."""

    column: int = 0
    rows: int = 0
    width: int | None = None
    ended: bool = False

    def after(self, kind: str, max_side: int) -> _Shape | None:
        """The state after a digit / newline / eos, or None when the grid grammar forbids it."""
        if self.ended:
            return None
        if kind == "digit":
            limit = self.width if self.width is not None else max_side
            return None if self.column >= limit else _Shape(self.column + 1, self.rows, self.width)
        if self.column == 0 or (self.width is not None and self.column != self.width):
            return None  # an empty row, or a row of another length
        if kind == "newline":
            return None if self.rows + 1 >= max_side else _Shape(0, self.rows + 1, self.column)
        return _Shape(self.column, self.rows + 1, self.column, ended=True)


@dataclass
class _Search:
    ctx: BlockContext
    alphabet: GridAlphabet
    settings: SearchSettings
    block_size: int
    mask_token_id: int
    shift: bool
    found: list[Candidate] = field(default_factory=list)
    stopped_by: str | None = None

    def __post_init__(self) -> None:
        self.log_floor = math.log(self.settings.floor)
        self.kind = {token: "digit" for token in self.alphabet.digits}
        self.kind[self.alphabet.newline] = "newline"
        self.kind.update({token: "eos" for token in self.alphabet.eos})
        self.allowed = torch.tensor(self.alphabet.ids)
        self.chars = {token: str(d) for d, token in enumerate(self.alphabet.digits)}
        self.chars[self.alphabet.newline] = "\n"

    # -- bounds ----------------------------------------------------------------------------------------------------
    def stop(self) -> bool:
        if self.stopped_by is None:
            if len(self.found) >= self.settings.max_candidates:
                self.stopped_by = "max_candidates"
            elif self.ctx.nfe >= self.settings.max_passes:
                self.stopped_by = "max_passes"
        return self.stopped_by is not None

    # -- the grammar over a block's tokens ---------------------------------------------------------------------------
    def _walk(self, shape: _Shape, tokens: list[int]) -> _Shape | None:
        """The grammar state after `tokens` (None if forbidden); tokens after an end-of-sequence are not read."""
        for token in tokens:
            if shape.ended:
                break
            shape = shape.after(self.kind[token], self.settings.max_side) if self.settings.grammar else \
                _Shape(ended=self.kind[token] == "eos")
            if shape is None:
                return None
        return shape

    # -- the probabilities of one pass -------------------------------------------------------------------------------
    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """`(B, A)` log-probabilities of the alphabet's tokens (the full softmax, other tokens' mass dropped)."""
        return logits.float().log_softmax(-1)[..., self.allowed.to(logits.device)]

    def _block_logprobs(self, canvas: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
        if self.shift and self.ctx.use_cache and not bool(todo[1:].any()):  # only the first position: no pass
            return self._logprobs(self.ctx.first_position_logits()[0])[None].expand(self.block_size, -1)
        return self._logprobs(self.ctx.block_logits(canvas[None])[0])

    # -- depth first -----------------------------------------------------------------------------------------------
    def blocks(self, prefix: list[int], logprob: float, shape: _Shape, length: int) -> None:
        """Search every continuation of the committed `prefix` from a fresh block of `length` positions."""
        if self.stop():
            return
        canvas = torch.full((self.block_size,), self.mask_token_id, dtype=torch.long,
                            device=self.ctx.key_valid.device)
        todo = torch.arange(self.block_size, device=canvas.device) < length
        self.within(prefix, canvas, todo, logprob, shape, length)

    def within(self, prefix, canvas, todo, logprob, shape, length) -> None:
        """Search the open block from `canvas` (the mask id where undecided; `todo` the undecided positions)."""
        if self.stop():
            return
        if not bool(todo.any()):
            self.finish_block(prefix, canvas[:length].tolist(), logprob, shape)
            return
        logp = self._block_logprobs(canvas, todo)
        best, choice = logp.max(-1)
        best = best.masked_fill(~todo, float("-inf"))
        branch = int(best.argmax())  # the position the threshold rule would commit first
        sure = torch.zeros_like(todo)
        if self.settings.threshold is not None and self.block_size > 1:
            sure = todo & (best >= math.log(self.settings.threshold))
            sure[branch] = False
        canvas = canvas.clone()
        canvas[sure] = self.alphabet_ids(choice[sure])
        logprob += float(best[sure].sum())
        todo = todo & ~sure
        todo[branch] = False
        for value, index in zip(*logp[branch].sort(descending=True)):
            if logprob + float(value) < self.log_floor or self.stop():
                break
            canvas[branch] = self.allowed[index]
            decided = canvas[:length].tolist()  # the grammar reads the block's decided tokens from its start
            known = decided[: next((i for i, t in enumerate(decided) if t == self.mask_token_id), length)]
            after = self._walk(shape, known)
            if after is None:
                continue
            if after.ended:  # the grid ended: the positions after it do not matter
                end = next(i for i, t in enumerate(known) if self.kind[t] == "eos")
                self.emit(prefix + known[:end], logprob + float(value))
                continue
            self.within(prefix, canvas, todo.clone(), logprob + float(value), shape, length)

    def alphabet_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return self.allowed.to(indices.device)[indices]

    def finish_block(self, prefix: list[int], block: list[int], logprob: float, shape: _Shape) -> None:
        """A whole block decided (and no end in it): commit it and search the next one, then take it back off."""
        after = self._walk(shape, block)
        if after is None:
            return
        tokens = prefix + block
        produced = len(tokens)
        if produced >= self.settings.max_new_tokens:
            return  # no room left to end the grid
        before = self.ctx.last_logits
        self.ctx.commit(torch.tensor([block], device=self.ctx.key_valid.device))
        try:
            self.blocks(tokens, logprob, after, min(self.block_size, self.settings.max_new_tokens - produced))
        finally:
            self.ctx.pop(before)

    def emit(self, tokens: list[int], logprob: float) -> None:
        """A finished grid; a sequence reached again by another decoding order keeps its best path."""
        for i, other in enumerate(self.found):
            if other.tokens == tokens:
                if logprob > other.logprob:
                    self.found[i] = Candidate(tokens, other.text, other.grid, logprob)
                return
        text = "".join(self.chars[t] for t in tokens)  # the alphabet's own text, whatever the tokenizer's spacing
        self.found.append(Candidate(tokens, text, text_to_grid(text), logprob))


def search_candidates(model, prompt_ids, block_size: int, mask_token_id: int, alphabet: GridAlphabet,
                      settings: SearchSettings, shift: bool = True, causal_clean: bool = False,
                      use_cache: bool = True) -> SearchResult:
    """The search on `model` run as a block-diffusion model of `block_size` (1: a causal stream) after
    `prompt_ids` (a list of ids, or a `(1, P)` tensor). See the module docstring."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, device=device).reshape(1, -1)
    ctx = BlockContext(model, prompt, torch.ones_like(prompt), block_size, shift=shift, use_cache=use_cache,
                       fuse=False, causal_clean=causal_clean)
    run = _Search(ctx, alphabet, settings, block_size, mask_token_id, shift)
    with torch.no_grad():
        run.blocks([], 0.0, _Shape(), min(block_size, settings.max_new_tokens))
    found = sorted(run.found, key=lambda c: -c.logprob)
    return SearchResult(found, ctx.nfe, run.stopped_by is None, run.stopped_by)


def search(dlm, prompt_ids, settings: SearchSettings | None = None, use_parent: bool = False,
           use_cache: bool = True, alphabet: GridAlphabet | None = None) -> SearchResult:
    """`search_candidates` on a `DiffusionLM` (its block size, shift and clean attention; the trained token rows
    merged for the call), or with `use_parent` on its AR parent as a causal stream. The alphabet is read off the
    model's tokenizer unless given."""
    settings = settings or SearchSettings()
    c = dlm.config
    alphabet = alphabet or GridAlphabet.of(dlm.tokenizer, dlm.eos_token_ids)
    was_training = dlm.model.training
    dlm.model.eval()
    try:
        if use_parent:
            with dlm.ar_parent() as parent:
                return search_candidates(parent, prompt_ids, 1, c.mask_token_id, alphabet, settings, shift=True,
                                         use_cache=use_cache)
        with dlm.trained_token_rows_merged() if dlm.has_adapter else contextlib.nullcontext():
            return search_candidates(dlm.model, prompt_ids, c.block_size, c.mask_token_id, alphabet, settings,
                                     shift=c.shift, causal_clean=c.causal_clean, use_cache=use_cache)
    finally:
        dlm.model.train(was_training)
