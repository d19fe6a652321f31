"""`GenerateOutput`: what `DiffusionLM.generate` returns, whichever decoder ran.

    out = dlm.generate(input_ids)
    out.sequences, out.num_new_tokens, out.nfe      # every mode
    out.mode, out.decoding                          # which decoder ran, with exactly which settings
    out.stats["accepted_lengths"]                   # what only some decoders measure (see below)

`stats` holds the decoder's own measurements: the block sampler's `tokens_per_step` (tokens committed at each
step) and `remasked` (tokens retracted by correction); verified decoding's `accepted_lengths` / `drafted_lengths`
(denoised tokens kept / checked per verify pass); lossless mode's `nfe_draft` / `nfe_verify` (passes of the
adapted model / of the AR parent), `accepted_lengths` (draft tokens accepted per verification round),
`parent_steps` and `prompt_passes`. They read as attributes too (`out.nfe_draft`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenerateOutput:
    """One decoding's result.

    sequences: `(batch, prompt_len + new)` prompt plus new tokens, pad after a row stopped.
    num_new_tokens: `(batch,)` tokens generated per row, end-of-sequence included, padding excluded.
    nfe: forward passes (of the batch for the block sampler; summed over rows and models for the others).
    nfe_per_row: `(batch,)` passes made while each row was generating (None where a decoder does not count them).
    mode: the decoder that ran ("block", "verified", "lossless").
    decoding: the resolved `DecodingConfig` it ran with.
    stats: the decoder's own measurements (module docstring).
    trajectory: every denoising step, when `record_trajectory` was set (block sampler).
    """

    sequences: torch.Tensor
    num_new_tokens: torch.Tensor
    nfe: int
    nfe_per_row: torch.Tensor | None = None
    mode: str = "block"
    decoding: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    trajectory: object | None = None

    def __getattr__(self, name: str) -> Any:
        stats = self.__dict__.get("stats")
        if stats is not None and name in stats:
            return stats[name]
        raise AttributeError(f"{type(self).__name__} of a {self.__dict__.get('mode', '?')} decoding has no "
                             f"{name!r} (its stats: {sorted(stats or {})})")

    @property
    def steps(self) -> int:
        """Denoising steps of the block sampler."""
        return len(self.stats.get("tokens_per_step", []))

    @property
    def acceptance_rate(self) -> float:
        """Verified decoding: kept over checked denoised tokens."""
        return sum(self.stats["accepted_lengths"]) / max(1, sum(self.stats["drafted_lengths"]))

    @property
    def mean_accepted_length(self) -> float:
        """Lossless mode: draft tokens accepted per verification round."""
        lengths = self.stats["accepted_lengths"]
        return sum(lengths) / max(1, len(lengths))
