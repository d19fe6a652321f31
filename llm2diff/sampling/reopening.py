"""Reopening finished blocks (`reopen_threshold`): learned correction of tokens whose block is already committed.

The pass that appends a finished block to the cache reads it again (an editing-trained model as its noisy copy
reads a visible block; a `clean_attention: causal` model through its AR stream). Where that reading confidently
names another token, the block is reopened: the token replaced, the block's keys/values taken off the cache and
appended again (`reopen_tail: keep`, then judged again), or, with `reopen_tail: redenoise`, the block taken back
off altogether and its tokens after the correction denoised again under it (`_rewind`; the sampler's loop denoises
it as a block after a response prefix ending there). `reopen_last` judges the last block too. A mixin of
`llm2diff.sampling.sampler.BlockSampler`, whose state (`s`, `previous`, `rewind`, `block_sure`, counters) it reads.
"""

from __future__ import annotations

import torch

from llm2diff.sampling.block_cache import BlockContext
from llm2diff.sampling.rules import select_disputes, select_first_dispute, suppress_ids


class Reopening:
    """The reopening half of the block sampler (see the module docstring)."""

    def _last_limit(self, rows: torch.Tensor, finished: torch.Tensor, num_new: torch.Tensor, lo: int,
                    count: int) -> torch.Tensor:
        """How many of the last block's tokens each row may have revised: up to where it stopped (the token that
        stopped a row, end-of-sequence or a stop string's last, is never revised)."""
        return (num_new[rows] - lo - finished[rows].long()).clamp(0, count)

    def _unsure_last(self, ctx: BlockContext, finished: torch.Tensor, num_new: torch.Tensor, lo: int, offset: int,
                     count: int) -> torch.Tensor:
        """`reopen_last_below`: the rows (of the context's) whose last block holds a revisable token committed with
        less than that probability (every row without it): only those get the judging pass."""
        below = self.s.reopen_last_below
        rows = ctx.rows
        if below is None:
            return ~ctx.done.cpu()
        limit = self._last_limit(rows, finished, num_new, lo, count).to(self.block_sure.device)
        revisable = self._revisable(rows, offset, limit[:, None]).to(self.block_sure.device)
        return (((self.block_sure < below) & revisable).any(-1) & ~ctx.done).cpu()

    def _revisable(self, rows: torch.Tensor, offset: int, count) -> torch.Tensor:
        """`(rows, B)`: the positions of the last committed block reopening may revise: from each row's first
        revisable one (`self.previous`) up to `offset + count` (`count`: an int, or `(rows, 1)` per row); with shift
        (or a causal stream) nothing in the block judges its first token."""
        s = self.s
        first = self.previous[3][rows]
        positions = torch.arange(s.block_size, device=first.device)
        return (positions >= first[:, None]) & (positions < offset + count) & \
            ((positions > 0) | (not (s.shift or s.causal_clean)))

    def _judge_last(self, ctx: BlockContext, done_before: torch.Tensor, new_tokens: torch.Tensor,
                    num_new: torch.Tensor, finished: torch.Tensor, unsure: torch.Tensor) -> None:
        """`reopen_last`: one more pass appends the last block (its logits for a block after it go unused), so that
        reopening judges it as it judges the others: the rows that were still running when it was denoised, up to
        where each stopped (the token that stopped a row, end-of-sequence or a stop string's last, is never
        revised, so a correction never un-ends a row; re-denoising the tail may end it elsewhere); `unsure`
        (`(rows,)`): the rows to judge (`_unsure_last`)."""
        s, rows = self.s, ctx.rows
        lo, offset, count = self.previous[:3]
        ctx.done = done_before
        reopened = self.reopened
        masked = torch.full((ctx.batch_size, s.block_size), s.mask_token_id, dtype=torch.long,
                            device=ctx.key_valid.device)
        limit = self._last_limit(rows, finished, num_new, lo, count).to(ctx.key_valid.device)
        limit = torch.where(unsure.to(limit.device), limit, torch.zeros_like(limit))
        self._reopen_previous(ctx, lambda: ctx.block_logits(masked), limit)
        if self.reopened != reopened and self.rewind is None:
            new_tokens[rows, lo : lo + count] = torch.where(
                torch.arange(count, device=new_tokens.device) < limit[:, None].to(new_tokens.device),
                ctx.generated[:, -s.block_size:][:, offset : offset + count].to(new_tokens.device),
                new_tokens[rows, lo : lo + count])

    def _reopen_previous(self, ctx: BlockContext, forward, limit: torch.Tensor | None = None):
        """Run `forward` (the pass that appends the last committed block, when one is pending); with
        `reopen_threshold`, read that block as the pass saw it and, where the model predicts another token at one of
        its revisable positions with at least that probability, replace it (the most confident first, at most
        `reopen_budget` per row and block; a causal judge takes the first, then judges again) and run the pass again
        with the corrected block. With `reopen_tail: redenoise` the first confident dispute is replaced and the
        block's tokens after it are to be denoised again (`self.rewind`, which the caller acts on; the pass's
        logits are then stale). `limit` (`(batch,)`): revise only each row's first `limit` tokens of the block.
        Returns the logits of the last pass."""
        s = self.s
        logits = forward()
        if s.reopen_threshold is None or ctx.judged is None or self.previous is None:
            ctx.judged = None
            return logits
        _, offset, count, _, budget_left = self.previous
        rows = ctx.rows
        budget = budget_left[rows].clone()
        revisable = self._revisable(rows, offset, count if limit is None else limit[:, None])
        redenoise = s.reopen_tail == "redenoise"
        while ctx.judged is not None and bool(budget.any()):
            judged, ctx.judged = ctx.judged, None
            allowed = suppress_ids(judged, s.mask_token_id, s.vocab_size)
            allowed[..., list(s.eos_token_ids)] = float("-inf")  # a correction never ends a row
            best, proposal = allowed.float().softmax(-1).max(-1)
            block = ctx.generated[:, -s.block_size:]
            disputed = revisable & (proposal != block) & ~ctx.done[:, None] & ~torch.isnan(best)
            # a causal judge (the AR stream of a causal-clean model) reads each token from those before it: the
            # first confident dispute, then judge again; a block-attention judge sees the whole block: the surest
            select = select_first_dispute if s.causal_clean or redenoise else select_disputes
            chosen = select(best.nan_to_num(0.0), disputed, s.reopen_threshold, budget)
            if not bool(chosen.any()):
                break
            corrected = torch.where(chosen, proposal, block)
            budget -= chosen.sum(-1)
            self.reopened += int(chosen.sum())
            if redenoise:  # everything after the correction was written under the error: denoise it again
                positions = torch.arange(s.block_size, device=block.device)
                hit = chosen.any(-1)
                kept = torch.where(hit, chosen.long().argmax(-1) + 1, s.block_size)
                tail = (positions >= kept[:, None]) & (positions < offset + count)
                corrected = torch.where(tail, s.mask_token_id, corrected)
                self.rewind = (corrected, kept, budget)
                if self.trajectory is not None:
                    self._record(ctx, corrected, best, chosen, chosen | tail, block=ctx.num_blocks - 1)
                break
            ctx.reopen(corrected)
            if self.trajectory is not None:  # drawn as a retraction and a commit in the block reopened
                self._record(ctx, corrected, best, chosen, chosen, block=ctx.num_blocks - 1)
            logits = forward()
        ctx.judged = None
        return logits

    def _state(self, ctx: BlockContext, finished: torch.Tensor, num_new: torch.Tensor) -> tuple:
        """What a rewind restores: each original row's finished flag, token count and whether it rides along done."""
        done = torch.zeros_like(finished)
        done[ctx.rows] = ctx.done
        return finished.clone(), num_new.clone(), done

    def _rewind(self, ctx: BlockContext, state: tuple, finished: torch.Tensor, num_new: torch.Tensor):
        """Act on `self.rewind` (`reopen_tail: redenoise`): take the last committed block back off the cache, put
        the context's rows back as they were before it (`state`, from `_state`), and return what the loop denoises
        next, that block again with each row's tokens up to its correction kept, and where to write it."""
        corrected, kept, budget = self.rewind
        self.rewind = None
        ctx.pop(ctx.last_block_first_logits)
        rows = ctx.rows
        was_finished, was_num_new, was_done = state
        finished[rows], num_new[rows] = was_finished[rows], was_num_new[rows]
        ctx.done = was_done[rows]
        lo, _, _, first, budget_left = self.previous
        first, budget_left = first.clone(), budget_left.clone()
        first[rows] = torch.maximum(first[rows], kept.to(first.device))
        budget_left[rows] = budget
        return (corrected, kept, first, budget_left), lo
