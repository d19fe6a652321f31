"""Self-verified decoding: a causal-clean model denoises each block and its own causal stream checks it.

    from llm2diff import load
    from llm2diff.sampling.verified import verified_generate

    dlm = load("outputs/quickstart-fast-causal")     # trained with clean_attention: causal (and ar_loss_weight)
    out = verified_generate(dlm, input_ids, attention_mask, max_new_tokens=128, threshold=0.7)
    out.sequences     # token for token the adapted model's own greedy causal decoding (dlm.model.generate)

A model trained with `clean_attention: causal` reads finished blocks causally, so the pass that commits a block is a
causal forward over it: the AR model of the adapted weights (the clean stream the AR loss trains). That pass gives,
at every position of the block, the model's own greedy next-token choice for free. Each round:

  1. denoise: the open block, with the tokens already decided kept and the rest masked, is filled by the
     threshold rule (every masked position whose confidence reaches `threshold`, at least the most confident
     one, per pass), each pass against the cache of the prompt and the earlier blocks (token shift included);
  2. verify: one causal pass over the filled positions, on top of the causal cache of everything decided, keeps
     the longest prefix equal to the causal stream's greedy choices and appends the stream's own choice at the
     first mismatch (or after the block: the next block's first token). The cache is cropped to what was kept;
  3. when the block filled to its end, the verify pass carries the next block, all masked, as a noisy block:
     if everything is kept, its predictions are the next block's first denoising step (so a block whose draft is
     right costs the same passes as the block sampler's commit fused with the next block's first step); if not,
     they are dropped and the block goes on from where acceptance stopped.

Every emitted token is the causal stream's greedy choice given the tokens before it, so the output is exactly
`dlm.model.generate(..., do_sample=False)` with the adapter on (the mask token and spare rows suppressed and the
generation config's `repetition_penalty` applied, as `generate` does; up to floating-point ties between a one-token
and a many-token forward). Its accuracy is the AR stream's; the diffusion model only decides how many tokens a pass
yields. Rows run one at a time (no padding); NFE counts every forward pass, summed over rows.

The passes use 4D masks (the cache holds the prompt and causal clean blocks; a noisy block sees the blocks before
its own), so this mode needs the `sdpa` or `eager` attention implementation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from llm2diff.compat import cache_kwargs
from llm2diff.modeling.attention import CLEAN, NOISY, PROMPT, block_diffusion_mask, to_additive_mask
from llm2diff.sampling.lossless import greedy_choices, padded_rows, parent_logits_processors, row_inputs
from llm2diff.sampling.rules import suppress_ids
from llm2diff.modeling.lora import embedding_weight
from llm2diff.sampling.block_cache import uses_flash_attention
from llm2diff.sampling.stops import StopRule


@dataclass
class VerifiedOutput:
    """What `verified_generate` returns.

    sequences: `(batch, prompt_len + new)` prompt plus the new tokens, pad after a row stopped (as `generate`).
    nfe: forward passes, summed over rows (prefills, denoising passes, verify passes).
    num_new_tokens: `(batch,)` tokens generated per row, end-of-sequence included, padding excluded.
    accepted_lengths: per verify pass, the denoised tokens kept (not counting the stream's own token after them).
    drafted_lengths: per verify pass, the denoised tokens it checked.
    nfe_per_row: `(batch,)` forward passes made for each row.
    """

    sequences: torch.Tensor
    nfe: int
    num_new_tokens: torch.Tensor
    nfe_per_row: torch.Tensor | None = None
    accepted_lengths: list[int] = field(default_factory=list)
    drafted_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Kept over checked denoised tokens."""
        return sum(self.accepted_lengths) / max(1, sum(self.drafted_lengths))


class _Stream:
    """One row: the causal KV cache of the prompt and every decided token but the last (`pending`), with the
    segment and block of each cached position, and the passes that extend it."""

    def __init__(self, dlm, prompt: torch.Tensor, processors):
        from transformers import DynamicCache

        self.model, self.processors = dlm.model, processors
        self.block_size, self.mask_id, self.vocab = dlm.config.block_size, dlm.config.mask_token_id, dlm.config.vocab_size
        self.device, self.dtype = prompt.device, embedding_weight(dlm.model).dtype
        self.cache = DynamicCache(config=dlm.model.config)
        self.prompt_len = prompt.shape[0]
        self.segment = torch.full((0,), PROMPT, dtype=torch.long, device=self.device)
        self.block = torch.full((0,), -1, dtype=torch.long, device=self.device)
        self.history = prompt[None]  # every decided token (what the logits processors see)
        self.tokens: list[int] = []  # decided response tokens
        self.pending = prompt[None]  # decided, not yet in the cache
        self.pending_segment = PROMPT  # the prompt until the first pass, then the last decided response token
        self.ar_next = None  # the causal stream's logits for the next token, once `pending` is cached
        self.nfe = 0

    def run(self, clean: list[int], canvas: torch.Tensor | None = None, canvas_block: int = 0):
        """One pass over [pending ; clean (causal, response) ; canvas (noisy block `canvas_block`)].

        Caches pending and clean (the canvas keys/values are cropped off). Returns (the causal stream's logits for
        the token after each clean token, the canvas logits shifted to predict each canvas position or None)."""
        p = self.pending.shape[1]
        start = len(self.tokens) - (p if self.pending_segment == CLEAN else 0)  # response index of the first new
        ids = [self.pending, torch.tensor([clean], dtype=torch.long, device=self.device)]
        segment = [torch.full((p,), self.pending_segment, device=self.device),
                   torch.full((len(clean),), CLEAN, device=self.device)]
        resp = torch.arange(start, start + p + len(clean), device=self.device)
        block = [torch.full((p,), -1, device=self.device) if self.pending_segment == PROMPT else resp[:p] // self.block_size,
                 resp[p:] // self.block_size]
        positions = [torch.arange(p, device=self.device) + (self.segment.shape[0] if self.pending_segment == PROMPT
                                                           else self.prompt_len + start),
                     self.prompt_len + resp[p:]]
        width = 0
        if canvas is not None:
            width = canvas.shape[0]
            ids.append(canvas[None])
            segment.append(torch.full((width,), NOISY, device=self.device))
            block.append(torch.full((width,), canvas_block, device=self.device))
            positions.append(self.prompt_len + canvas_block * self.block_size + torch.arange(width, device=self.device))
        ids, new_segment, new_block = torch.cat(ids, dim=1), torch.cat(segment), torch.cat(block)
        full_segment, full_block = torch.cat([self.segment, new_segment]), torch.cat([self.block, new_block])
        allowed = block_diffusion_mask(full_segment[None], full_block[None], causal_clean=True)[:, -ids.shape[1]:]
        logits = self.model(input_ids=ids, attention_mask=to_additive_mask(allowed, self.dtype),
                            position_ids=torch.cat(positions)[None], use_cache=True,
                            logits_to_keep=ids.shape[1], **cache_kwargs(self.cache)).logits[0].float()
        self.nfe += 1
        if width:
            self.cache.crop(-width)
        self.segment = torch.cat([self.segment, new_segment[: ids.shape[1] - width]])
        self.block = torch.cat([self.block, new_block[: ids.shape[1] - width]])
        if p:
            self.ar_next = logits[p - 1]
        self.pending = self.pending[:, :0]
        self.pending_segment = CLEAN
        clean_logits = torch.cat([self.ar_next[None], logits[p : p + len(clean)]])
        self.ar_next = clean_logits[-1]
        canvas_logits = None
        # token shift: canvas position j is read from canvas position j-1; position 0 from the clean stream's last
        # position, which predicts it when the canvas starts right after the decided tokens (a new block)
        if width:
            canvas_logits = torch.cat([self.ar_next[None], logits[-width:-1]])
        return clean_logits, canvas_logits

    def choices(self, clean_logits: torch.Tensor, clean: list[int]) -> torch.Tensor:
        """The causal stream's greedy token after the decided tokens and each prefix of `clean` (as `generate`)."""
        seen = torch.cat([self.history, torch.tensor([clean], dtype=torch.long, device=self.device)], dim=1)
        start = self.history.shape[1]
        return greedy_choices(self.processors, seen, start, clean_logits)

    def keep(self, checked: list[int], accepted: int, bonus: int) -> list[int]:
        """Keep `accepted` of the `checked` tokens just cached plus the stream's `bonus` token (pending)."""
        if accepted < len(checked):
            drop = len(checked) - accepted
            self.cache.crop(-drop)
            self.segment, self.block = self.segment[:-drop], self.block[:-drop]
        new = checked[:accepted] + [bonus]
        self.tokens += new
        self.history = torch.cat([self.history, torch.tensor([new], dtype=torch.long, device=self.device)], dim=1)
        self.pending = torch.tensor([[bonus]], dtype=torch.long, device=self.device)
        self.ar_next = None
        return new

    def draft_tokens(self, canvas_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, token) of the denoiser's greedy choice at each canvas position (never the mask token or a
        spare row)."""
        return suppress_ids(canvas_logits, self.mask_id, self.vocab).softmax(-1).max(-1)


def verified_generate(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 256, threshold: float = 0.9, stop_strings: list[str] | str | None = None,
                      tokenizer=None, merge_lora: bool = False, streamer=None) -> VerifiedOutput:
    """Exactly the adapted model's greedy causal decoding, denoised block by block and verified by its own causal
    stream (see the module docstring).

    Args:
        dlm: a `DiffusionLM` trained with `clean_attention: causal` and token shift.
        input_ids: `(batch, prompt_len)` left-padded prompts (or one `(prompt_len,)` prompt).
        attention_mask: 0 at left padding; default all ones.
        max_new_tokens: most tokens generated per row (honoured exactly).
        threshold: the denoising commit rule: every masked position at this confidence or more, at least one.
        stop_strings: stop a row after the token that completes one of these strings (as `generate` does).
        tokenizer: for the stop strings; default `dlm.tokenizer`.
        merge_lora: run with the LoRA folded into the weights (`dlm.lora_merged`: faster passes, same model).
        streamer: (one prompt) transformers' `BaseStreamer` protocol (`put`/`end`, e.g. `TextStreamer` or
            `llm2diff.chat.BlockPrinter`): gets the prompt, then the tokens each verify pass adds, then `end()`.
    """
    config = dlm.config
    if not config.causal_clean or not config.shift:
        raise ValueError("self-verified decoding needs a model trained with clean_attention: causal and shift: true "
                         f"(this one: clean_attention {config.clean_attention!r}, shift {config.shift}); its causal "
                         "stream is the verifier. For a block-attention model use mode='lossless' (the AR parent "
                         "verifies) or the block sampler")
    if uses_flash_attention(dlm.model):
        raise ValueError("self-verified decoding passes 4D masks, which FlashAttention ignores; load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    input_ids, attention_mask, stops = row_inputs(dlm, input_ids, attention_mask, stop_strings, tokenizer)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"a streamer follows one response: give one prompt (got {input_ids.shape[0]})")
    processors = parent_logits_processors(dlm)
    weights = dlm.lora_merged if merge_lora and dlm.has_adapter else contextlib.nullcontext

    was_training = dlm.model.training
    dlm.model.eval()
    rows, nfe, accepted, drafted = [], [], [], []
    try:
        with torch.inference_mode(), dlm.trained_token_rows_merged(), weights():
            if streamer is not None:
                streamer.put(input_ids.cpu())
            emit = (lambda tokens: streamer.put(torch.tensor(tokens, dtype=torch.long))) if streamer else None
            for row, keep in zip(input_ids, attention_mask.bool()):
                stream = _Stream(dlm, row[keep], processors)
                rows.append(_decode_row(stream, stops, row, max_new_tokens, threshold, accepted, drafted, emit))
                nfe.append(stream.nfe)
            if streamer is not None:
                streamer.end()
    finally:
        dlm.model.train(was_training)

    sequences, num_new = padded_rows(dlm, input_ids, rows)
    return VerifiedOutput(sequences, sum(nfe), num_new, accepted_lengths=accepted, drafted_lengths=drafted,
                          nfe_per_row=torch.tensor(nfe, dtype=torch.long, device=sequences.device))


def _decode_row(stream: _Stream, stops: StopRule, row: torch.Tensor, max_new_tokens: int, threshold: float,
                accepted_lengths: list[int], drafted_lengths: list[int], emit=None) -> list[int]:
    """One row's new tokens; `emit` (if given) gets them as they are decided, each verify pass's in one call."""
    def final(tokens: list[int], start: int, end: int | None = None) -> list[int]:
        if emit is not None and tokens[start:end]:
            emit(tokens[start:end])
        return tokens[:end] if end is not None else tokens

    size = stream.block_size
    clean_logits, _ = stream.run([])  # prefill: the stream's first token
    first = int(stream.choices(clean_logits, [])[0])
    new = stream.keep([], 0, first)
    stop = stops.first_stop(row, new, 0)
    if stop is not None or max_new_tokens == 1:
        return final(new, 0, 1 if stop is None else stop)
    final(new, 0)
    early = None  # the next block's first denoising step, from a fully accepted verify pass
    while True:
        n = len(stream.tokens)
        b, end = n // size, min((n // size + 1) * size, max_new_tokens)
        known, stop_at = n - b * size, end - b * size  # positions of the block decided / to decide now
        canvas = torch.full((size,), stream.mask_id, dtype=torch.long, device=stream.device)  # always whole
        canvas[:known] = torch.tensor(stream.tokens[b * size:], dtype=torch.long, device=stream.device)
        todo = torch.zeros(size, dtype=torch.bool, device=stream.device)
        todo[known:stop_at] = True
        first_pass = True
        while bool(todo.any()):
            if early is not None and first_pass:
                canvas_logits = early
            else:
                _, canvas_logits = stream.run([], canvas, b)
            first_pass = False
            early = None
            confidence, tokens = stream.draft_tokens(canvas_logits)
            confidence = confidence.masked_fill(~todo, -1.0)
            chosen = (confidence >= threshold) & todo
            chosen[confidence.argmax()] = True
            canvas[chosen] = tokens[chosen]
            todo &= ~chosen
        draft = canvas[known:stop_at].tolist()
        block_done = end == (b + 1) * size and end < max_new_tokens
        clean_logits, next_logits = stream.run(draft, *((torch.full((size,), stream.mask_id, dtype=torch.long,
                                                                     device=stream.device), b + 1) if block_done
                                                         else ()))
        choices = stream.choices(clean_logits, draft)
        ok = (choices[: len(draft)] == torch.tensor(draft, device=choices.device)).long().cumprod(0)
        kept = int(ok.sum())
        accepted_lengths.append(kept)
        drafted_lengths.append(len(draft))
        start = len(new)
        new += stream.keep(draft, kept, int(choices[kept]))
        if block_done and kept == len(draft):
            early = next_logits
        stop = stops.first_stop(row, new, start)
        if stop is not None:
            return final(new, start, stop)
        if len(new) >= max_new_tokens:
            return final(new, start, max_new_tokens)
        final(new, start)


def decode_verified(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoding, response_prefix=None,
                    streamer=None):
    """The "verified" decoder of `DiffusionLM.generate` (`llm2diff.sampling.decoders`)."""
    from llm2diff.sampling.output import GenerateOutput

    if response_prefix is not None:
        raise ValueError("response_prefix continues a response with the block sampler only: set mode 'block'")
    out = verified_generate(dlm, input_ids, attention_mask, max_new_tokens=decoding.max_new_tokens,
                            threshold=decoding.verified_threshold, stop_strings=list(decoding.stop_strings),
                            merge_lora=decoding.merge_lora, streamer=streamer)
    return GenerateOutput(out.sequences, out.num_new_tokens, out.nfe, out.nfe_per_row, "verified", decoding,
                          {"accepted_lengths": out.accepted_lengths, "drafted_lengths": out.drafted_lengths})
