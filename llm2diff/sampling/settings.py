"""`SamplerSettings`: the knobs of one block-sampler call, checked once (`DecodingConfig` resolves them for a model).

`check_sampling_values` is the range check every decoder shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm2diff.sampling.rules import COMMIT_RULES, DEFAULT_THRESHOLD, NO_THRESHOLD


@dataclass
class SamplerSettings:
    """The knobs of one `generate` call (resolved against the model's defaults)."""

    block_size: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None = None
    shift: bool = True
    causal_clean: bool = False  # committed blocks read themselves causally (a model with clean_attention: causal)
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
    entropy_bound: float = 1.0
    sub_block_size: int | None = None
    max_steps_per_block: int | None = None
    remask_threshold: float | None = None
    remask_budget: int = 0
    edit_threshold: float | None = None
    edit_action: str = "replace"
    reopen_threshold: float | None = None
    reopen_budget: int = 2
    reopen_last: bool = False
    reopen_last_below: float | None = None
    reopen_tail: str = "keep"  # or "redenoise": a reopened block's tokens after the correction denoised again
    self_conditioning: str | None = None  # what a pass carries to the next at masked positions (the model's kind)
    latent_steps: int = 0
    fuse_commit: bool = True
    drop_finished: bool = True
    static_cache: bool = False

    def __post_init__(self) -> None:
        check_sampling_values(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              threshold=self.threshold, tokens_per_step=self.tokens_per_step)
        if self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"commit_rule must be one of {', '.join(COMMIT_RULES)}, got {self.commit_rule!r}")
        if self.commit_rule == "coarse_to_fine" and self.significance is None:
            raise ValueError("commit_rule 'coarse_to_fine' needs a token significance table")
        if self.commit_rule == "threshold" and self.threshold is None:
            self.threshold = DEFAULT_THRESHOLD
        if self.confidence_floor is not None and not 0.0 <= self.confidence_floor <= 1.0:
            raise ValueError(f"confidence_floor must be in [0, 1], got {self.confidence_floor}")
        if self.entropy_bound < 0:
            raise ValueError(f"entropy_bound must be >= 0 (nats), got {self.entropy_bound}")
        if self.sub_block_size is not None and (self.sub_block_size < 1 or self.block_size % self.sub_block_size):
            raise ValueError(f"sub_block_size must divide the block size {self.block_size}, got {self.sub_block_size}")
        if self.max_steps_per_block is not None and self.max_steps_per_block < 1:
            raise ValueError(f"max_steps_per_block must be >= 1, got {self.max_steps_per_block}")
        if self.remask_threshold is not None and not 0.0 < self.remask_threshold < 1.0:
            raise ValueError(f"remask_threshold must be in (0, 1), got {self.remask_threshold}")
        if self.remask_budget < 0:
            raise ValueError(f"remask_budget must be >= 0, got {self.remask_budget}")
        if self.static_cache and not self.use_cache:
            raise ValueError("static_cache needs use_cache=True")
        if self.static_cache:
            self.drop_finished = False  # a static cache keeps its batch shape
        if self.remask_threshold is not None and self.remask_budget == 0:
            raise ValueError("remask_threshold is set but remask_budget is 0: give a budget of remasks per block "
                             "(e.g. 2), or unset remask_threshold")
        if self.edit_threshold is not None and not 0.0 < self.edit_threshold < 1.0:
            raise ValueError(f"edit_threshold must be in (0, 1), got {self.edit_threshold}")
        if self.edit_action not in ("replace", "remask"):
            raise ValueError(f"edit_action must be 'replace' or 'remask', got {self.edit_action!r}")
        if self.edit_threshold is not None and self.remask_budget == 0:
            raise ValueError("edit_threshold is set but remask_budget is 0: give a budget of corrections per block "
                             "(e.g. 2), or unset edit_threshold")

        if self.reopen_threshold is not None:
            if not 0.0 < self.reopen_threshold < 1.0:
                raise ValueError(f"reopen_threshold must be in (0, 1), got {self.reopen_threshold}")
            if self.reopen_budget < 1:
                raise ValueError(f"reopen_budget must be >= 1 with a reopen_threshold, got {self.reopen_budget}")
            if self.reopen_tail not in ("keep", "redenoise"):
                raise ValueError(f"reopen_tail must be 'keep' or 'redenoise', got {self.reopen_tail!r}")
            if self.causal_clean and not self.shift:
                raise ValueError("reopen_threshold on a model with clean_attention: causal reads its AR stream (each "
                                 "token of a finished block judged from the tokens before it), which predicts the "
                                 "next token: it needs a model with shift: true")
        if self.latent_steps and not self.self_conditioning:
            raise ValueError("latent_steps refine the self-conditioning between passes, and this model has none: "
                             "train it with self_conditioning set, or leave latent_steps at 0")

    @property
    def corrects(self) -> bool:
        """Some correction of committed tokens is on (heuristic remasking or learned editing)."""
        return self.remask_threshold is not None or self.edit_threshold is not None


def check_sampling_values(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                          threshold: float | None = None, tokens_per_step: int | None = None) -> None:
    """Refuse sampler values outside their range, and top-k / top-p where they would be silently ignored."""
    if threshold is not None and not 0.0 <= threshold <= 1.0 and threshold != NO_THRESHOLD:
        raise ValueError(f"threshold must be in [0, 1] (a confidence, or a margin for the margin rule), got {threshold}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no top-p filter), got {top_p}")
    if tokens_per_step is not None and tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    filtered = [name for name, value, off in (("top_k", top_k, 0), ("top_p", top_p, 1.0))
                if value is not None and value != off]
    if filtered and not temperature:
        raise ValueError(f"{' and '.join(filtered)} filter{'s' if len(filtered) == 1 else ''} what is sampled, but "
                         "temperature 0 decodes greedily (the most likely token), so it would have no effect: set a "
                         f"temperature above 0, or leave {' and '.join(filtered)} out")
