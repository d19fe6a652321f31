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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm2diff.modeling.attention import CLEAN, NOISY, PAD, PROMPT


@dataclass
class Layout:
    """A batch in the training layout (right-padded). Shapes: L = longest layout, R = longest response.

    input_ids: `(batch, L)` clean tokens everywhere (the noisy copy holds the clean response until noised).
    segment, block, position_ids: `(batch, L)`.
    noisy_index: `(batch, R)` layout index of response token j in the copy that gets noised (-1 at padding).
    source_index: `(batch, R)` layout index whose output predicts response token j (0 at padding).
    target: `(batch, R)` response token j (-100 at padding).
    response_block: `(batch, R)` block of response token j (-1 at padding).
    noisy_copy: False for the AR-twin layout (block size 1 with shift), where nothing is noised.
    block_size: the block size B the responses are padded to.
    scores: optional `(batch, R)` significance of each response token (semantic noise); 0 at padding.
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

    @property
    def response_valid(self) -> torch.Tensor:
        return self.target != -100


def pad_response_to_blocks(response: list[int], block_size: int, eos_id: int) -> list[int]:
    """End the response with end-of-sequence and pad it with more of them to a whole number of blocks."""
    response = list(response)
    if not response or response[-1] != eos_id:
        response.append(eos_id)
    remainder = len(response) % block_size
    if remainder:
        response.extend([eos_id] * (block_size - remainder))
    return response


def build_layout(
    prompts: list[list[int]], responses: list[list[int]], block_size: int, pad_id: int, shift: bool = True,
    scores: list[list[float]] | None = None,
) -> Layout:
    """Build the training layout for a batch. Responses must already be padded to whole blocks.

    `scores` (optional) gives each response token's significance, one list per response of the same length.
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
    length = max(len(p) + copies * len(r) for p, r in zip(prompts, responses))
    max_resp = max(len(r) for r in responses)
    batch = len(prompts)

    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    segment = torch.full((batch, length), PAD, dtype=torch.long)
    block = torch.full((batch, length), -1, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    noisy_index = torch.full((batch, max_resp), -1, dtype=torch.long)
    source_index = torch.zeros((batch, max_resp), dtype=torch.long)
    target = torch.full((batch, max_resp), -100, dtype=torch.long)
    response_block = torch.full((batch, max_resp), -1, dtype=torch.long)

    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        p, r = len(prompt), len(response)
        resp = torch.tensor(response, dtype=torch.long)
        j = torch.arange(r)
        blocks = j // block_size
        input_ids[b, :p] = torch.tensor(prompt, dtype=torch.long)
        segment[b, :p] = PROMPT
        position_ids[b, :p] = torch.arange(p)
        clean = slice(p, p + r)
        input_ids[b, clean], segment[b, clean], block[b, clean] = resp, CLEAN, blocks
        position_ids[b, clean] = p + j
        clean_idx = p + j
        if noisy_copy:
            noisy = slice(p + r, p + 2 * r)
            input_ids[b, noisy], segment[b, noisy], block[b, noisy] = resp, NOISY, blocks
            position_ids[b, noisy] = p + j
            noisy_idx = p + r + j
        else:
            noisy_idx = clean_idx
        if shift:
            first_of_block = (j % block_size) == 0
            source = torch.where(first_of_block, clean_idx - 1, noisy_idx - 1)
        else:
            source = noisy_idx
        noisy_index[b, :r], source_index[b, :r] = noisy_idx, source
        target[b, :r], response_block[b, :r] = resp, blocks

    score_tensor = None
    if scores is not None:
        score_tensor = torch.zeros((batch, max_resp), dtype=torch.float)
        for b, (row, response) in enumerate(zip(scores, responses)):
            if len(row) != len(response):
                raise ValueError(f"example {b}: {len(row)} significance scores for {len(response)} response tokens")
            score_tensor[b, : len(row)] = torch.tensor(row, dtype=torch.float)
    return Layout(input_ids, segment, block, position_ids, noisy_index, source_index, target, response_block,
                  noisy_copy, block_size, score_tensor)
