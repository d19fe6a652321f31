"""`DiffusionSFTConfig`: TRL's `SFTConfig` plus the block-diffusion fields (and nothing else).

Every field is a recipe key; see docs/recipes.md for the whole reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl import SFTConfig

from llm2diff.compat import adopt_activation_checkpointing
from llm2diff.modeling.attention import ATTN_BACKENDS
from llm2diff.modeling.config import CLEAN_ATTENTION, validate_block_size
from llm2diff.modeling.self_conditioning import check_self_conditioning
from llm2diff.names import check_choice
from llm2diff.noise.masking import NoiseSpec
from llm2diff.noise.scorers import SCORERS
from llm2diff.training.layout import parse_block_size_schedule, scheduled_block_size


@dataclass
class DiffusionSFTConfig(SFTConfig):
    """SFTConfig for block-diffusion fine-tuning. The added fields:"""

    block_size: int = field(default=32, metadata={"help": "Tokens per block B (1 = causal-LM SFT, the AR twin)."})
    shift: bool = field(default=True, metadata={"help": "Token shift: position i-1 predicts token i (keeps the AR head)."})
    clean_attention: str = field(default="block", metadata={
        "help": "How finished blocks read themselves: 'block' (bidirectionally) or 'causal' (as the AR parent does; "
                "the clean stream is then a causal LM, which ar_loss_weight trains, and the sampler commits a block "
                "with a causal pass). Saved with the model."})
    ar_loss_weight: float = field(default=0.0, metadata={
        "help": "Add this times the AR loss of the causal clean stream (next-token cross-entropy on every response "
                "token, from the same forward). Needs clean_attention 'causal'. 0 = off; ignored at block_size 1 "
                "(the AR twin), whose loss already is the AR loss."})
    mask_token: str | None = field(default=None, metadata={
        "help": "Force this mask token; default: the tokenizer's, a known unused special token, a spare row, a new one."})
    noise_schedule: str = field(default="linear", metadata={
        "help": "Noise schedule p(t): 'linear' (p = t), 'cosine' (p = 1 - cos(pi t / 2)), 'loglinear' (MDLM; "
                "p = (1 - 1e-3) t). The ELBO weight follows the schedule."})
    t_min: float = field(default=1e-3, metadata={
        "help": "Lower end of the noise-level window t is drawn from. The 1/t weight's variance diverges as "
                "t_min -> 0; BD3-LM's clipped window (e.g. 0.3-0.8) lowers it further."})
    t_max: float = field(default=1.0, metadata={"help": "Upper end of the noise-level window."})
    t_sampling: str = field(default="uniform", metadata={
        "help": "How t is drawn across the batch: 'uniform', 'stratified' (one draw per stratum) or 'antithetic' "
                "(pairs t, 1 - t). All unbiased; the last two lower the loss variance."})
    noise_unit: str = field(default="block", metadata={
        "help": "'block': one noise level per block (and semantic ranking within a block); 'sequence': one per "
                "response."})
    noise_order: str = field(default="random", metadata={
        "help": "'random': each token masked independently; 'semantic': least significant tokens first "
                "(coarse-to-fine; needs semantic_scorer)."})
    semantic_scorer: str | None = field(default=None, metadata={
        "help": "Significance scorer for semantic noise and the coarse-to-fine sampler: 'idf', 'surprisal' "
                "(frozen AR parent), 'parent_deletion' (AR parent representation), 'embedding_deletion' "
                "(all-MiniLM-L6-v2). Scores are cached per dataset."})
    semantic_temperature: float = field(default=0.0, metadata={
        "help": "Mixes the semantic order with random order: 0 = pure significance order, inf = random."})
    semantic_embedding_model: str | None = field(default=None, metadata={
        "help": "Sentence-embedding model for 'embedding_deletion' (default: the bundled all-MiniLM-L6-v2)."})
    semantic_batch_size: int = field(default=16, metadata={"help": "Examples per scoring batch."})
    semantic_cache_dir: str | None = field(default=None, metadata={
        "help": "Where significance scores are cached (default ~/.cache/llm2diff/scores)."})
    position_masking_strength: float = field(default=0.0, metadata={
        "help": "s > 0: position-dependent masking, later tokens of a block masked more (p_j = p(t)^g_j, "
                "g_j = exp(s (1 - 2j/(B-1)))). 0 = off."})
    complementary_masks: bool = field(default=False, metadata={
        "help": "Train each example twice per step: the second copy masks exactly the tokens the first kept "
                "(weight p'/(1-p), 1/(1-t) for linear)."})
    loss_weighting: str = field(default="elbo", metadata={
        "help": "'elbo': the schedule's ELBO weight p'(t)/p(t) (1/t for linear); 'mean': weight 1; 'cart': "
                "Dream's context-adaptive token weights."})
    cart_p: float = field(default=0.1, metadata={"help": "Geometric kernel parameter p of 'cart' weighting."})
    loss_normalization: str = field(default="auto", metadata={
        "help": "'auto' (response for elbo/cart, masked for mean), 'response' (sum / response tokens), 'masked' "
                "(sum / masked tokens), 'sequence' (per-sequence mean, averaged)."})
    edit_fraction: float = field(default=0.0, metadata={
        "help": "Editing noise: each visible response token of the noisy copy (past its block's first) is replaced by "
                "a wrong token with this probability, and the loss asks for the true one there, so the model learns "
                "to dispute committed tokens (learned retraction). 0 = off: the absorbing objective exactly."})
    edit_source: str = field(default="uniform", metadata={
        "help": "Where editing noise's wrong tokens come from: 'uniform' (any other token), 'parent' (the AR "
                "parent's next-token distribution without the true token; needs LoRA) or 'self' (the model's own "
                "prediction with the position masked, without the true token)."})
    edit_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the true token's cross-entropy at corrupted positions (summed, per response token)."})
    edit_keep_weight: float = field(default=0.0, metadata={
        "help": "Weight of the true token's cross-entropy at the visible tokens left right (per response token): "
                "teaches keeping right tokens beside replacing wrong ones. 0 = off."})
    block_size_schedule: str | None = field(default=None, metadata={
        "help": "Block-size curriculum: 'size:fraction,...' trains with smaller blocks first, e.g. '2:0.25,4:0.5' = "
                "block size 2 for the first 25% of the steps, 4 until 50%, then block_size (each size must divide "
                "block_size; the model is saved with block_size). Logged per step as block_size. None = off."})
    self_conditioning: str | None = field(default=None, metadata={
        "help": "Self-conditioning: a denoising pass also receives, at each masked position, what the previous pass "
                "concluded, through a learned projection that starts at zero: 'expected_embedding' (the token "
                "embedding expected under the predicted distribution) or 'hidden' (the position's last hidden "
                "state). Half of the training batches first run a no-grad pass to produce it. Saved with the "
                "model; the sampler carries it through a block's steps. None = off."})
    attention_anneal_steps: int = field(default=0, metadata={
        "help": "Anneal attention from causal to block over this many steps (DiffuLLaMA): within a block a "
                "token sees a later position with probability step / attention_anneal_steps. 0 = off."})
    loss_buckets: int = field(default=4, metadata={"help": "Log the loss in this many equal noise-level buckets."})
    attn_backend: str = field(default="auto", metadata={
        "help": "Attention for the training forward: 'auto' (flex_attention with a BlockMask on a CUDA device whose "
                "torch has it, else the model's sdpa/eager), 'sdpa', 'eager' or 'flex' (CUDA only). Sampling keeps "
                "the model's attn_implementation."})
    packing: bool = field(default=False, metadata={
        "help": "Pack each batch's examples into as few layout rows as fit max_length tokens ([prompt ; clean ; "
                "noisy] per example, attention kept inside each example, position ids restarting). Same examples, "
                "noise and loss per batch; less padding. Not TRL's dataset packing (packing_strategy is ignored)."})

    def __post_init__(self):
        # The trainer consumes pre-tokenized prompt/response ids through its own collator.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.remove_unused_columns = False
        if self.bf16 is None:  # bf16 where the hardware has it, full precision elsewhere (e.g. on a CPU)
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.use_cpu
        adopt_activation_checkpointing(self)  # recipes' (and TRL's default) gradient_checkpointing, without a warning
        super().__post_init__()
        check_max_steps(self.max_steps)
        validate_block_size(self.block_size, self.max_length)
        self.noise_spec().validate(self.block_size, self.shift)
        check_choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        if self.padding_free:
            raise ValueError("padding_free needs FlashAttention, which cannot express the block-diffusion training "
                             "mask; use packing: true instead")
        if self.eval_packing is not None and self.eval_packing != self.packing:
            raise ValueError("eval_packing cannot differ from packing here: one collator packs train and eval batches "
                             "(packing does not change the loss); leave eval_packing unset")
        check_choice("clean_attention", self.clean_attention, CLEAN_ATTENTION)
        if self.ar_loss_weight < 0:
            raise ValueError(f"ar_loss_weight must be >= 0, got {self.ar_loss_weight}")
        if self.ar_loss_weight and self.clean_attention != "causal":
            raise ValueError("ar_loss_weight needs clean_attention: causal (with block attention a clean token sees "
                             "the token it would predict); set clean_attention: causal or ar_loss_weight: 0")
        if self.ar_loss_weight and not self.shift:
            raise ValueError("ar_loss_weight needs shift: true (without token shift no position predicts the next "
                             "token)")
        if self.loss_buckets < 1:
            raise ValueError(f"loss_buckets must be >= 1, got {self.loss_buckets}")
        if self.noise_order == "semantic" and not self.semantic_scorer:
            raise ValueError(f"noise_order 'semantic' needs semantic_scorer: one of {', '.join(SCORERS)}")
        if self.semantic_scorer is not None:
            check_choice("semantic_scorer", self.semantic_scorer, SCORERS)
        if self.semantic_batch_size < 1:
            raise ValueError(f"semantic_batch_size must be >= 1, got {self.semantic_batch_size}")
        if self.block_size_schedule:
            if self.block_size == 1:
                raise ValueError("block_size_schedule needs block_size > 1: there is no smaller block to start from")
            parse_block_size_schedule(self.block_size_schedule, self.block_size)
        check_self_conditioning(self.self_conditioning, self.block_size)
        if self.attention_anneal_steps < 0:
            raise ValueError(f"attention_anneal_steps must be >= 0, got {self.attention_anneal_steps}")
        if self.attention_anneal_steps and self.block_size == 1:
            raise ValueError("attention_anneal_steps needs block_size > 1: a block of one token has nothing to anneal")

    @property
    def effective_ar_loss_weight(self) -> float:
        """The AR loss weight the trainer applies: 0 at block size 1, where the loss already is the AR loss."""
        return self.ar_loss_weight if self.block_size > 1 else 0.0

    def noise_spec(self) -> NoiseSpec:
        """The `NoiseSpec` these fields describe."""
        spec = NoiseSpec.from_recipe(self)
        return dataclasses.replace(spec, semantic_temperature=float(spec.semantic_temperature))

    def block_size_at(self, step: int, max_steps: int) -> int:
        """The block size trained at optimizer step `step` of `max_steps` (the curriculum's, else block_size)."""
        return scheduled_block_size(parse_block_size_schedule(self.block_size_schedule, self.block_size),
                                    self.block_size, step, max_steps)

    def anneal_fraction(self, step: int) -> float | None:
        """Fraction of within-block later positions visible at a training step (None when not annealing)."""
        if not self.attention_anneal_steps:
            return None
        return min(1.0, step / self.attention_anneal_steps)


def check_max_steps(max_steps: int) -> None:
    """Refuse a step count that cannot mean anything (0 would still train one step and save)."""
    if max_steps == 0 or max_steps < -1:
        raise ValueError(f"max_steps={max_steps} cannot be trained: give a positive number of optimizer steps, or -1 "
                         "(the default) to train for num_train_epochs epochs")
