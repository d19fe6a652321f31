"""The training layout `[prompt ; clean response ; noisy response]` (length P + 2R) and where each loss term reads.

    positions:  prompt 0..P-1 | clean response P..P+R-1 | noisy response P..P+R-1  (same ids in both copies)
    segments :  PROMPT        | CLEAN, blocks 0..n-1    | NOISY, blocks 0..n-1

One forward over this layout with `block_diffusion_mask` computes, for every noisy block at once, exactly what the
cached sampler computes block by block (prompt and earlier blocks clean, the current block noisy).

Token shift: the hidden state at position i-1 predicts token i. Inside a noisy block, token j (offset > 0) is read
from the noisy copy of token j-1; the block's first token is read from the clean copy of token j-1 (or the last
prompt token), because at inference that logit comes from the committed clean block.

With `block_size == 1` and shift, every token is the first of its block: the noisy copy is dropped and the layout
is the plain `[prompt ; response]` causal sequence, i.e. causal-LM SFT (the AR twin).

Packing (`pack_rows`): several examples' layouts side by side in one row, each `[prompt ; clean ; noisy]` whole.
Position ids restart at 0 for every example, `block` ids count on across the row (unique per row) and a `document`
index keeps attention inside each example. The per-response tensors (`target`, `noisy_index`, ...) keep one row per
*example*, in the original order, with `example_row` naming the packed row each example sits in; so the noise drawn
for a packed batch and its loss (normalisation included) are those of the same batch unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm2diff.modeling.attention import CLEAN, NOISY, PAD, PROMPT


@dataclass
class Layout:
    """A batch in the training layout (right-padded). Shapes: L = longest layout row, R = longest response;
    `rows` = layout rows, `batch` = examples (the same unless packed).

    input_ids: `(rows, L)` clean tokens everywhere (the noisy copy holds the clean response until noised).
    segment, block, position_ids: `(rows, L)`. `block` is unique within a row (it counts on across packed examples).
    noisy_index: `(batch, R)` layout index, in the example's row, of response token j in the copy that gets noised
        (-1 at padding).
    source_index: `(batch, R)` layout index, in the example's row, whose output predicts response token j (0 at
        padding).
    target: `(batch, R)` response token j (-100 at padding).
    response_block: `(batch, R)` block of response token j within its response, from 0 (-1 at padding).
    noisy_copy: False for the AR-twin layout (block size 1 with shift), where nothing is noised.
    block_size: the block size B the responses are padded to.
    scores: optional `(batch, R)` significance of each response token (semantic noise); 0 at padding.
    document: `(rows, L)` example index within its row (-1 at padding), or None when every row holds one example.
    example_row: `(batch,)` the row each example sits in, or None when example i is row i.
    clean_source_index: `(batch, R)` layout index, in the example's row, of the clean copy of response token j-1
        (the last prompt token for j = 0): where a causal clean stream predicts token j (the AR loss).
    causal_clean: the clean response reads itself causally (a model with `clean_attention: causal`).
    """

    input_ids: torch.Tensor
    segment: torch.Tensor
    block: torch.Tensor
    position_ids: torch.Tensor
    noisy_index: torch.Tensor
    source_index: torch.Tensor
    target: torch.Tensor
    response_block: torch.Tensor
    noisy_copy: bool
    block_size: int = 0
    scores: torch.Tensor | None = None
    document: torch.Tensor | None = None
    example_row: torch.Tensor | None = None
    clean_source_index: torch.Tensor | None = None
    causal_clean: bool = False

    @property
    def response_valid(self) -> torch.Tensor:
        return self.target != -100

    @property
    def rows(self) -> torch.Tensor:
        """`(batch,)` the layout row of each example."""
        if self.example_row is not None:
            return self.example_row
        return torch.arange(self.target.shape[0], device=self.target.device)

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """`(batch,)` prompt length of each example (the position id of its first response token)."""
        first = self.noisy_index[:, 0].clamp(min=0)
        return self.position_ids[self.rows, first]


def reblock(layout: Layout, block_size: int) -> Layout:
    """The same batch in the layout of a smaller block size that divides the layout's own (a block-size curriculum).

    Responses padded to whole blocks of B are whole blocks of any b dividing B, so only the block structure changes:
    each block splits into B / b blocks (ids stay unique and ordered within a row), and under token shift the first
    token of every new block reads the clean copy before it. Equal to `build_layout` at block size b for the same
    padded responses. At b = 1 with shift every token reads the clean stream (the AR loss), the noisy copy unused.
    """
    size = layout.block_size
    if block_size == size:
        return layout
    if not layout.noisy_copy or size % block_size:
        raise ValueError(f"cannot re-block a layout of block size {size} to {block_size}: the block size must "
                         "divide the layout's own (and the layout must have a noisy copy)")
    split = size // block_size
    valid = layout.target != -100
    j = torch.arange(layout.target.shape[1], device=layout.target.device).expand_as(layout.target)
    response_block = torch.where(valid, j // block_size, -1)
    clean_index = layout.clean_source_index + 1
    rows = layout.rows[:, None].expand_as(j)
    block = layout.block.clone()
    for index in (clean_index, layout.noisy_index):  # old id B-block k -> k * split + (j % B) // b
        old = layout.block[rows[valid], index[valid]]
        block[rows[valid], index[valid]] = old * split + (j[valid] % size) // block_size
    source_index = layout.source_index
    shift = bool((layout.source_index != layout.noisy_index)[valid].any())  # without shift each token reads itself
    if shift:  # the first token of each new block reads the clean copy of the token before it
        first = (j % block_size) == 0
        source_index = torch.where(valid, torch.where(first, clean_index - 1, layout.noisy_index - 1), 0)
    return Layout(**{**vars(layout), "block": block, "response_block": response_block, "source_index": source_index,
                     "block_size": block_size})


def parse_block_size_schedule(text: str | None, block_size: int) -> list[tuple[float, int]]:
    """`"2:0.25,4:0.5"` -> [(0.25, 2), (0.5, 4)]: block size 2 until 25% of the training steps, 4 until 50%, then
    `block_size`. Each size must divide `block_size`; the fractions must rise within (0, 1]."""
    if not text:
        return []
    phases = []
    for part in str(text).split(","):
        size, _, until = part.strip().partition(":")
        try:
            phases.append((float(until), int(size)))
        except ValueError:
            raise ValueError(f"block_size_schedule entry {part.strip()!r} is not 'size:fraction' (e.g. "
                             "'2:0.25,4:0.5': block size 2 for the first 25% of the steps, 4 until 50%, then "
                             "block_size)") from None
    for (until, size), (before, _) in zip(phases, [(0.0, 0), *phases]):
        if not before < until <= 1.0:
            raise ValueError(f"block_size_schedule fractions must rise within (0, 1], got {text!r}")
        if size < 1 or block_size % size:
            raise ValueError(f"block_size_schedule size {size} must divide block_size {block_size} (a response "
                             "padded to whole blocks of block_size is then whole blocks of it too)")
    return phases


def scheduled_block_size(phases: list[tuple[float, int]], block_size: int, step: int, max_steps: int) -> int:
    """The block size a curriculum trains with at optimizer step `step` (0-based) of `max_steps`."""
    for until, size in phases:
        if step < until * max_steps:
            return size
    return block_size


def pad_response_to_blocks(response: list[int], block_size: int, eos_id: int) -> list[int]:
    """End the response with end-of-sequence and pad it with more of them to a whole number of blocks."""
    response = list(response)
    if not response or response[-1] != eos_id:
        response.append(eos_id)
    remainder = len(response) % block_size
    if remainder:
        response.extend([eos_id] * (block_size - remainder))
    return response


def layout_length(prompt_len: int, response_len: int, block_size: int, shift: bool = True) -> int:
    """Tokens one example takes in the layout: P + 2R, or P + R for the AR twin (no noisy copy)."""
    return prompt_len + (1 if shift and block_size == 1 else 2) * response_len


def pack_rows(lengths: list[int], capacity: int) -> list[int]:
    """Assign examples to packed rows, first-fit decreasing: each row holds whole examples whose layout lengths add
    up to at most `capacity`; an example longer than `capacity` gets a row to itself. Returns each example's row."""
    rows, room = [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            fit = len(room)
            room.append(max(capacity, lengths[i]))
        room[fit] -= lengths[i]
        rows[i] = fit
    return rows


def build_layout(
    prompts: list[list[int]], responses: list[list[int]], block_size: int, pad_id: int, shift: bool = True,
    scores: list[list[float]] | None = None, rows: list[int] | None = None, causal_clean: bool = False,
) -> Layout:
    """Build the training layout for a batch. Responses must already be padded to whole blocks.

    `scores` (optional) gives each response token's significance, one list per response of the same length.
    `rows` (optional) packs the batch: example i goes into layout row `rows[i]`, after the earlier examples of that
    row (see `pack_rows`). Without it every example has its own row. `causal_clean`: the clean response is read
    causally (recorded on the layout; the attention mask follows it).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("build_layout needs the same, non-zero number of prompts and responses")
    noisy_copy = not (shift and block_size == 1)
    for p, r in zip(prompts, responses):
        if not p:
            raise ValueError("every example needs a non-empty prompt")
        if len(r) % block_size:
            raise ValueError(f"response length {len(r)} is not a multiple of block_size={block_size}")
    copies = 2 if noisy_copy else 1
    packed = rows is not None
    if rows is None:
        rows = list(range(len(prompts)))
    if len(rows) != len(prompts) or min(rows) < 0:
        raise ValueError(f"rows must give a row >= 0 for each of the {len(prompts)} examples, got {rows}")
    num_rows = max(rows) + 1
    starts, used, blocks_used = [], [0] * num_rows, [0] * num_rows
    for row, p, r in zip(rows, prompts, responses):
        starts.append((used[row], blocks_used[row]))
        used[row] += len(p) + copies * len(r)
        blocks_used[row] += len(r) // block_size
    length = max(used)
    max_resp = max(len(r) for r in responses)
    batch = len(prompts)

    input_ids = torch.full((num_rows, length), pad_id, dtype=torch.long)
    segment = torch.full((num_rows, length), PAD, dtype=torch.long)
    block = torch.full((num_rows, length), -1, dtype=torch.long)
    position_ids = torch.zeros((num_rows, length), dtype=torch.long)
    document = torch.full((num_rows, length), -1, dtype=torch.long)
    noisy_index = torch.full((batch, max_resp), -1, dtype=torch.long)
    source_index = torch.zeros((batch, max_resp), dtype=torch.long)
    clean_source_index = torch.zeros((batch, max_resp), dtype=torch.long)
    target = torch.full((batch, max_resp), -100, dtype=torch.long)
    response_block = torch.full((batch, max_resp), -1, dtype=torch.long)
    docs_in_row = [0] * num_rows

    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        row, (start, first_block) = rows[b], starts[b]
        p, r = len(prompt), len(response)
        resp = torch.tensor(response, dtype=torch.long)
        j = torch.arange(r)
        blocks = j // block_size
        input_ids[row, start:start + p] = torch.tensor(prompt, dtype=torch.long)
        segment[row, start:start + p] = PROMPT
        position_ids[row, start:start + p] = torch.arange(p)
        clean = slice(start + p, start + p + r)
        input_ids[row, clean], segment[row, clean], block[row, clean] = resp, CLEAN, first_block + blocks
        position_ids[row, clean] = p + j
        clean_idx = start + p + j
        if noisy_copy:
            noisy = slice(start + p + r, start + p + 2 * r)
            input_ids[row, noisy], segment[row, noisy], block[row, noisy] = resp, NOISY, first_block + blocks
            position_ids[row, noisy] = p + j
            noisy_idx = start + p + r + j
        else:
            noisy_idx = clean_idx
        document[row, start:start + p + copies * r] = docs_in_row[row]
        docs_in_row[row] += 1
        if shift:
            first_of_block = (j % block_size) == 0
            source = torch.where(first_of_block, clean_idx - 1, noisy_idx - 1)
        else:
            source = noisy_idx
        noisy_index[b, :r], source_index[b, :r] = noisy_idx, source
        clean_source_index[b, :r] = clean_idx - 1
        target[b, :r], response_block[b, :r] = resp, blocks

    score_tensor = None
    if scores is not None:
        score_tensor = torch.zeros((batch, max_resp), dtype=torch.float)
        for b, (values, response) in enumerate(zip(scores, responses)):
            if len(values) != len(response):
                raise ValueError(f"example {b}: {len(values)} significance scores for {len(response)} response tokens")
            score_tensor[b, : len(values)] = torch.tensor(values, dtype=torch.float)
    return Layout(input_ids, segment, block, position_ids, noisy_index, source_index, target, response_block,
                  noisy_copy, block_size, score_tensor, document=document if packed else None,
                  example_row=torch.tensor(rows, dtype=torch.long) if packed else None,
                  clean_source_index=clean_source_index, causal_clean=causal_clean)
