"""`DiffusionSFTTrainer`: TRL's `SFTTrainer` with the block-diffusion loss and collation, nothing else changed.

    trainer = DiffusionSFTTrainer(model=dlm.model, args=DiffusionSFTConfig(...), diffusion_config=dlm.config,
                                  train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Rows are pre-tokenized `prompt_ids` / `response_ids` (see `llm2diff.training.data`). Logging goes through the
trainer's `report_to`; besides the loss it logs the masked fraction and the loss by noise-level bucket.
Checkpoints (adapter + tokenizer + diffusion_config.json) and `resume_from_checkpoint` are the trainer's own.

`train`, `evaluate` and `predict` run the model with the attention implementation the recipe's `attn_backend`
resolves to (flex_attention on CUDA under `auto`) and restore the loaded one afterwards, so sampling after training
is unaffected. `packing` packs each batch in the collator (TRL's own dataset packing stays off).
"""

from __future__ import annotations

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from trl import SFTTrainer

from llm2diff.atomic import atomic_save

from llm2diff.modeling.attention import resolve_attn_backend
from llm2diff.modeling.config import DiffusionConfig
from llm2diff.modeling.significance import save_significance
from llm2diff.redact import redacted_training_args
from llm2diff.training.collator import BlockDiffusionCollator
from llm2diff.training.config import DiffusionSFTConfig
from llm2diff.training.layout import Layout, reblock
from llm2diff.training.objective import (
    attention_implementation,
    attn_implementation,
    diffusion_loss,
)


class DiffusionSFTTrainer(SFTTrainer):
    def __init__(self, model, args: DiffusionSFTConfig, diffusion_config: DiffusionConfig, processing_class,
                 train_dataset=None, eval_dataset=None, significance: torch.Tensor | None = None, decoding=None,
                 **kwargs):
        if diffusion_config.block_size != args.block_size:
            raise ValueError(f"block_size differs: model {diffusion_config.block_size}, recipe {args.block_size}")
        if diffusion_config.self_conditioning != args.self_conditioning:
            raise ValueError(f"self_conditioning differs: model {diffusion_config.self_conditioning!r}, recipe "
                             f"{args.self_conditioning!r}")
        if diffusion_config.clean_attention != args.clean_attention:
            raise ValueError(f"clean_attention differs: model {diffusion_config.clean_attention!r}, recipe "
                             f"{args.clean_attention!r}")
        self.diffusion_config = diffusion_config
        self.decoding = decoding  # the model's default `DecodingConfig`, saved with every checkpoint
        self.noise_spec = args.noise_spec()
        self.significance = significance  # per-token significance table, saved for the coarse-to-fine sampler
        if self.noise_spec.order == "semantic":
            for name, ds in (("train", train_dataset), ("eval", eval_dataset)):
                if ds is not None and "response_scores" not in ds.column_names:
                    raise ValueError(f"noise_order 'semantic' needs a 'response_scores' column in the {name} dataset "
                                     "(see llm2diff.noise.score_cache.add_significance_scores)")
        collator = BlockDiffusionCollator(
            block_size=args.block_size, eos_token_id=processing_class.eos_token_id,
            pad_token_id=processing_class.pad_token_id, shift=args.shift, packing=args.packing,
            max_length=args.max_length, causal_clean=diffusion_config.causal_clean,
        )
        # TRL's `packing` packs the tokenized dataset for padding-free FlashAttention; ours is the collator's.
        packing, args.packing = args.packing, False
        try:
            super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        finally:
            args.packing = packing
        # The loss is normalised per micro-batch, so let the Trainer average over gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        # the transformers attention implementation of the training forward ("flex_attention", "sdpa", "eager")
        self.attn_implementation = resolve_attn_backend(args.attn_backend, self.args.device,
                                                        attn_implementation(self.model))

    def train(self, *args, **kwargs):
        with attention_implementation(self.model, self.attn_implementation):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with attention_implementation(self.model, self.attn_implementation):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with attention_implementation(self.model, self.attn_implementation):
            return super().predict(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        layout = Layout(**inputs)
        # the eval loss is always taken under the final (block) attention mask and block size
        anneal = args.anneal_fraction(self.state.global_step) if mode == "train" else None
        if mode == "train" and args.block_size_schedule:  # a block-size curriculum: this step's block size
            layout = reblock(layout, args.block_size_at(self.state.global_step, self.state.max_steps))
            self._metrics[mode]["block_size"].append(layout.block_size)
        config = self.diffusion_config
        loss, stats = diffusion_loss(model, layout, config.mask_token_id, spec=self.noise_spec, anneal=anneal,
                                     ar_weight=args.effective_ar_loss_weight,
                                     self_conditioning=config.self_conditioning, vocab_size=config.vocab_size)
        if anneal is not None:
            self._metrics[mode]["attention_anneal"].append(anneal)
        self._log_loss_stats(mode, stats)
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def _log_loss_stats(self, mode: str, stats) -> None:
        device = stats.token_loss.device
        buckets = self.args.loss_buckets
        index = (stats.t * buckets).long().clamp(0, buckets - 1)
        sums = torch.zeros(buckets, device=device).scatter_add(0, index, stats.token_loss.float())
        counts = torch.zeros(buckets, device=device).scatter_add(0, index, torch.ones_like(stats.token_loss.float()))
        totals = torch.tensor([stats.num_masked, stats.num_response_tokens], device=device, dtype=torch.float)
        sums, counts, totals = (self.accelerator.gather_for_metrics(x[None]).sum(0) for x in (sums, counts, totals))
        self._metrics[mode]["masked_fraction"].append((totals[0] / totals[1].clamp(min=1)).item())
        if stats.ar_loss is not None:
            self._metrics[mode]["ar_loss"].append(self.accelerator.gather_for_metrics(stats.ar_loss[None]).mean().item())
        if stats.edit_sums is not None:  # editing noise: the loss at corrupted and kept visible tokens
            edit = self.accelerator.gather_for_metrics(stats.edit_sums[None].float()).sum(0)
            self._metrics[mode]["edited_fraction"].append((edit[1] / totals[1].clamp(min=1)).item())
            if edit[1] > 0:
                self._metrics[mode]["edit_loss"].append((edit[0] / edit[1]).item())
            if edit[3] > 0:
                self._metrics[mode]["keep_loss"].append((edit[2] / edit[3]).item())
        for b in range(buckets):
            if counts[b] > 0:
                name = f"loss_t{b / buckets:.2f}-{(b + 1) / buckets:.2f}"
                self._metrics[mode][name].append((sums[b] / counts[b]).item())

    def _save(self, output_dir: str | None = None, state_dict=None):
        """The trainer's save (weights, tokenizer, arguments) plus `diffusion_config.json`, committed as one step.

        A kill during the save leaves the previous save whole (`llm2diff.atomic.atomic_save`); credentials among
        the arguments are not written (`training_args.bin` gets a copy without them).
        """
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:  # a non-writer rank only joins the collective gathers of the stock save
            return super()._save(output_dir, state_dict)
        with atomic_save(output_dir) as staging:
            super()._save(str(staging), state_dict)
            arguments = staging / TRAINING_ARGS_NAME
            if arguments.is_file():
                torch.save(redacted_training_args(self.args), arguments)
            self.diffusion_config.save(staging)
            if self.decoding is not None:
                self.decoding.save_pretrained(staging)
            if self.significance is not None:
                save_significance(staging, self.significance)
