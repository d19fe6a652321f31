"""`DiffusionSFTConfig`: TRL's `SFTConfig` plus the block-diffusion fields (and nothing else).

Every field is a recipe key; see docs/recipes.md for the whole reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from llm2diff.modeling.config import validate_block_size
from llm2diff.noise.schedule import check_schedule


@dataclass
class DiffusionSFTConfig(SFTConfig):
    """SFTConfig for block-diffusion fine-tuning. The added fields:"""

    block_size: int = field(default=32, metadata={"help": "Tokens per block B (1 = causal-LM SFT, the AR twin)."})
    shift: bool = field(default=True, metadata={"help": "Token shift: position i-1 predicts token i (keeps the AR head)."})
    mask_token: str | None = field(default=None, metadata={
        "help": "Force this mask token; default: the tokenizer's, a known unused special token, a spare row, a new one."})
    noise_schedule: str = field(default="linear", metadata={"help": "Noise schedule; 'linear' masks with probability t."})
    t_min: float = field(default=1e-3, metadata={
        "help": "Lower end of the noise-level window t is drawn from (per block). The 1/t weight's variance diverges "
                "as t_min -> 0."})
    t_max: float = field(default=1.0, metadata={"help": "Upper end of the noise-level window."})
    loss_weighting: str = field(default="elbo", metadata={
        "help": "'elbo': 1/t on masked tokens, normalised by response tokens (unbiased); 'mean': plain mean over "
                "masked tokens (biased, lower variance)."})
    loss_buckets: int = field(default=4, metadata={"help": "Log the loss in this many equal noise-level buckets."})

    def __post_init__(self):
        # The trainer consumes pre-tokenized prompt/response ids through its own collator.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.remove_unused_columns = False
        if self.bf16 is None:  # bf16 where the hardware has it, full precision elsewhere (e.g. on a CPU)
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.use_cpu
        super().__post_init__()
        validate_block_size(self.block_size, self.max_length)
        check_schedule(self.noise_schedule)
        if not 0.0 < self.t_max <= 1.0 or not 0.0 <= self.t_min <= self.t_max:
            raise ValueError(f"noise window must satisfy 0 <= t_min <= t_max <= 1 and t_max > 0, got "
                             f"t_min={self.t_min}, t_max={self.t_max}")
        if self.loss_weighting == "elbo" and self.t_min == 0.0:
            raise ValueError("loss_weighting 'elbo' needs t_min > 0 (the 1/t weight is infinite at t=0)")
        if self.loss_weighting not in ("elbo", "mean"):
            raise ValueError(f"loss_weighting must be 'elbo' or 'mean', got {self.loss_weighting!r}")
        if self.loss_buckets < 1:
            raise ValueError(f"loss_buckets must be >= 1, got {self.loss_buckets}")
