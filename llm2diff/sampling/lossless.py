"""Lossless (self-speculative) decoding: the diffusion adapter drafts, its own AR parent verifies.

    from llm2diff import load
    from llm2diff.sampling.lossless import lossless_generate

    dlm = load("outputs/quickstart-selfdistill")
    out = lossless_generate(dlm, input_ids, attention_mask, max_new_tokens=128)
    out.sequences               # token for token what dlm.ar_generate(input_ids, attention_mask, 128) returns
    out.mean_accepted_length    # draft tokens the parent accepted per verification pass

A LoRA-adapted `DiffusionLM` carries its AR parent for free: the same weights with the adapter off. Each round:

  1. draft: the adapted model (adapter on) fills the rest of the open block by block diffusion, against its own
     block-causal KV cache of the prompt and the finished blocks (`BlockContext`, token shift included). The
     block's positions already accepted stay fixed; the others start as mask tokens and are filled in
     `draft_steps` passes (1: all at once by argmax; k: the most confident ones first, over k passes);
  2. verify: the parent (adapter off) runs once over the drafted tokens on top of its causal KV cache of prompt
     and accepted tokens. The longest draft prefix equal to the parent's greedy choices is accepted, then the
     parent's own choice at the first mismatch (or after the last draft token) is appended: the "bonus" token,
     free from the same pass. The parent's cache is cropped to what was accepted;
  3. a block whose positions are all accepted is committed to the diffusion cache (one adapter-on forward, fused
     with the next block's first draft pass), and the next draft starts where acceptance stopped, mid-block.

Every emitted token is the parent's greedy choice given the tokens before it, so `sequences` is the parent's
greedy output; the draft only decides how many tokens each parent pass yields. (As in any speculative decoding,
"identical" holds up to floating-point differences between a one-token and a many-token forward, which can flip
an exact tie between two logits.) The parent's choices are made as `generate` makes them: logits in float32, the
mask token and spare embedding rows suppressed, the `repetition_penalty` of the parent's generation config
applied; stopping at end-of-sequence (`dlm.eos_token_ids`) or a stop string (transformers' `StopStringCriteria`)
after the token that completes it, the rest of the row padded, `max_new_tokens` honoured exactly.

Rows run one at a time (each its own caches, without padding); the batch comes back left-padded in, right-padded
out, shaped as `generate` shapes it. NFE counts every forward pass, summed over rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from llm2diff.compat import cache_kwargs
from llm2diff.modeling.attention import stepwise_attention, supports_stepwise_attention
from llm2diff.modeling.lora import LoraSwitch
from llm2diff.modeling.parent import parent_suppressed_ids

from llm2diff.sampling.rules import suppress_ids
from llm2diff.sampling.block_cache import BlockContext, prompt_fusion_pays
from llm2diff.sampling.stops import StopRule

# Generation-config options that would change `generate`'s greedy choice and that lossless mode does not replay.
UNSUPPORTED_GENERATION_OPTIONS = ("sequence_bias", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                                  "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
                                  "exponential_decay_length_penalty", "begin_suppress_tokens", "guidance_scale",
                                  "watermarking_config")


@dataclass
class LosslessOutput:
    """What `lossless_generate` returns.

    sequences: `(batch, prompt_len + new)` prompt plus the parent's greedy tokens, pad after a row stopped: the
        same tensor `dlm.ar_generate` returns for the same inputs.
    nfe_draft: forward passes of the adapted model (prefills, draft passes, block commits), summed over rows.
    nfe_verify: forward passes of the AR parent, summed over rows: one per verification round (the first round's
        pass also encodes the prompt, unless stepwise verification gives the prompt a pass of its own).
    num_new_tokens: `(batch,)` tokens generated per row, end-of-sequence included, padding excluded.
    accepted_lengths: per verification round (rows in order), the draft tokens accepted and kept, not counting
        the parent's bonus token. A round yields `accepted + 1` tokens unless the row stops inside it.
    parent_steps: parent passes that decoded one token without a draft (`parent_tail`), summed over rows; they
        are counted in `nfe_verify`, not in `accepted_lengths`.
    prompt_passes: parent passes over a prompt alone, one per row under stepwise verification (`generate`'s
        prefill, reproduced exactly); counted in `nfe_verify`.
    """

    sequences: torch.Tensor
    nfe_draft: int
    nfe_verify: int
    num_new_tokens: torch.Tensor
    accepted_lengths: list[int] = field(default_factory=list)
    parent_steps: int = 0
    prompt_passes: int = 0
    nfe_per_row: torch.Tensor | None = None  # `(batch,)` passes of both models made for each row

    @property
    def nfe(self) -> int:
        """All forward passes, drafts and verifications."""
        return self.nfe_draft + self.nfe_verify

    @property
    def mean_accepted_length(self) -> float:
        """Mean accepted draft tokens per verification round (0.0 when there was none)."""
        if not self.accepted_lengths:
            return 0.0
        return sum(self.accepted_lengths) / len(self.accepted_lengths)


def greedy_choices(processors, seen: torch.Tensor, start: int, logits: torch.Tensor) -> torch.Tensor:
    """`generate`'s greedy token at each of `logits`' rows: row j follows the tokens `seen[:, :start + j]`, with
    the logits processors applied as `generate` applies them. Processors that do not read the tokens (suppressed
    ids) run once over all rows; the repetition penalty runs per row, on that row's tokens."""
    from transformers import SuppressTokensLogitsProcessor

    if all(isinstance(p, SuppressTokensLogitsProcessor) for p in processors):
        return processors(seen, logits).argmax(-1)
    return torch.cat([processors(seen[:, : start + j], logits[j : j + 1]).argmax(-1)
                      for j in range(logits.shape[0])])


def parent_logits_processors(dlm):
    """The logits processors greedy `generate` applies for the parent, as a transformers `LogitsProcessorList`.

    The parent's `repetition_penalty` (Qwen2.5-Instruct ships 1.05-1.1) and the suppressed ids. Other options of
    its generation config that move a greedy choice are refused, naming them, rather than silently diverging.
    """
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    config = dlm.model.generation_config
    active = [name for name in UNSUPPORTED_GENERATION_OPTIONS if _changes_greedy_choice(name, getattr(config, name, None))]
    if active:
        raise ValueError(f"the AR parent's generation_config sets {', '.join(active)}, which lossless mode does not "
                         "replay; unset them (e.g. dlm.model.generation_config.min_new_tokens = None) to decode "
                         "losslessly")
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors.append(SuppressTokensLogitsProcessor(parent_suppressed_ids(dlm), device=dlm.device))
    return processors


def _changes_greedy_choice(name: str, value) -> bool:
    """Whether a generation-config option at this value changes `generate`'s greedy choice (its defaults do not)."""
    if value is None:
        return False
    if name == "guidance_scale":
        return value != 1
    if name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
        return value > 0
    return True


class BlockDrafter:
    """The adapted model's side: the prompt and finished blocks in its block-causal cache, the open block drafted.

    `block` holds the open block's accepted tokens (fewer than the block size); `draft(n)` fills its next n
    positions; `accept(tokens)` extends it and commits every block that becomes full.
    """

    def __init__(self, dlm, prompt: torch.Tensor, draft_steps: int = 1, merge_lora: bool = False,
                 switch: LoraSwitch | None = None):
        config = dlm.config
        self.block_size, self.shift, self.steps = config.block_size, config.shift, draft_steps
        self.mask_token_id, self.vocab_size = config.mask_token_id, config.vocab_size
        self.device = prompt.device
        # drafting passes with the LoRA folded in (kept merged weights swapped in per call: no copy per round)
        merged = merge_lora and dlm.has_adapter
        self.weights = (switch or LoraSwitch(dlm)).merged if merged else contextlib.nullcontext
        with self.weights():
            # the prompt's prefill rides along with the first draft pass (one pass fewer per row)
            self.ctx = BlockContext(dlm.model, prompt, torch.ones_like(prompt), config.block_size, shift=config.shift,
                                    causal_clean=config.causal_clean, fuse_prompt=prompt_fusion_pays(prompt))
        self.block: list[int] = []
        self.accepted = 0  # response tokens accepted so far

    @property
    def nfe(self) -> int:
        return self.ctx.nfe

    @property
    def open_positions(self) -> int:
        return self.block_size - len(self.block)

    def draft(self, length: int) -> torch.Tensor:
        """`(length,)` draft tokens for the open block's next `length` positions (1 <= length <= open_positions)."""
        with self.weights():
            return self._draft(length)

    def _draft(self, length: int) -> torch.Tensor:
        size, fixed, device = self.block_size, len(self.block), self.device
        canvas = torch.full((1, size), self.mask_token_id, dtype=torch.long, device=device)
        canvas[0, :fixed] = torch.tensor(self.block, dtype=torch.long, device=device)
        todo = torch.zeros(size, dtype=torch.bool, device=device)
        todo[fixed : fixed + length] = True
        passes = min(self.steps, length)
        for step in range(passes):
            if self.shift and bool(todo[0]) and not bool(todo[1:].any()):
                # only the block's first position: the clean position before the block predicts it, no block pass
                logits = self.ctx.first_position_logits()[:, None].expand(-1, size, -1)
            else:
                logits = self.ctx.block_logits(canvas)
            scores = suppress_ids(logits[0], self.mask_token_id, self.vocab_size)
            if passes == 1:  # every drafted position at once: no confidence to rank by
                canvas[0, todo] = scores.argmax(-1)[todo]
                break
            confidence, tokens = scores.float().softmax(-1).max(-1)
            left = int(todo.sum())
            count = -(-left // (passes - step))  # spread the remaining positions evenly over the remaining passes
            chosen = confidence.masked_fill(~todo, -1.0).topk(count).indices
            canvas[0, chosen] = tokens[chosen]
            todo[chosen] = False
        return canvas[0, fixed : fixed + length]

    def accept(self, tokens: list[int]) -> None:
        """Append accepted tokens; every block they fill is committed (its forward rides on the next draft pass)."""
        self.block += tokens
        self.accepted += len(tokens)
        while len(self.block) >= self.block_size:
            full, self.block = self.block[: self.block_size], self.block[self.block_size :]
            with self.weights():
                self.ctx.commit(torch.tensor([full], dtype=torch.long, device=self.device), run_model=True)


class ParentVerifier:
    """The AR parent's side (adapter off): a causal cache over prompt and accepted tokens, one pass per round.

    The cache lags one token behind: `pending` (first the whole prompt, later the last bonus token) is fed with
    the next draft, so the first round's pass is also the prompt's prefill (under stepwise verification the prompt
    gets a pass of its own, as in `generate`).
    """

    def __init__(self, dlm, prompt: torch.Tensor, processors, stepwise: bool | None = None,
                 switch: LoraSwitch | None = None):
        from transformers import DynamicCache

        self.dlm, self.processors = dlm, processors
        self.stepwise = stepwise
        # the parent: with an adapter, the LoRA layers off; without one (full fine-tuning, merged adapter), the
        # parent loaded separately from the recorded base
        self.parent = (switch or LoraSwitch(dlm)).off if dlm.has_adapter else dlm.ar_parent
        self.cache = DynamicCache(config=dlm.model.config)
        self.pending = prompt  # (1, n) tokens not yet in the cache
        self.history = prompt  # (1, L) every decided token, what the logits processors see
        self.nfe = 0
        self.prompt_passes = 0

    def verify(self, draft: torch.Tensor) -> tuple[int, int]:
        """(k, token): the draft's first k tokens are the parent's greedy choices, `token` its choice after them."""
        count = draft.shape[0]
        ids = torch.cat([self.pending, draft[None]], dim=1)
        # the parent: no mask token among its inputs, its logit suppressed
        with self.parent() as parent:
            if self._stepwise(parent):
                logits = self._stepwise_pass(parent, draft)
            else:
                logits = parent(input_ids=ids, use_cache=True, logits_to_keep=count + 1,
                                **cache_kwargs(self.cache)).logits[0].float()
                self.nfe += 1
        seen = torch.cat([self.history, draft[None]], dim=1)
        start = self.history.shape[1]
        choices = greedy_choices(self.processors, seen, start, logits)
        accepted = int((choices[:count] == draft).long().cumprod(0).sum())
        if accepted < count:
            self.cache.crop(-(count - accepted))
        return accepted, int(choices[accepted])

    def _stepwise(self, parent) -> bool:
        """Whether the parent's passes reproduce `generate`'s arithmetic: when asked, or by default on a CPU with
        SDPA."""
        if self.stepwise is None:
            return self.dlm.device.type == "cpu" and supports_stepwise_attention(parent)
        return self.stepwise

    def _stepwise_pass(self, parent, draft: torch.Tensor) -> torch.Tensor:
        """The logits of one verification, computed as `generate` computes them: the prompt in a pass of its own
        (its prefill: a pass over the prompt and the draft together multiplies more rows at once, and wide
        products need not give a row the same bits as narrower ones), then the draft with attention query by
        query (`stepwise_attention`)."""
        logits = []
        if self.cache.get_seq_length() == 0:
            with stepwise_attention(parent, prefill=self.pending.shape[1]):
                logits.append(parent(input_ids=self.pending, use_cache=True, logits_to_keep=1,
                                     **cache_kwargs(self.cache)).logits[0].float())
            self.nfe += 1
            self.prompt_passes += 1
            ids = draft[None]
        else:
            ids = torch.cat([self.pending, draft[None]], dim=1)
        if ids.shape[1]:
            with stepwise_attention(parent):
                logits.append(parent(input_ids=ids, use_cache=True, logits_to_keep=ids.shape[1],
                                     **cache_kwargs(self.cache)).logits[0].float())
            self.nfe += 1
        return torch.cat(logits)

    def advance(self, tokens: list[int]) -> None:
        """Record the round's tokens (accepted draft plus bonus); the bonus waits to be fed with the next draft."""
        new = torch.tensor([tokens], dtype=torch.long, device=self.history.device)
        self.history = torch.cat([self.history, new], dim=1)
        self.pending = new[:, -1:]


@torch.no_grad()
def lossless_generate(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 256, stop_strings: list[str] | str | None = None, draft_steps: int = 1,
                      tokenizer=None, merge_lora: bool = False, parent_tail: int = 0,
                      stepwise_verify: bool | None = None) -> LosslessOutput:
    """Exactly the AR parent's greedy output, drafted by the diffusion adapter and verified by the parent.

    Args:
        dlm: a `DiffusionLM`. With a LoRA adapter the parent is free (the adapter switched off); without one
            (full fine-tuning or a merged adapter) it is loaded separately from the recorded base (`dlm.ar_parent()`,
            a second copy of the weights).
        input_ids: `(batch, prompt_len)` left-padded prompts (or one `(prompt_len,)` prompt).
        attention_mask: 0 at left padding; default all ones.
        max_new_tokens: most tokens generated per row (honoured exactly).
        stop_strings: stop a row after the token that completes one of these strings (as `generate` does).
        draft_steps: denoising passes per draft (1: fill every drafted position at once).
        tokenizer: for the stop strings; default `dlm.tokenizer`.
        merge_lora: draft with the LoRA folded into the weights (`dlm.lora_merged`: faster draft passes, a second
            copy of the adapted weights); the parent's passes run on the original weights, so the output is the
            same.
        parent_tail: when the open block has at most this many positions left, the parent decodes them itself,
            one per pass, instead of a draft pass over the whole block for one or two tokens (0: always draft).
            Worth it where a pass over a block costs clearly more than a one-token pass (a CPU: about 1.8x for 8
            positions); on a GPU the draft pass costs about the same and 0 is right.
        stepwise_verify: the parent's passes compute attention query by query, as `generate` does
            (`llm2diff.modeling.attention.stepwise_attention`), so that on hardware whose matrix products are
            batch-invariant (bfloat16 on CPUs with AMX) the output equals `generate`'s bit for bit, ties included.
            Default: on when the parent runs SDPA on a CPU; True requires SDPA.

    Returns:
        a `LosslessOutput`: `sequences` equal to `dlm.ar_generate(input_ids, attention_mask, max_new_tokens)`
        (with `stop_strings=..., tokenizer=...` passed on when given), forward-pass counts and accepted lengths.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft_steps < 1:
        raise ValueError(f"draft_steps must be >= 1, got {draft_steps}")
    if not 0 <= parent_tail < dlm.config.block_size:
        raise ValueError(f"parent_tail must be in [0, block size) = [0, {dlm.config.block_size}), got {parent_tail}: "
                         "at the block size no draft is ever made")
    if stepwise_verify and not supports_stepwise_attention(dlm.model):
        raise ValueError(f"stepwise_verify needs SDPA attention; this model runs "
                         f"{dlm.model.config._attn_implementation!r} (load it with attn_implementation='sdpa')")
    input_ids, attention_mask, stops = row_inputs(dlm, input_ids, attention_mask, stop_strings, tokenizer)
    processors = parent_logits_processors(dlm)

    was_training = dlm.model.training
    dlm.model.eval()
    rows, nfe_draft, nfe_verify, accepted_lengths, parent_steps, prompt_passes, per_row = [], 0, 0, [], [], 0, []
    try:
        switch = LoraSwitch(dlm) if dlm.has_adapter else None  # the LoRA layers found once, switched every round
        with dlm.trained_token_rows_merged():  # the mask row in place once, not rebuilt every pass
            for row, keep in zip(input_ids, attention_mask.bool()):
                drafter = BlockDrafter(dlm, row[keep][None], draft_steps, merge_lora=merge_lora, switch=switch)
                verifier = ParentVerifier(dlm, row[keep][None], processors, stepwise=stepwise_verify, switch=switch)
                new = _decode_row(drafter, verifier, stops, row, max_new_tokens, accepted_lengths, parent_steps,
                                  parent_tail)
                rows.append(new)
                nfe_draft += drafter.nfe
                nfe_verify += verifier.nfe
                prompt_passes += verifier.prompt_passes
                per_row.append(drafter.nfe + verifier.nfe)
    finally:
        dlm.model.train(was_training)

    sequences, num_new = padded_rows(dlm, input_ids, rows)
    return LosslessOutput(sequences, nfe_draft, nfe_verify, num_new, accepted_lengths, len(parent_steps),
                          prompt_passes, torch.tensor(per_row, dtype=torch.long, device=sequences.device))


def row_inputs(dlm, input_ids, attention_mask, stop_strings, tokenizer) -> tuple[torch.Tensor, torch.Tensor, StopRule]:
    """`(batch, len)` prompts and mask on the model's device (one prompt may come as `(len,)`; no mask = all ones)
    and the stop rule, for the decodings that run rows one at a time (lossless, verified)."""
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
    attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stops = StopRule(dlm.eos_token_ids, stop_strings, tokenizer or dlm.tokenizer)
    return input_ids.to(dlm.device), attention_mask.to(dlm.device), stops


def padded_rows(dlm, input_ids: torch.Tensor, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts followed by each row's new tokens, padded on the right; `(batch,)` new tokens per row)."""
    device = input_ids.device
    width = max(len(new) for new in rows)
    tail = torch.full((len(rows), width), dlm.tokenizer.pad_token_id, dtype=torch.long, device=device)
    for i, new in enumerate(rows):
        tail[i, : len(new)] = torch.tensor(new, dtype=torch.long, device=device)
    num_new = torch.tensor([len(new) for new in rows], dtype=torch.long, device=device)
    return torch.cat([input_ids, tail], dim=1), num_new


def _decode_row(drafter: BlockDrafter, verifier: ParentVerifier, stops: StopRule, row: torch.Tensor,
                max_new_tokens: int, accepted_lengths: list[int], parent_steps: list[int], parent_tail: int = 0,
                ) -> list[int]:
    """Draft-verify rounds for one prompt until it stops; returns its new tokens, appends its accepted lengths
    (and one entry to `parent_steps` per pass in which the parent decoded a block's tail alone)."""
    new: list[int] = []
    while True:
        alone = drafter.open_positions <= parent_tail
        if alone:  # the parent's own next token: a pass over one position instead of a draft over the block
            draft = torch.empty(0, dtype=torch.long, device=drafter.device)
        else:
            draft = drafter.draft(min(drafter.open_positions, max_new_tokens - len(new)))
        accepted, bonus = verifier.verify(draft)
        tokens = draft[:accepted].tolist() + [bonus]
        start = len(new)
        new += tokens[: max_new_tokens - start]
        stop = stops.first_stop(row, new, start)
        if stop is not None:
            new = new[:stop]
        if alone:
            parent_steps.append(1)
        else:
            accepted_lengths.append(min(accepted, len(new) - start))
        if stop is not None or len(new) >= max_new_tokens:
            return new
        verifier.advance(tokens)
        drafter.accept(tokens)


def decode_lossless(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoding, response_prefix=None,
                    streamer=None):
    """The "lossless" decoder of `DiffusionLM.generate` (`llm2diff.sampling.decoders`)."""
    from llm2diff.sampling.output import GenerateOutput

    if response_prefix is not None or streamer is not None:
        raise ValueError("lossless decoding verifies drafts with the AR parent row by row: it takes no "
                         "response_prefix and no streamer (set mode 'block' or 'verified')")
    out = lossless_generate(dlm, input_ids, attention_mask, max_new_tokens=decoding.max_new_tokens,
                            stop_strings=list(decoding.stop_strings), merge_lora=decoding.merge_lora,
                            parent_tail=decoding.parent_tail)
    stats = {"nfe_draft": out.nfe_draft, "nfe_verify": out.nfe_verify, "accepted_lengths": out.accepted_lengths,
             "parent_steps": out.parent_steps, "prompt_passes": out.prompt_passes}
    return GenerateOutput(out.sequences, out.num_new_tokens, out.nfe, out.nfe_per_row, "lossless", decoding, stats)
