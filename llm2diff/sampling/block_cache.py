"""The block sampler's view of the sequence: the prompt and the committed blocks, cached block by block.

`BlockContext` prefills the prompt once, appends each committed block's exact keys/values (fused with the next
block's first denoising pass), runs a noisy block against the cache and crops it off again, drops finished rows,
and without a cache recomputes the whole sequence with the block-diffusion mask instead. The block sampler
(`llm2diff.sampling.sampler`), lossless mode's drafter and the tests of training = inference use it.
"""

from __future__ import annotations

import contextlib

import torch

from llm2diff.compat import cache_kwargs
from llm2diff.modeling.attention import (
    CLEAN,
    NOISY,
    PAD,
    PROMPT,
    block_diffusion_mask,
    cached_block_mask,
    to_additive_mask,
)
from llm2diff.modeling.lora import embedding_weight


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def uses_flash_attention(model) -> bool:
    """True when the model runs a FlashAttention kernel (no 4D masks: blocks attend through `is_causal=False`)."""
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    return "flash" in implementation


def prompt_fusion_pays(input_ids: torch.Tensor) -> bool:
    """Whether to run the prompt's prefill inside the first block's pass (`BlockContext(fuse_prompt=True)`): on a
    CPU, where a pass has a fixed cost of its own. On a GPU the prefill stays apart, so that SDPA reads the prompt
    with its causal kernel instead of a dense mask over prompt and block."""
    return input_ids.device.type == "cpu"


class BlockContext:
    """The prompt and the committed blocks, as seen by the block being denoised.

    With a cache, the prompt is prefilled once and each committed block appends its exact keys/values; a denoising
    forward appends the noisy block's keys/values and crops them off again. A committed block waits (`pending`)
    and rides along with the next denoising forward (`fuse=True`), or runs alone when nothing follows it. Without
    a cache, every call recomputes the whole sequence with the block-diffusion mask. All give the same predictions.

    On FlashAttention the block passes use no 4D mask: the new block attends to the whole (unpadded) cache and to
    itself with `is_causal=False`, which is exactly the block rule; fusion is then off (it needs a block-causal mask).

    `causal_clean` (a model trained with `clean_attention: causal`): a committed block reads itself causally in the
    pass that appends it (on FlashAttention through `is_causal=True`), as the training layout's clean stream does.

    `fuse_prompt=True` defers the prompt's prefill as well: the first denoising forward runs [prompt ; first noisy
    block] in one pass (one mask: the prompt causal, the block sees the prompt and itself), one pass fewer per
    generation. The block sampler and lossless mode's drafter use it on a CPU (`prompt_fusion_pays`); the prompt's
    keys/values differ from a separate prefill's by float rounding only. Not with a static cache (its masks are
    padded to the slots) or FlashAttention (no fusion there).
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, block_size: int,
                 shift: bool = True, use_cache: bool = True, fuse: bool = True, static_length: int | None = None,
                 causal_clean: bool = False, fuse_prompt: bool = False, keep_hidden: bool = False):
        self.model, self.block_size, self.shift, self.use_cache = model, block_size, shift, use_cache
        self.keep_hidden = keep_hidden  # keep each block pass's last hidden states (self-conditioning 'hidden')
        self.block_hidden: torch.Tensor | None = None  # `(batch, B, hidden)` of the last block pass
        self.causal_clean = causal_clean
        self.flash = uses_flash_attention(model) and static_length is None
        self.static_length = static_length  # a fixed-size cache of this many slots (masks padded to it)
        self.fuse = fuse and use_cache and not self.flash
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.prompt_lens = attention_mask.long().sum(-1)
        self.dtype = embedding_weight(model).dtype
        self.nfe = 0
        self.rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # original row of each batch row
        self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # finished, riding
        self.nfe_per_row = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        self.num_blocks = 0
        self.generated = input_ids[:, :0]
        self.key_valid = attention_mask.bool()
        self.cache = None
        self.prompt_pending = False  # the prompt's prefill deferred to the first denoising forward (fuse_prompt)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (clean block, its positions), not yet run
        self.last_logits = None  # the clean position before the current block predicts its first token (shift)
        self.last_block_first_logits = None  # what `last_logits` was before the last committed block's pass ran
        # learned correction of finished blocks (`reopen`): with `judge` on, the pass that appends a committed block
        # keeps its predictions of that block's own tokens (`judged`, `(batch, B, vocab)`, index j predicting token
        # j; with shift index 0 is not a reading of the block), as the training layout's noisy copy reads a fully
        # visible block; a block-attention clean block is exactly that. A causal clean block (clean_attention:
        # causal) is the model's AR stream instead: index j is its prediction of token j from the tokens before it
        self.judge = False
        self.judged: torch.Tensor | None = None
        self.unread = False  # without a cache: the last committed block has not been read by a pass yet
        if use_cache:
            from transformers import DynamicCache

            if static_length is not None:
                from llm2diff.sampling.static_cache import BlockStaticCache

                self.cache = BlockStaticCache(config=model.config, max_cache_len=static_length)
            else:
                self.cache = DynamicCache(config=model.config)
            self.prompt_pending = True
            if not (fuse_prompt and self.fuse and static_length is None):  # the static cache pads its masks
                self._prefill()

    def _prefill(self) -> None:
        """The prompt's pass on its own: its keys/values cached, the logits predicting the first block's first token."""
        self.prompt_pending = False
        positions = _left_padded_positions(self.attention_mask)
        self.last_logits = self._forward(self.input_ids, self.attention_mask, positions, self.cache, keep=1)[:, -1]

    def _prompt_and_block_forward(self, canvas: torch.Tensor) -> torch.Tensor:
        """[prompt ; noisy first block] in one pass over the empty cache (`fuse_prompt`); the block's keys/values
        are cropped off again. Returns the logits of the prompt's last position and of the block."""
        self.prompt_pending = False
        batch, prompt_len = self.input_ids.shape
        device, size = canvas.device, self.block_size
        segment = torch.cat([torch.where(self.attention_mask.bool(), PROMPT, PAD),
                             torch.full((batch, size), NOISY, device=device)], dim=1)
        block = torch.cat([torch.full((batch, prompt_len), -1, device=device),
                           torch.zeros((batch, size), dtype=torch.long, device=device)], dim=1)
        mask = to_additive_mask(block_diffusion_mask(segment, block, causal_clean=self.causal_clean), self.dtype)
        positions = torch.cat([_left_padded_positions(self.attention_mask), self._block_positions()], dim=1)
        logits = self._forward(torch.cat([self.input_ids, canvas], dim=1), mask, positions, self.cache,
                               keep=size + 1)
        self.cache.crop(-size)
        return logits

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    def _forward(self, input_ids, attention_mask, position_ids, cache=None, keep: int = 0, **kwargs) -> torch.Tensor:
        """One model pass; `keep` > 0 computes the LM head on the last `keep` positions only."""
        self.nfe += 1
        self.nfe_per_row[self.rows[~self.done]] += 1
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=cache is not None, logits_to_keep=keep, **cache_kwargs(cache), **kwargs).logits

    def _block_forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: int, blocks: int = 1,
                       clean: int = 0) -> torch.Tensor:
        """Run `blocks` consecutive new blocks against the cache (block-causal among them; the first `clean` of them
        committed blocks); keys/values appended."""
        causal_blocks = clean if self.causal_clean else 0
        if self.flash:  # one block at a time here (no fusion): a clean one causal or block-wide, a noisy one block-wide
            keys = torch.cat([self.key_valid, torch.ones_like(ids, dtype=torch.bool)], dim=1).long()
            return self._forward(ids, keys, positions, self.cache, keep=keep, is_causal=bool(causal_blocks))
        mask = cached_block_mask(self.key_valid, ids.shape[1], self.dtype, block_size=ids.shape[1] // blocks,
                                 causal_blocks=causal_blocks)
        if self.static_length is not None:  # attention spans every slot; the unwritten and stale ones are masked
            mask = torch.nn.functional.pad(mask, (0, self.static_length - mask.shape[-1]),
                                           value=torch.finfo(self.dtype).min)
        return self._forward(ids, mask, positions, self.cache, keep=keep)

    def _block_positions(self) -> torch.Tensor:
        offsets = self.num_blocks * self.block_size + torch.arange(self.block_size, device=self.prompt_lens.device)
        return self.prompt_lens[:, None] + offsets

    def flush(self) -> None:
        """Run a pending committed block (or a deferred prompt) on its own (appends its keys/values, sets the next
        first-token logits)."""
        if self.use_cache and self.prompt_pending:
            self._prefill()
        if self.pending is None:
            return
        block, positions = self.pending
        self.pending = None
        size = self.block_size
        logits = self._block_forward(block, positions, keep=size if self.judge else 1, clean=1)
        self.last_block_first_logits, self.last_logits = self.last_logits, logits[:, -1]
        if self.judge:
            self.judged = self._judged(logits)
        self.key_valid = torch.cat([self.key_valid, torch.ones_like(block, dtype=torch.bool)], dim=1)

    def first_position_logits(self) -> torch.Tensor | None:
        """With shift and a cache: the logits predicting the current block's first token (runs a pending commit)."""
        if not (self.shift and self.use_cache):
            return None
        self.flush()
        return self.last_logits

    def block_logits(self, canvas: torch.Tensor, condition: tuple | None = None) -> torch.Tensor:
        """`(batch, B, vocab)` predictions for every position of the current block, given its noisy `canvas`.

        `condition` (self-conditioning, `(rows, positions within the block, vectors)`): what the previous pass over
        this block concluded at its masked positions, added to their input embeddings in this pass (the block is
        the last B positions of every pass that runs it). With `keep_hidden` the pass's last hidden states at the
        block's positions are kept in `block_hidden`."""
        from llm2diff.modeling.self_conditioning import (
            capture_last_hidden,
            self_conditioned,
        )

        rows, cols, vectors = condition if condition is not None else (None, None, None)
        hidden = capture_last_hidden(self.model) if self.keep_hidden else contextlib.nullcontext()
        with self_conditioned(self.model, rows, None if cols is None else cols - self.block_size, vectors), \
                hidden as kept:
            logits = self._block_logits(canvas)
        if self.keep_hidden:
            self.block_hidden = kept.value[:, -self.block_size:]
        return logits

    def _block_logits(self, canvas: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:
            return self._recompute(canvas)
        size = self.block_size
        if self.prompt_pending:  # fused: [prompt ; first noisy block] in one pass
            logits = self._prompt_and_block_forward(canvas)
            self.last_logits, logits = logits[:, 0], logits[:, 1:]
        elif self.pending is not None:  # fused: [pending clean block ; this noisy block] in one pass
            block, positions = self.pending
            self.pending = None
            logits = self._block_forward(torch.cat([block, canvas], dim=1),
                                         torch.cat([positions, self._block_positions()], dim=1),
                                         keep=2 * size if self.judge else size + 1, blocks=2, clean=1)
            self.cache.crop(-size)
            self.key_valid = torch.cat([self.key_valid, torch.ones_like(block, dtype=torch.bool)], dim=1)
            if self.judge:
                self.judged = self._judged(logits[:, :size])
                logits = logits[:, size - 1 :]
            self.last_block_first_logits = self.last_logits
            self.last_logits, logits = logits[:, 0], logits[:, 1:]
        else:
            logits = self._block_forward(canvas, self._block_positions(), keep=size)
            self.cache.crop(-size)
        if self.shift:
            return torch.cat([self.last_logits[:, None], logits[:, :-1]], dim=1)
        return logits

    def _judged(self, block_logits: torch.Tensor) -> torch.Tensor:
        """A committed block's own `(batch, B, vocab)` logits, aligned so index j predicts the block's token j."""
        if self.shift or self.causal_clean:  # position j - 1 predicts token j (a causal stream: from the tokens
            # before it); nothing in the block predicts its first token
            return torch.cat([torch.full_like(block_logits[:, :1], float("nan")), block_logits[:, :-1]], dim=1)
        return block_logits

    def reopen(self, block: torch.Tensor) -> None:
        """Replace the last committed block (already appended) by `block`: its keys/values come off the cache and
        it is appended again by the next pass, as a newly committed block would be."""
        size = self.block_size
        if self.pending is not None or self.num_blocks == 0:
            raise RuntimeError("reopen needs a committed block whose keys/values are already in the cache")
        self.generated = torch.cat([self.generated[:, :-size], block], dim=1)
        self.judged = None
        self.unread = True
        if self.use_cache:
            self.cache.crop(-size)
            self.key_valid = self.key_valid[:, :-size]
            self.pending = (block, self._block_positions() - size)
            self.last_logits = self.last_block_first_logits  # as before the block's pass, which runs again

    def pop(self, last_logits: torch.Tensor | None) -> None:
        """Take the last committed block back off (its keys/values come off the cache), so that another block can be
        committed in its place: backtracking in a search. `last_logits` are the first-position logits from before
        that block was committed (`self.last_logits` then; `last_block_first_logits` keeps them after the block's
        pass). Needs the block's pass to have run (no pending fused commit)."""
        size = self.block_size
        if self.num_blocks == 0 or self.pending is not None:
            raise RuntimeError("pop needs a committed block whose keys/values are already in the cache")
        self.generated = self.generated[:, :-size]
        self.num_blocks -= 1
        self.judged = None
        if self.use_cache:
            self.cache.crop(-size)
            self.key_valid = self.key_valid[:, :-size]
            self.last_logits = last_logits

    def commit(self, block: torch.Tensor, run_model: bool = True) -> None:
        """Append a clean block. With a cache its keys/values are stored by one forward: right away, or (with
        fusion) together with the next block's first denoising step. `run_model=False` skips it (the last block)."""
        if self.use_cache and run_model:
            self.flush()
            self.pending = (block, self._block_positions())
            if not self.fuse:
                self.flush()
        self.generated = torch.cat([self.generated, block], dim=1)
        self.num_blocks += 1
        self.unread = True

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows `keep` (indices into the current batch): finished rows leave the batch."""
        if self.cache is not None:
            self.cache.batch_select_indices(keep)
        self.rows, self.done = self.rows[keep], self.done[keep]
        self.prompt_lens, self.key_valid = self.prompt_lens[keep], self.key_valid[keep]
        self.input_ids, self.attention_mask, self.generated = (
            self.input_ids[keep], self.attention_mask[keep], self.generated[keep])
        if self.last_logits is not None:
            self.last_logits = self.last_logits[keep]
        if self.last_block_first_logits is not None:
            self.last_block_first_logits = self.last_block_first_logits[keep]
        if self.pending is not None:
            self.pending = (self.pending[0][keep], self.pending[1][keep])

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
        mask = to_additive_mask(block_diffusion_mask(segment, block, causal_clean=self.causal_clean), self.dtype)
        judge = self.judge and done >= size and self.unread
        self.unread = False
        logits = self._forward(ids, mask, positions, keep=2 * size + 1 if judge else size + 1)
        if judge:  # the last committed block read in the same pass (index 0: the position before it)
            self.judged = self._judged(logits[:, 1 : size + 1]) if not (self.shift or self.causal_clean) else \
                torch.cat([torch.full_like(logits[:, :1], float("nan")), logits[:, 1:size]], dim=1)
            logits = logits[:, size:]
        return logits[:, :-1] if self.shift else logits[:, 1:]
