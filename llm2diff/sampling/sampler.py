"""The block sampler: prompt prefilled once into a KV cache, then the response block by block.

For each block of B positions:
  1. start from B mask tokens;
  2. run the block against the cache (bidirectional inside the block), propose a token and a confidence at every
     masked position, commit some of them by the commit rule (`llm2diff.sampling.rules`: most confident k, above a
     threshold, margin, entropy-bounded, random, coarse-to-fine; optionally left to right by sub-blocks, with a cap
     on steps per block), optionally correct committed tokens of the block: remask those the model no longer
     believes (`remask_threshold`, ReMDM-style), or replace / remask those where it now confidently predicts another
     token (`edit_threshold`, learned correction for models trained with editing noise), within a budget per block;
     crop the block's keys/values off the cache again; repeat until the block is clean;
  3. append the clean block's keys/values to the cache: they are exactly what the training layout's clean copy
     computes, and its last position's output predicts the next block's first token (token shift). This pass is
     fused with the next block's first denoising step (one forward over [clean block ; noisy block] with a
     block-causal mask), so committing costs no forward of its own.
Rows stop independently at end-of-sequence or a stop string, and finished rows leave the batch (their cache rows
are dropped); `max_new_tokens` is honoured exactly (a last, partial block commits only its first positions). With
`use_cache=False` every step recomputes the whole sequence with the block-diffusion mask instead; both give the
same tokens. Work is proportional to the new tokens: the prompt is encoded once and only the last position's
logits of a prefill are computed.

NFE counts every forward pass of the model for the batch, prefill included. The cache itself (prefill, fused
commits, cropping, dropping finished rows, recomputation without a cache) is `llm2diff.sampling.block_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llm2diff.modeling.lora import embedding_weight
from llm2diff.sampling.block_cache import BlockContext, prompt_fusion_pays
from llm2diff.sampling.reopening import Reopening
from llm2diff.sampling.rules import (
    choose_tokens,
    coarse_to_fine_priority,
    entropy_bounded_commits,
    entropy_scores,
    margin_scores,
    random_priority,
    select_commits,
    select_disputes,
    select_remasks,
    sub_block_window,
    suppress_ids,
)
from llm2diff.sampling.settings import SamplerSettings, check_sampling_values  # noqa: F401  (re-exported)
from llm2diff.sampling.stops import StopRule


@dataclass
class SamplerOutput:
    """What `BlockSampler.generate` returns (`decode_block` hands it on as a `GenerateOutput`).

    sequences: `(batch, prompt_len + new)` prompt plus generated tokens, pad after a row stopped.
    nfe: forward passes of the model for the whole batch (prefill included).
    tokens_per_step: tokens committed (summed over rows still running) at each denoising step.
    num_new_tokens: `(batch,)` tokens generated per row, end-of-sequence included, padding excluded.
    nfe_per_row: `(batch,)` forward passes made while each row was still generating, so
        `num_new_tokens / nfe_per_row` is the row's tokens per forward.
    remasked: tokens retracted by correction (summed over rows).
    edited: tokens replaced by learned correction (summed over rows).
    reopened: tokens of finished blocks replaced by reopening them (summed over rows).
    trajectory: the recorded denoising steps (`record_trajectory=True`), a `llm2diff.sampling.trajectory.Trajectory`.
    """

    sequences: torch.Tensor
    nfe: int
    tokens_per_step: list[int] = field(default_factory=list)
    num_new_tokens: torch.Tensor | None = None
    nfe_per_row: torch.Tensor | None = None
    remasked: int = 0
    trajectory: object | None = None
    edited: int = 0
    reopened: int = 0

    @property
    def steps(self) -> int:
        return len(self.tokens_per_step)


class BlockSampler(Reopening):
    """Runs the block-diffusion sampling loop for one batch. Use through `DiffusionLM.generate`.

    `streamer` (transformers' `BaseStreamer`: `put`/`end`, e.g. `TextStreamer`) receives the prompt, then each
    finished block's kept tokens as soon as the block is clean (batch size 1). `trajectory` (a
    `llm2diff.sampling.trajectory.Trajectory`) records every denoising step's canvas and confidences.
    """

    def __init__(self, model: torch.nn.Module, settings: SamplerSettings, tokenizer=None, streamer=None,
                 trajectory=None):
        self.model = model
        self.s = settings
        self.tokenizer = tokenizer
        self.streamer = streamer
        self.trajectory = trajectory
        self.stops = StopRule(settings.eos_token_ids, settings.stop_strings if tokenizer is not None else (), tokenizer)
        self.step_counts: list[int] = []
        self.remasked = 0
        self.edited = 0
        self.reopened = 0
        self.previous = self.rewind = None  # the last committed block (reopening), a pending rewind (`generate`)
        device = embedding_weight(model).device
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_prefix: torch.Tensor | None = None, draft: torch.Tensor | None = None) -> SamplerOutput:
        """Sample after the prompt, or after `response_prefix` (`(batch, P)` response tokens already decided).

        The prefix's whole blocks are committed to the cache as clean blocks; a prefix that ends inside a block
        fills that block's first positions, and denoising starts at the next one. `sequences` then holds prompt,
        prefix and new tokens; `num_new_tokens` counts the new ones only. `draft` (`(batch, B)`, the mask id where
        undecided; needs a prefix of whole blocks) pre-commits tokens of the first new block as if an earlier step
        had committed them, so correction may still retract them (how planted errors are measured).
        """
        s = self.s
        batch = input_ids.shape[0]
        device = input_ids.device
        if self.streamer is not None:
            if batch != 1:
                raise ValueError(f"streaming needs a batch of one prompt, got {batch}")
            self.streamer.put(input_ids.cpu())
        static = None
        if s.static_cache:  # prompt, prefix, every block (the last one whole) and a fused pass's extra block
            blocks = -(-((0 if response_prefix is None else response_prefix.shape[1]) + s.max_new_tokens) // s.block_size)
            static = input_ids.shape[1] + (blocks + 2) * s.block_size
        ctx = BlockContext(self.model, input_ids, attention_mask, s.block_size, s.shift, s.use_cache, s.fuse_commit,
                           static_length=static, causal_clean=s.causal_clean,
                           fuse_prompt=s.fuse_commit and prompt_fusion_pays(input_ids),
                           keep_hidden=s.self_conditioning == "hidden")
        if s.reopen_threshold is not None:
            if self.streamer is not None:
                raise ValueError("reopen_threshold may rewrite a finished block that a streamer has already shown; "
                                 "stream without it, or reopen without streaming")
            ctx.judge = True
        new_tokens = torch.full((batch, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        num_new = torch.zeros(batch, dtype=torch.long, device=device)
        prefix = input_ids[:, :0] if response_prefix is None else response_prefix.to(device)
        whole, partial = divmod(prefix.shape[1], s.block_size)
        for b in range(whole):
            ctx.commit(prefix[:, b * s.block_size : (b + 1) * s.block_size], run_model=True)
        start = prefix[:, whole * s.block_size :] if partial else None
        if draft is not None and (partial or draft.shape != (batch, s.block_size)):
            raise ValueError(f"draft must be a (batch, block_size) = ({batch}, {s.block_size}) tensor after a "
                             f"response prefix of whole blocks, got {tuple(draft.shape)} after {prefix.shape[1]} "
                             "prefix tokens")
        context = torch.cat([input_ids, prefix], dim=1)  # what stop strings may begin in

        produced = 0
        # the last committed block: (its first new-token index, its first position in the block, its length, the
        # first position each original row may still revise, each original row's reopen budget left)
        self.previous = None
        self.rewind = None  # set by a reopening that re-denoises a block's tail (`reopen_tail: redenoise`)
        redo = None  # (block, (rows,) positions kept, first revisable per original row, budget): a block to redo
        total = input_ids.shape[0]
        state = before_last = None  # (finished, num_new, done per original row) before this block / the last one
        while produced < s.max_new_tokens and not bool(finished.all()):
            rows = ctx.rows
            if redo is None:
                offset = start.shape[1] if start is not None else 0
                length = min(s.block_size - offset, s.max_new_tokens - produced)
                block, kept = start, None
                first = torch.full((total,), offset, dtype=torch.long, device=device)
                budget = torch.full((total,), s.reopen_budget, dtype=torch.long, device=device)
            else:
                block, kept, first, budget = redo
                offset, length = self.previous[1], self.previous[2]
                redo = None
            before_last, state = state, self._state(ctx, finished, num_new)
            reopened = self.reopened
            canvas = self.denoise_block(ctx, offset + length, start=block, kept=kept,
                                        draft=None if draft is None else draft[ctx.rows].to(device))
            if self.rewind is not None:  # the block before is denoised again from its correction on
                redo, produced = self._rewind(ctx, before_last, finished, num_new)
                continue
            if self.reopened != reopened:  # the block before was reopened: its corrected tokens replace the old ones
                lo, at, count = self.previous[:3]
                new_tokens[rows, lo : lo + count] = ctx.generated[:, -s.block_size:][:, at : at + count]
            self.previous = (produced, offset, length, first, budget)
            start = draft = None
            running = ~ctx.done
            new_tokens[rows[running], produced : produced + length] = canvas[running, offset : offset + length]
            num_new[rows[running]] += length
            before = produced
            produced += length
            finished = self._apply_stops(context, new_tokens, before, produced, finished, num_new)
            if self.streamer is not None:
                self.streamer.put(new_tokens[0, before : min(produced, int(num_new[0]))].cpu())
            more = produced < s.max_new_tokens and not bool(finished.all())
            judge_last, unsure = False, None
            if not more and s.reopen_last and s.reopen_threshold is not None:
                unsure = self._unsure_last(ctx, finished, num_new, before, offset, length)
                judge_last = bool(unsure.any())
            ctx.commit(canvas, run_model=more or judge_last)
            done_before, ctx.done = ctx.done, finished[ctx.rows]
            if more and s.drop_finished and bool(ctx.done.any()):
                ctx.select((~ctx.done).nonzero().squeeze(-1))
            if judge_last:
                self._judge_last(ctx, done_before, new_tokens, num_new, finished, unsure)
                if self.rewind is not None:  # the last block is denoised again from its correction on
                    redo, produced = self._rewind(ctx, state, finished, num_new)
        if self.streamer is not None:
            self.streamer.end()

        sequences = torch.cat([input_ids, prefix, new_tokens[:, :produced]], dim=1)
        return SamplerOutput(sequences, ctx.nfe, self.step_counts, num_new, ctx.nfe_per_row, self.remasked,
                              self.trajectory, self.edited, self.reopened)

    def denoise_block(self, ctx: BlockContext, length: int, start: torch.Tensor | None = None,
                      draft: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise the context's current block from all-mask to clean. Returns the `(batch, B)` canvas (positions
        >= length stay masked).

        `start` (`(batch, j)`) fixes the block's first j tokens (a response prefix ending inside the block); with
        `kept` (`(batch,)`), `start` is a whole `(batch, B)` block of which each row keeps its first `kept` tokens
        (a reopened block denoised again after its correction).
        `draft` (`(batch, B)`, the mask id where undecided) pre-commits tokens that correction may still retract.
        """
        s = self.s
        batch, size, device = ctx.batch_size, s.block_size, ctx.key_valid.device
        canvas = torch.full((batch, size), s.mask_token_id, dtype=torch.long, device=device)
        positions = torch.arange(size, device=device)
        if kept is not None:
            fixed = kept.to(device)[:, None]
            canvas = torch.where(positions < fixed, start, canvas)
        else:
            fixed = torch.full((batch, 1), 0 if start is None else start.shape[1], device=device)
            if start is not None:
                canvas[:, : start.shape[1]] = start
        todo = (positions < length) & (positions >= fixed)
        if draft is not None:
            drafted = todo & (draft != s.mask_token_id)
            canvas = torch.where(drafted, draft, canvas)
            todo &= ~drafted
        # the probability each token had when it was committed (a drafted token: unknown, 0; a fixed prefix: 1),
        # which `reopen_last_below` reads to decide whether the last block is worth a judging pass
        self.block_sure = ((positions < fixed) | (positions >= length)).float()
        revisable = (positions >= fixed) & (positions < length) & ~todo
        # with token shift a block's first token is read from the finished block before, which never sees this
        # block: nothing in the block can dispute it, so learned correction leaves it alone
        disputable = (positions > 0) | (not s.shift)
        budget = torch.full((batch,), s.remask_budget, dtype=torch.long, device=device)
        step = 0
        condition = None  # self-conditioning: what the last pass concluded at the masked positions, for the next
        latent = s.latent_steps if s.self_conditioning else 0
        while bool(todo.any()):
            last_step = s.max_steps_per_block is not None and step + 1 >= s.max_steps_per_block
            only_first = s.shift and s.use_cache and not bool(todo[:, 1:].any())
            if only_first and not (s.corrects and bool(revisable.any())):
                # only first positions left: the clean position before the block predicts them, no block forward
                first = self._reopen_previous(ctx, lambda: ctx.first_position_logits())
                if self.rewind is not None:  # the block before is to be denoised again first (`_rewind`)
                    return canvas
                logits = first[:, None].expand(-1, size, -1)
                checked = False
            else:
                logits = self._reopen_previous(ctx, lambda: ctx.block_logits(canvas, condition))
                if self.rewind is not None:
                    return canvas
                checked = True
            allowed = suppress_ids(logits, s.mask_token_id, s.vocab_size)
            tokens, confidence, probs = choose_tokens(allowed, s.temperature, s.top_k, s.top_p, self.generator,
                                                      return_probs=True)
            if latent and checked:  # a latent step: the pass only refines the conditioning, nothing is committed
                latent -= 1
                condition = self._conditioning(ctx, logits, canvas)
                self.step_counts.append(0)
                if self.trajectory is not None:
                    self._record(ctx, canvas, confidence, torch.zeros_like(todo), torch.zeros_like(todo))
                continue
            remask = torch.zeros_like(todo)
            edit = torch.zeros_like(todo)
            if s.corrects and checked and not last_step:
                now = allowed.float().softmax(-1)
                if s.edit_threshold is not None:  # learned: the model now says another token belongs here
                    best, proposal = now.max(-1)
                    disputed = select_disputes(best, revisable & disputable & (proposal != canvas),
                                               s.edit_threshold, budget)
                    budget -= disputed.sum(-1)
                    revisable &= ~disputed
                    if s.edit_action == "replace":
                        edit = disputed
                        canvas = torch.where(edit, proposal, canvas)
                        self.block_sure = torch.where(edit, best.to(self.block_sure.dtype), self.block_sure)
                        self.edited += int(edit.sum())
                    else:
                        remask = disputed
                if s.remask_threshold is not None:  # heuristic: the committed token lost the model's belief
                    current = now.gather(-1, canvas[..., None]).squeeze(-1)
                    low = select_remasks(current, revisable, s.remask_threshold, budget)
                    budget -= low.sum(-1)
                    revisable &= ~low
                    remask |= low
                canvas = torch.where(remask, s.mask_token_id, canvas)
                self.remasked += int(remask.sum())
            eligible = todo if last_step else sub_block_window(todo, s.sub_block_size)
            commit = todo.clone() if last_step else self._select(tokens, confidence, probs, eligible)
            canvas = torch.where(commit, tokens, canvas)
            self.block_sure = torch.where(commit, confidence.to(self.block_sure.dtype), self.block_sure)
            todo = (todo & ~commit) | remask
            revisable |= commit
            if s.self_conditioning and checked:
                condition = self._conditioning(ctx, logits, canvas)
            self.step_counts.append(int((commit & ~ctx.done[:, None]).sum()))
            if self.trajectory is not None:  # an edit is drawn as a retraction and a commit in one step
                self._record(ctx, canvas, confidence, commit | edit, remask | edit)
            step += 1
        return canvas

    def _conditioning(self, ctx: BlockContext, logits: torch.Tensor, canvas: torch.Tensor):
        """Self-conditioning for the next pass over this block: (rows, positions within the block, vectors) at the
        positions still masked, from the pass that gave `logits` (`(batch, B, vocab)`, index j predicting token j):
        the expected embedding of each prediction, or the pass's last hidden state at that position."""
        from llm2diff.modeling.self_conditioning import expected_embedding

        rows, cols = (canvas == self.s.mask_token_id).nonzero(as_tuple=True)
        if self.s.self_conditioning == "hidden":
            vectors = ctx.block_hidden[rows, cols].float()
        else:
            vectors = expected_embedding(logits[rows, cols], embedding_weight(self.model), self.s.mask_token_id,
                                         self.s.vocab_size)
        return rows, cols, vectors

    def _record(self, ctx: BlockContext, canvas, confidence, commit, remask, block: int | None = None) -> None:
        """Record a step for every original row (rows that left the batch show a masked, idle block)."""
        total = ctx.nfe_per_row.shape[0]

        def full(values, fill):
            out = torch.full((total, values.shape[1]), fill, dtype=values.dtype, device=values.device)
            out[ctx.rows] = values
            return out

        self.trajectory.record(block=ctx.num_blocks if block is None else block,
                               canvas=full(canvas, self.s.mask_token_id),
                               confidence=full(confidence, 0.0), committed=full(commit, False),
                               remasked=full(remask, False) if bool(remask.any()) else None)

    def _select(self, tokens, confidence, probs, eligible) -> torch.Tensor:
        """The commit rule: which eligible positions to commit this step."""
        s = self.s
        if s.commit_rule == "entropy":
            return entropy_bounded_commits(entropy_scores(probs), eligible, s.entropy_bound, s.tokens_per_step)
        value, priority, threshold = confidence, None, s.threshold
        if s.commit_rule == "margin":
            value = margin_scores(probs)
        elif s.commit_rule == "random":
            priority, threshold = random_priority(confidence.shape, confidence.device, self.generator), None
        elif s.commit_rule == "coarse_to_fine":
            priority = coarse_to_fine_priority(tokens, confidence, s.significance, s.significance_weight)
        return select_commits(value, eligible, s.tokens_per_step, threshold, priority, s.confidence_floor)

    # -- stopping ----------------------------------------------------------------------------------------------
    def _apply_stops(self, context, new_tokens, checked, produced, finished, num_new) -> torch.Tensor:
        """Mark rows that stopped (end-of-sequence or a stop string, `llm2diff.sampling.stops`) among the tokens
        after `checked` (the ones before were checked with the earlier blocks); pad everything after the stop."""
        finished = finished.clone()
        for row in range(new_tokens.shape[0]):
            if finished[row]:
                continue
            stop_at = self.stops.first_stop(context[row], new_tokens[row, :produced].tolist(), checked)
            if stop_at is not None:
                new_tokens[row, stop_at:produced] = self.s.pad_token_id
                num_new[row] = stop_at
                finished[row] = True
        return finished


def decode_block(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoding, response_prefix=None,
                 streamer=None):
    """The "block" decoder of `DiffusionLM.generate` (`llm2diff.sampling.decoders`): the KV-cached block sampler
    with the settings of `decoding`, on the model's weights (LoRA merged for the call with `merge_lora`)."""
    from llm2diff.sampling.output import GenerateOutput

    out = run_block_sampler(dlm, input_ids, attention_mask, decoding, response_prefix, streamer=streamer)
    return GenerateOutput(out.sequences, out.num_new_tokens, out.nfe, out.nfe_per_row, "block", decoding,
                          {"tokens_per_step": out.tokens_per_step, "remasked": out.remasked, "edited": out.edited,
                           "reopened": out.reopened}, out.trajectory)


def run_block_sampler(dlm, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoding, response_prefix=None,
                      draft=None, streamer=None) -> SamplerOutput:
    """The block sampler on `dlm` with the resolved `decoding` (a `DecodingConfig`), in eval mode with the trained
    token rows (and with `merge_lora` the LoRA) merged for the call; `draft` as `BlockSampler.generate` takes it."""
    import contextlib

    c = dlm.config
    if response_prefix is not None:
        if not isinstance(response_prefix, torch.Tensor) or response_prefix.dim() != 2 \
                or response_prefix.shape[0] != input_ids.shape[0]:
            raise ValueError("response_prefix must be a (batch, P) tensor of token ids, one row per prompt, all "
                             "rows of the same length (group rollouts by prefix length)")
        if bool((response_prefix == c.mask_token_id).any()):
            raise ValueError("response_prefix contains the mask token; give decided tokens only")
    significance = None
    if decoding.commit_rule == "coarse_to_fine":
        if dlm.significance is None:
            raise ValueError("commit_rule 'coarse_to_fine' needs the token significance table, which models trained "
                             "with a semantic_scorer save (significance.safetensors); this model has none: use "
                             "commit_rule 'confidence' or train with semantic_scorer set")
        significance = dlm.significance.to(dlm.device)
    d = decoding
    settings = SamplerSettings(
        block_size=c.block_size, mask_token_id=c.mask_token_id, eos_token_ids=dlm.eos_token_ids,
        pad_token_id=dlm.tokenizer.pad_token_id, vocab_size=c.vocab_size, shift=c.shift, causal_clean=c.causal_clean,
        max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
        threshold=d.threshold, tokens_per_step=d.tokens_per_step, stop_strings=d.stop_strings,
        use_cache=d.use_cache, seed=d.seed, commit_rule=d.commit_rule, significance=significance,
        significance_weight=d.significance_weight, confidence_floor=d.confidence_floor,
        entropy_bound=d.entropy_bound, sub_block_size=d.sub_block_size, max_steps_per_block=d.max_steps_per_block,
        remask_threshold=d.remask_threshold, remask_budget=d.correction_budget, edit_threshold=d.edit_threshold,
        edit_action=d.edit_action, reopen_threshold=d.reopen_threshold, reopen_budget=d.reopen_budget,
        reopen_last=d.reopen_last, reopen_last_below=d.reopen_last_below, reopen_tail=d.reopen_tail,
        self_conditioning=c.self_conditioning, latent_steps=d.latent_steps, fuse_commit=d.fuse_commit,
        drop_finished=d.drop_finished, static_cache=d.static_cache,
    )
    trajectory = None
    if d.record_trajectory:
        from llm2diff.sampling.trajectory import Trajectory

        trajectory = Trajectory(block_size=c.block_size, mask_token_id=c.mask_token_id, prompt_width=input_ids.shape[1])
    was_training = dlm.model.training
    dlm.model.eval()
    try:
        model = dlm.compiled_model() if d.compile else dlm.model
        sampler = BlockSampler(model, settings, dlm.tokenizer, streamer=streamer, trajectory=trajectory)
        merged = dlm.lora_merged() if d.merge_lora else contextlib.nullcontext()
        with dlm.trained_token_rows_merged(), merged:
            return sampler.generate(input_ids.to(dlm.device), attention_mask.to(dlm.device), response_prefix, draft)
    finally:
        dlm.model.train(was_training)
