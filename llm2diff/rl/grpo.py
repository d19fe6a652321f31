"""Diffusion GRPO: TRL's `GRPOTrainer` with a block-diffusion policy (d1's diffu-GRPO / DiffuCoder's coupled-GRPO).

    dlm = adapt(model, tokenizer, block_size=4, lora=LoraConfig(r=16, target_modules="all-linear"))
    args = DiffusionGRPOConfig(output_dir="out", num_generations=8, max_completion_length=64, beta=0.04,
                               diffusion_estimator="coupled")
    trainer = DiffusionGRPOTrainer(model=dlm.model, diffusion_config=dlm.config, reward_funcs=[my_reward],
                                   args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Only what differs from autoregressive GRPO is overridden:

* `_generate_single_turn`: completions come from the block sampler (`DiffusionLM.generate`), cut after the first
  end-of-sequence token; no sampling log-probs.
* `_get_per_token_logps_and_entropies`: `llm2diff.rl.logprobs.diffusion_token_logps` (one-pass or coupled
  estimator). Its masks are seeded per row from the row's tokens (`row_seeds`), so the policy, old-policy and
  reference log-probs TRL computes for the same completion draw identical masks, whatever the batch it sits in.
* Reference: TRL copies the "default" adapter into a "ref" adapter by the parameter names containing ".default.",
  which misses PEFT's trainable mask-token row (`...trainable_tokens_delta.default`). Here every adapter parameter is
  copied (`sync_reference_adapter`) and the reference is checked to score a probe batch exactly like the policy.
* `_generate_and_score_completions`: with `process_weight > 0` and a `process_reward`, the outcome advantages are
  replaced by per-token advantages (`llm2diff.rl.advantages.process_advantages`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad, use_adapter

from llm2diff.compat import adopt_activation_checkpointing
from llm2diff.modeling.config import DiffusionConfig
from llm2diff.modeling.diffusion_lm import DiffusionLM
from llm2diff.recipe import DecodingLayer, decoding_field, fold_deprecated_keys
from llm2diff.rl.advantages import process_advantages
from llm2diff.rl.logprobs import ESTIMATORS, diffusion_token_logps, row_seeds
from llm2diff.sampling.config import DecodingConfig, check_applicable
from llm2diff.training.config import check_max_steps

REF_ADAPTER = "ref"  # the adapter name TRL's `_generate_and_score_completions` uses for the reference


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the diffusion policy's settings (on CPU also set `bf16=False, use_cpu=True`)."""

    diffusion_estimator: str = field(default="one_pass", metadata={
        "help": "Per-token log-prob estimator: 'one_pass' (d1: every completion block fully masked, one forward) or "
                "'coupled' (DiffuCoder: a random mask and its complement, each token scored once per pair)."})
    mask_prompt_prob: float = field(default=0.0, metadata={
        "help": "Probability of replacing each prompt token by the mask token when scoring (d1's prompt masking)."})
    process_weight: float = field(default=0.0, metadata={
        "help": "Weight of the process-reward term in the per-token advantages (0 = outcome rewards only)."})
    rollout_decoding: DecodingLayer | None = decoding_field(
        "How completions are sampled: block-sampler settings over the policy's saved decoding (e.g. "
        "{threshold: 0.9}); the temperature, top_k, top_p and max_completion_length of GRPO itself apply on top.")
    # earlier releases' keys: folded into rollout_decoding (with a message naming the new form)
    sampler_threshold: float | None = field(default=None, metadata={"help": "Deprecated: rollout_decoding.threshold."})
    sampler_tokens_per_step: int | None = field(default=None, metadata={
        "help": "Deprecated: rollout_decoding.tokens_per_step."})

    def __post_init__(self):
        adopt_activation_checkpointing(self)  # TRL's default gradient_checkpointing, without a deprecation warning
        super().__post_init__()
        check_max_steps(self.max_steps)
        if self.diffusion_estimator not in ESTIMATORS:
            raise ValueError(f"diffusion_estimator must be one of {', '.join(ESTIMATORS)}, got "
                             f"{self.diffusion_estimator!r}")
        if not 0.0 <= self.mask_prompt_prob < 1.0:
            raise ValueError(f"mask_prompt_prob must be in [0, 1), got {self.mask_prompt_prob}")
        if self.process_weight < 0:
            raise ValueError(f"process_weight must be >= 0, got {self.process_weight}")
        fold_deprecated_keys(self, "rollout_decoding", {"sampler_threshold": "threshold",
                                                        "sampler_tokens_per_step": "tokens_per_step"})
        own = {"mode": "the block sampler", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
               "max_new_tokens": "max_completion_length", "seed": "seed"}
        taken = [k for k in (self.rollout_decoding or {}) if k in own]
        if taken:
            raise ValueError(f"rollout_decoding sets {', '.join(taken)}, which GRPO decides itself (its "
                             f"{', '.join(own[k] for k in taken)}): set {'them' if len(taken) > 1 else 'it'} there")
        check_applicable(self.rollout_decoding or {}, "block", "rollout_decoding")
        DecodingConfig.resolve(self.rollout_decoding)


ProcessReward = Callable[[list, list, list], tuple[list[list[tuple[int, int]]], list[list[float]]]]


def adapter_parameter_pairs(model, source: str = "default", target: str = REF_ADAPTER) -> list[tuple[str, str]]:
    """(source name, target name) for every parameter of adapter `source`, matched on whole name components.

    TRL matches `".default."`, which misses parameters whose name *ends* in the adapter name, such as PEFT's
    trainable token rows (`...trainable_tokens_delta.default`); matching components catches them.
    """
    pairs = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if source in parts:
            pairs.append((name, ".".join(target if p == source else p for p in parts)))
    return pairs


def sync_reference_adapter(model, source: str = "default", target: str = REF_ADAPTER) -> list[str]:
    """Make adapter `target` an exact, frozen copy of adapter `source` (added if missing). Returns the copied names."""
    if target not in model.peft_config:
        model.add_adapter(target, model.peft_config[source])
    params = dict(model.named_parameters())
    copied = []
    with torch.no_grad():
        for src, dst in adapter_parameter_pairs(model, source, target):
            if dst not in params:
                raise RuntimeError(f"the reference adapter {target!r} has no parameter {dst} to copy {src} into")
            params[dst].data.copy_(params[src].data)
            params[dst].requires_grad_(False)
            copied.append(dst)
    return copied


class DiffusionGRPOTrainer(GRPOTrainer):
    """GRPO for a block-diffusion LM made by `llm2diff.adapt` (a PEFT model whose mask-token row is trainable).

    Args:
        model: the PEFT model (`DiffusionLM.model`), or the `DiffusionLM` itself.
        diffusion_config: the model's `DiffusionConfig` (taken from the `DiffusionLM` when one is given).
        decoding: the policy's `DecodingConfig`, which rollouts start from (taken from the `DiffusionLM`; None:
            the library defaults); they always use the block sampler, with GRPO's temperature, top-k and top-p.
        process_reward: optional `(prompts, completions, completion_ids) -> (step_spans, step_scores)`, per
            completion its steps' inclusive `(start, end)` token spans and one PRM score per step; used when
            `args.process_weight > 0`.
        reward_funcs, args, train_dataset, processing_class, ...: as `trl.GRPOTrainer` (reward functions are
            callables `(prompts, completions, **kwargs) -> list[float]`; the dataset has a "prompt" column).
    """

    def __init__(self, model, diffusion_config: DiffusionConfig | None = None, reward_funcs=None,
                 args: DiffusionGRPOConfig | None = None, process_reward: ProcessReward | None = None,
                 decoding=None, **kwargs):
        from peft import PeftModel

        if isinstance(model, DiffusionLM):
            diffusion_config = diffusion_config or model.config
            decoding = decoding or model.decoding
            kwargs.setdefault("processing_class", model.tokenizer)
            model = model.model
        if diffusion_config is None:
            raise ValueError("DiffusionGRPOTrainer needs the model's diffusion_config (DiffusionLM.config)")
        if not isinstance(model, PeftModel):
            raise TypeError("DiffusionGRPOTrainer trains the LoRA of a model adapted with "
                            "llm2diff.adapt(..., lora=LoraConfig(...)); got a "
                            f"{type(model).__name__}. Pass dlm.model (a PeftModel) or the DiffusionLM")
        if kwargs.get("peft_config") is not None:
            raise ValueError("pass the model adapted by llm2diff.adapt (it already carries the LoRA); peft_config "
                             "is not supported here")
        if not isinstance(args, DiffusionGRPOConfig):
            raise TypeError("args must be a DiffusionGRPOConfig (a GRPOConfig with the diffusion settings), got "
                            f"{type(args).__name__}")
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError("completions come from llm2diff's block sampler: set use_vllm=False and "
                             "use_transformers_continuous_batching=False")
        if args.min_p is not None or args.repetition_penalty != 1.0:
            raise ValueError("the block sampler supports temperature, top_k and top_p only: unset min_p and "
                             "repetition_penalty")
        if args.process_weight > 0:
            if process_reward is None:
                raise ValueError("process_weight > 0 needs a process_reward callable "
                                 "(prompts, completions, completion_ids) -> (step_spans, step_scores)")
            if args.scale_rewards != "group" or args.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError("process_weight > 0 computes outcome advantages as (r - group mean) / (group std "
                                 "+ 1e-4): use scale_rewards='group' and multi_objective_aggregation="
                                 "'sum_then_normalize'")
        self.diffusion_config = diffusion_config
        self.decoding = decoding  # the policy's saved `DecodingConfig`: rollouts start from it
        self.process_reward = process_reward
        self._last_scored = None
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if self.beta != 0.0:
            self.reference_parameters = sync_reference_adapter(self.accelerator.unwrap_model(self.model))
            self.check_reference()

    # -- log-probs ----------------------------------------------------------------------------------------------
    def _diffusion_logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, seeds,
                         return_entropy=False):
        c = self.diffusion_config
        return diffusion_token_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, block_size=c.block_size,
            mask_token_id=c.mask_token_id, pad_token_id=self._tokenizer.pad_token_id, shift=c.shift,
            estimator=self.args.diffusion_estimator, mask_prompt_prob=self.args.mask_prompt_prob, seed=seeds,
            temperature=self.temperature, return_entropy=return_entropy,
            entropy_grad=bool(getattr(self, "_entropy_bonus_enabled", True)), causal_clean=c.causal_clean,
            self_conditioning=c.self_conditioning, vocab_size=c.vocab_size,
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if any(v is not None for v in multimodal.values()):
            raise NotImplementedError("DiffusionGRPOTrainer scores text only (no images or token type ids)")
        if compute_aux_loss:
            raise NotImplementedError("the MoE load-balancing loss is not supported by DiffusionGRPOTrainer")
        seeds = row_seeds(input_ids, attention_mask, base=self.args.seed)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                out = self._diffusion_logps(
                    model, input_ids[rows, :-logits_to_keep], attention_mask[rows, :-logits_to_keep],
                    input_ids[rows, -logits_to_keep:], attention_mask[rows, -logits_to_keep:], seeds[rows],
                    return_entropy=compute_entropy)
            if compute_entropy:
                logps.append(out[0])
                entropies.append(out[1])
            else:
                logps.append(out)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # -- reference ----------------------------------------------------------------------------------------------
    def _probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.diffusion_config
        vocab = min(len(self._tokenizer), c.vocab_size or len(self._tokenizer))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 6 + 2 * c.block_size), generator=gen)
        ids[ids == c.mask_token_id] = self._tokenizer.pad_token_id
        return ids, torch.ones_like(ids)

    @torch.no_grad()
    def check_reference(self, atol: float = 1e-6) -> None:
        """Raise unless the reference adapter gives the policy's log-probs on a probe batch (call before training)."""
        model = self.accelerator.unwrap_model(self.model)
        if REF_ADAPTER not in model.peft_config:
            raise RuntimeError(f"beta > 0 but the model has no {REF_ADAPTER!r} reference adapter")
        ids, mask = self._probe_batch()
        device = self.accelerator.device
        ids, mask = ids.to(device), mask.to(device)
        keep = ids.shape[1] - 6
        was_training = model.training
        model.eval()
        try:
            policy, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, keep)
            with use_adapter(model, REF_ADAPTER):
                reference, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, keep)
        finally:
            model.train(was_training)
        gap = (policy - reference).abs().max().item()
        if gap > atol:
            raise RuntimeError(f"the reference adapter does not reproduce the policy at step 0 (max log-prob gap "
                               f"{gap:.3g} on a probe batch): some adapter parameter (e.g. the trainable mask-token "
                               "row) was not copied into the reference")

    # -- generation ---------------------------------------------------------------------------------------------
    def _generation_seed(self) -> int:
        """A sampler seed drawn from the trainer's (seeded) torch RNG, distinct per process."""
        draw = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return draw + 1_000_003 * self.accelerator.process_index

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise NotImplementedError("DiffusionGRPOTrainer generates from text prompts only")
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=pad_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
        c = self.diffusion_config
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            # the policy's saved decoding, with the block sampler and GRPO's own sampling settings on top
            out = DiffusionLM(unwrapped_model, self._tokenizer, c, decoding=self.decoding).generate(
                input_ids, attention_mask, decoding={**(self.args.rollout_decoding or {}), "mode": "block"},
                max_new_tokens=self.max_completion_length, temperature=self.temperature,
                top_k=self.top_k if self.top_k and self.top_k > 0 else None,
                top_p=self.top_p if self.top_p is not None and self.top_p < 1.0 else None,
                seed=self._generation_seed(),
            )
        completions = out.sequences[:, input_ids.shape[1]:].cpu()
        eos = set(self.eos_token_ids)
        completion_ids = []
        for row in completions.tolist():
            cut = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
            completion_ids.append(row[:cut])
        return completion_ids, None

    # -- rewards and advantages ---------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_scored = (prompts, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.process_weight > 0 and self.process_reward is not None:
            output["advantages"] = self._process_advantages(output)
        return output

    def _process_advantages(self, output: dict) -> torch.Tensor:
        """Per-token advantages `(B_local, T)`: group statistics over the whole (all-process) generation batch."""
        prompts, completions, completion_ids_list, rewards_per_func = self._last_scored
        result = self.process_reward(prompts, completions, completion_ids_list)
        if not isinstance(result, tuple) or len(result) != 2:
            raise ValueError("process_reward must return a pair (step_spans, step_scores)")
        spans, scores = result
        if len(spans) != len(prompts) or len(scores) != len(prompts):
            raise ValueError(f"process_reward returned {len(spans)} span lists and {len(scores)} score lists for "
                             f"{len(prompts)} completions; it must return one of each per completion")
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)[None]).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows, as TRL
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        all_mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = process_advantages(rewards, gather_object(list(spans)), gather_object(list(scores)), group,
                                        self.args.process_weight, all_mask)
        start = self.accelerator.process_index * len(prompts)
        return advantages[start: start + len(prompts), : mask.shape[1]].to(mask.device)
