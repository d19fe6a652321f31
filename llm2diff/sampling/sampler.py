"""The block sampler: prompt prefilled once into a KV cache, then the response block by block.

For each block of B positions:
  1. start from B mask tokens;
  2. run the block against the cache (bidirectional inside the block), propose a token and a confidence at every
     masked position, commit some of them (the `tokens_per_step` most confident, or every one above `threshold`,
     at least `tokens_per_step`), crop the block's keys/values off the cache again; repeat until the block is clean;
  3. run the clean block once more and keep its keys/values: they are exactly what the training layout's clean
     copy computes, and its last position's output predicts the next block's first token (token shift).
Rows stop independently at end-of-sequence or a stop string; `max_new_tokens` is honoured exactly (a last,
partial block commits only its first positions). With `use_cache=False` every step recomputes the whole
sequence with the block-diffusion mask instead; both give the same tokens.

NFE counts every forward pass of the model for the batch, prefill and commit passes included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llm2diff.modeling.attention import CLEAN, NOISY, PAD, PROMPT, block_diffusion_mask, cached_block_mask, to_additive_mask
from llm2diff.sampling.rules import COMMIT_RULES, choose_tokens, coarse_to_fine_priority, select_commits, suppress_ids


@dataclass
class GenerateOutput:
    """What `DiffusionLM.generate` returns.

    sequences: `(batch, prompt_len + new)` prompt plus generated tokens, pad after a row stopped.
    nfe: forward passes of the model for the whole batch (prefill and commit passes included).
    tokens_per_step: tokens committed (summed over rows still running) at each denoising step.
    num_new_tokens: `(batch,)` tokens generated per row, end-of-sequence included, padding excluded.
    nfe_per_row: `(batch,)` forward passes made while each row was still generating (a finished row rides along
        in the batch without counting), so `num_new_tokens / nfe_per_row` is the row's tokens per forward.
    """

    sequences: torch.Tensor
    nfe: int
    tokens_per_step: list[int] = field(default_factory=list)
    num_new_tokens: torch.Tensor | None = None
    nfe_per_row: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.tokens_per_step)


@dataclass
class SamplerSettings:
    """The knobs of one `generate` call (resolved against the model's defaults)."""

    block_size: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None = None
    shift: bool = True
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None
    tokens_per_step: int = 1
    stop_strings: tuple[str, ...] = ()
    use_cache: bool = True
    seed: int | None = None
    commit_rule: str = "confidence"
    significance: torch.Tensor | None = None
    significance_weight: float = 2.0
    confidence_floor: float | None = None

    def __post_init__(self) -> None:
        if self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"commit_rule must be one of {', '.join(COMMIT_RULES)}, got {self.commit_rule!r}")
        if self.commit_rule == "coarse_to_fine" and self.significance is None:
            raise ValueError("commit_rule 'coarse_to_fine' needs a token significance table")
        if self.confidence_floor is not None and not 0.0 <= self.confidence_floor <= 1.0:
            raise ValueError(f"confidence_floor must be in [0, 1], got {self.confidence_floor}")


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class BlockContext:
    """The prompt and the committed blocks, as seen by the block being denoised.

    With a cache, the prompt is prefilled once and each committed block appends its exact keys/values; a denoising
    forward appends the noisy block's keys/values and crops them off again. Without a cache, every call recomputes
    the whole sequence with the block-diffusion mask. Both give the same predictions.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, block_size: int,
                 shift: bool = True, use_cache: bool = True):
        self.model, self.block_size, self.shift, self.use_cache = model, block_size, shift, use_cache
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.prompt_lens = attention_mask.long().sum(-1)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.nfe = 0
        self.active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.nfe_per_row = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.num_blocks = 0
        self.generated = input_ids[:, :0]
        self.key_valid = attention_mask.bool()
        self.cache = None
        self.last_logits = None  # the clean position before the current block predicts its first token (shift)
        if use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
            positions = _left_padded_positions(attention_mask)
            self.last_logits = self._forward(input_ids, attention_mask, positions, self.cache)[:, -1]

    def _forward(self, input_ids, attention_mask, position_ids, cache=None) -> torch.Tensor:
        self.nfe += 1
        self.nfe_per_row += self.active.long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=cache is not None).logits

    def _block_positions(self) -> torch.Tensor:
        offsets = self.num_blocks * self.block_size + torch.arange(self.block_size, device=self.prompt_lens.device)
        return self.prompt_lens[:, None] + offsets

    def first_position_logits(self) -> torch.Tensor | None:
        """With shift and a cache: the logits predicting the current block's first token (no forward needed)."""
        return self.last_logits if (self.shift and self.use_cache) else None

    def block_logits(self, canvas: torch.Tensor) -> torch.Tensor:
        """`(batch, B, vocab)` predictions for every position of the current block, given its noisy `canvas`."""
        if not self.use_cache:
            return self._recompute(canvas)
        mask = cached_block_mask(self.key_valid, self.block_size, self.dtype)
        logits = self._forward(canvas, mask, self._block_positions(), self.cache)
        self.cache.crop(-self.block_size)
        if self.shift:
            return torch.cat([self.last_logits[:, None], logits[:, :-1]], dim=1)
        return logits

    def commit(self, block: torch.Tensor, run_model: bool = True) -> None:
        """Append a clean block. With a cache, one forward stores its keys/values (skip it after the last block)."""
        if self.use_cache and run_model:
            mask = cached_block_mask(self.key_valid, self.block_size, self.dtype)
            self.last_logits = self._forward(block, mask, self._block_positions(), self.cache)[:, -1]
            self.key_valid = torch.cat([self.key_valid, torch.ones_like(block, dtype=torch.bool)], dim=1)
        self.generated = torch.cat([self.generated, block], dim=1)
        self.num_blocks += 1

    def _recompute(self, canvas: torch.Tensor) -> torch.Tensor:
        batch, prompt_len = self.input_ids.shape
        device, size = canvas.device, self.block_size
        done = self.generated.shape[1]
        ids = torch.cat([self.input_ids, self.generated, canvas], dim=1)
        segment = torch.cat([
            torch.where(self.attention_mask.bool(), PROMPT, PAD),
            torch.full((batch, done), CLEAN, device=device),
            torch.full((batch, size), NOISY, device=device),
        ], dim=1)
        resp_block = (torch.arange(done + size, device=device) // size).expand(batch, -1)
        block = torch.cat([torch.full((batch, prompt_len), -1, device=device), resp_block], dim=1)
        positions = torch.cat([
            _left_padded_positions(self.attention_mask),
            self.prompt_lens[:, None] + torch.arange(done + size, device=device),
        ], dim=1)
        mask = to_additive_mask(block_diffusion_mask(segment, block), self.dtype)
        logits = self._forward(ids, mask, positions)
        start = prompt_len + done
        return logits[:, start - 1 : start + size - 1] if self.shift else logits[:, start : start + size]


class BlockSampler:
    """Runs the block-diffusion sampling loop for one batch. Use through `DiffusionLM.generate`."""

    def __init__(self, model: torch.nn.Module, settings: SamplerSettings, tokenizer=None):
        self.model = model
        self.s = settings
        self.tokenizer = tokenizer
        self.step_counts: list[int] = []
        device = model.get_input_embeddings().weight.device
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_prefix: torch.Tensor | None = None) -> GenerateOutput:
        """Sample after the prompt, or after `response_prefix` (`(batch, P)` response tokens already decided).

        The prefix's whole blocks are committed to the cache as clean blocks; a prefix that ends inside a block
        fills that block's first positions, and denoising starts at the next one. `sequences` then holds prompt,
        prefix and new tokens; `num_new_tokens` counts the new ones only.
        """
        s = self.s
        batch = input_ids.shape[0]
        device = input_ids.device
        ctx = BlockContext(self.model, input_ids, attention_mask, s.block_size, s.shift, s.use_cache)
        new_tokens = torch.full((batch, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        num_new = torch.zeros(batch, dtype=torch.long, device=device)
        prefix = input_ids[:, :0] if response_prefix is None else response_prefix.to(device)
        whole, partial = divmod(prefix.shape[1], s.block_size)
        for b in range(whole):
            ctx.commit(prefix[:, b * s.block_size : (b + 1) * s.block_size], run_model=True)
        start = prefix[:, whole * s.block_size :] if partial else None

        produced = 0
        while produced < s.max_new_tokens and not bool(finished.all()):
            offset = start.shape[1] if start is not None else 0
            length = min(s.block_size - offset, s.max_new_tokens - produced)
            canvas = self._denoise_block(ctx, offset + length, finished, start)
            start = None
            block_tokens = canvas[:, offset : offset + length]
            new_tokens[:, produced : produced + length] = torch.where(
                finished[:, None], torch.full_like(block_tokens, s.pad_token_id), block_tokens
            )
            num_new += (~finished).long() * length
            produced += length
            finished = self._apply_stops(new_tokens, produced, finished, num_new)
            ctx.active = ~finished
            more = produced < s.max_new_tokens and not bool(finished.all())
            ctx.commit(canvas, run_model=more)

        sequences = torch.cat([input_ids, prefix, new_tokens[:, :produced]], dim=1)
        return GenerateOutput(sequences, ctx.nfe, self.step_counts, num_new, ctx.nfe_per_row)

    def _denoise_block(self, ctx: BlockContext, length: int, finished: torch.Tensor,
                       start: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise one block from all-mask to clean. Returns the `(batch, B)` canvas (positions >= length stay masked).

        `start` (`(batch, j)`) fixes the block's first j tokens (a response prefix ending inside the block).
        """
        s = self.s
        batch, size, device = finished.shape[0], s.block_size, finished.device
        canvas = torch.full((batch, size), s.mask_token_id, dtype=torch.long, device=device)
        positions = torch.arange(size, device=device)
        fixed = 0 if start is None else start.shape[1]
        if start is not None:
            canvas[:, :fixed] = start
        todo = ((positions < length) & (positions >= fixed))[None, :].expand(batch, size).clone()
        while bool(todo.any()):
            first = ctx.first_position_logits()
            if first is not None and not bool(todo[:, 1:].any()):
                # only first positions left: the clean position before the block predicts them, no forward needed
                logits = first[:, None].expand(-1, size, -1)
            else:
                logits = ctx.block_logits(canvas)
            allowed = suppress_ids(logits, s.mask_token_id, s.vocab_size)
            tokens, confidence = choose_tokens(allowed, s.temperature, s.top_k, s.top_p, self.generator)
            priority = None
            if s.commit_rule == "coarse_to_fine":
                priority = coarse_to_fine_priority(tokens, confidence, s.significance, s.significance_weight)
            commit = select_commits(confidence, todo, s.tokens_per_step, s.threshold, priority, s.confidence_floor)
            canvas = torch.where(commit, tokens, canvas)
            todo &= ~commit
            self.step_counts.append(int((commit & ~finished[:, None]).sum()))
        return canvas

    # -- stopping ----------------------------------------------------------------------------------------------
    def _apply_stops(self, new_tokens, produced, finished, num_new) -> torch.Tensor:
        """Mark rows that emitted end-of-sequence or a stop string; pad everything after the stop."""
        s = self.s
        finished = finished.clone()
        for row in range(new_tokens.shape[0]):
            if finished[row]:
                continue
            tokens = new_tokens[row, :produced]
            stop_at = None
            for eos in s.eos_token_ids:
                hits = (tokens == eos).nonzero()
                if len(hits):
                    at = int(hits[0]) + 1
                    stop_at = at if stop_at is None else min(stop_at, at)
            if s.stop_strings and self.tokenizer is not None:
                at = _stop_string_end(self.tokenizer, tokens[: stop_at or produced].tolist(), s.stop_strings)
                if at is not None:
                    stop_at = at
            if stop_at is not None:
                new_tokens[row, stop_at:produced] = s.pad_token_id
                num_new[row] = stop_at
                finished[row] = True
        return finished


def _stop_string_end(tokenizer, tokens: list[int], stop_strings: tuple[str, ...]) -> int | None:
    """Smallest n such that the first n tokens decode to text containing a stop string, or None."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if not any(stop in text for stop in stop_strings):
        return None
    for n in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:n], skip_special_tokens=False)
        if any(stop in prefix for stop in stop_strings):
            return n
    return None
