"""Collation into the training layout: pads each response with end-of-sequence to whole blocks, builds the batch.

The collator is deterministic; noise is drawn in the trainer's `compute_loss`, under the trainer's seed. Rows with
a `response_scores` column (semantic noise) carry their significance scores along; the end-of-sequence tokens
added as block padding rank below every real token of the row (they are masked first and generated last).

With `packing`, the batch's examples are packed into as few layout rows as fit `max_length` tokens each (see
`llm2diff.training.layout.pack_rows`); the batch still holds the same examples, so the loss is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm2diff.training.layout import (
    build_layout,
    layout_length,
    pack_rows,
    pad_response_to_blocks,
)


@dataclass
class BlockDiffusionCollator:
    """Turns rows `{"prompt_ids": [...], "response_ids": [...]}` into a `Layout` dict of tensors."""

    block_size: int
    eos_token_id: int
    pad_token_id: int
    shift: bool = True
    packing: bool = False
    max_length: int | None = None  # layout tokens per packed row (a longer example keeps a row to itself)
    causal_clean: bool = False  # the model reads clean blocks causally (clean_attention: causal)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [k for k in ("prompt_ids", "response_ids") if k not in features[0]]
        if missing:
            raise ValueError(f"training rows need prompt_ids and response_ids; missing {missing} "
                             f"(columns present: {sorted(features[0])})")
        prompts = [list(f["prompt_ids"]) for f in features]
        responses = [pad_response_to_blocks(f["response_ids"], self.block_size, self.eos_token_id) for f in features]
        scores = None
        if "response_scores" in features[0]:
            scores = [_pad_scores(list(f["response_scores"]), len(r)) for f, r in zip(features, responses)]
        rows = None
        if self.packing:
            lengths = [layout_length(len(p), len(r), self.block_size, self.shift) for p, r in zip(prompts, responses)]
            rows = pack_rows(lengths, self.max_length or max(lengths))
        layout = build_layout(prompts, responses, self.block_size, self.pad_token_id, self.shift, scores, rows,
                              causal_clean=self.causal_clean)
        fields = vars(layout)
        # A per-example tensor first: the Trainer reads the batch size off the first tensor (eval loss averaging).
        return {"target": fields.pop("target"), **fields}


def _pad_scores(scores: list[float], length: int) -> list[float]:
    """Extend a row's scores to its padded response: the added end-of-sequence tokens rank lowest."""
    low = (min(scores) if scores else 0.0) - 1.0
    return scores + [low] * (length - len(scores))
