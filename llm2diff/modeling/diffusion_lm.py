"""`DiffusionLM`: a stock causal LM (optionally PEFT-wrapped) driven as a block-diffusion LM.

    from llm2diff import adapt, load                                    # both in llm2diff.modeling.loading
    dlm = adapt(model, tokenizer, block_size=32, lora=LoraConfig(...))   # or dlm = load("outputs/run")
    out = dlm.generate(input_ids, max_new_tokens=128, tokens_per_step=2)
    dlm.save_pretrained("outputs/run")

The front door: `generate` (resolves the decoding settings once and calls the decoder their mode names),
`ar_generate`, the AR parent, LoRA switching and merging for inference, and `save_pretrained`. Making one (`adapt`,
`load`) is `llm2diff.modeling.loading`; the significance file `llm2diff.modeling.significance`.

With a LoRA, the AR parent is the same model with the adapter disabled (`dlm.ar_parent()`). Without one (full
fine-tuning, a merged adapter) the parent is loaded separately from the base recorded in `diffusion_config.json`,
once, when something first asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llm2diff.atomic import atomic_save
from llm2diff.modeling.config import DiffusionConfig
from llm2diff.modeling.dense_head import dense_head_inputs
from llm2diff.modeling.lora import LoraSwitch, lora_state_key
from llm2diff.modeling.significance import save_significance
from llm2diff.sampling.config import DecodingConfig
from llm2diff.sampling.output import GenerateOutput

logger = logging.getLogger(__name__)


class DiffusionLM:
    """A causal LM (optionally PEFT-wrapped) plus the diffusion settings that make it a block-diffusion LM.

    Attributes:
        model: the underlying (PEFT) model.
        tokenizer: its tokenizer, holding the mask token.
        config: the `DiffusionConfig` (what the model is).
        decoding: the `DecodingConfig` `generate` starts from (saved as `decoding_config.json`).
        weights_are_parent: without an adapter, whether `model`'s weights are still the AR parent's (True from
            `adapt` without LoRA, before training; training clears it). Then `ar_parent()` is the model itself;
            otherwise it is loaded separately from the recorded base.
    """

    def __init__(self, model, tokenizer, config: DiffusionConfig, significance: torch.Tensor | None = None,
                 weights_are_parent: bool = False, decoding: DecodingConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.decoding = decoding or DecodingConfig()  # how `generate` decodes unless told otherwise (saved beside)
        self.significance = significance  # (vocab,) token significance in [0, 1] for the coarse-to-fine rule
        self.weights_are_parent = weights_are_parent
        self._separate_parent = None  # the AR parent loaded from the recorded base (models without an adapter)
        dense_head_inputs(model)

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(int(i) for i in gen_eos)
        return tuple(sorted(ids))

    def __repr__(self) -> str:
        c = self.config
        return (f"DiffusionLM({c.architecture}, block_size={c.block_size}, mask_token={c.mask_token!r}, "
                f"shift={c.shift}, adapter={self.has_adapter})")

    # -- the AR parent ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ar_parent(self) -> Iterator[torch.nn.Module]:
        """Context yielding the AR parent.

        With a LoRA adapter: `self.model` with the adapter disabled (free). Without one (full fine-tuning or a
        merged adapter) there is no free parent: unless the weights are still the parent's (`weights_are_parent`),
        it is loaded separately from the recorded base (`config.base_model_name_or_path`) on first use, in this
        model's dtype and device, and kept: a second copy of the weights in memory.
        """
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        elif self.weights_are_parent:
            yield self.model
        else:
            yield self.separate_parent()

    def separate_parent(self) -> torch.nn.Module:
        """The AR parent of a model without an adapter, loaded once from the recorded base (see `ar_parent`)."""
        if self._separate_parent is None:
            from llm2diff.modeling.parent import load_parent

            base = self.config.base_model_name_or_path
            logger.warning("this model has no adapter (full fine-tuning or a merged adapter), so its AR parent is "
                           "not free: loading it separately from the recorded base %r (a second copy of the "
                           "weights in memory)", base)
            try:
                self._separate_parent = dense_head_inputs(load_parent(self.config, dtype=self.model.dtype,
                                                                      device=self.device))
            except (OSError, ValueError) as error:
                raise RuntimeError(
                    f"this model has no adapter (full fine-tuning or a merged adapter), so its AR parent must be "
                    f"loaded from the recorded base {base!r}, which failed: {error}. Make the base available "
                    "(download it, or set base_model_name_or_path in diffusion_config.json to a local copy), or "
                    "use a model saved with its LoRA adapter (use_lora: true)") from error
        return self._separate_parent

    @contextlib.contextmanager
    def lora_off(self) -> Iterator[torch.nn.Module]:
        """Context in which the LoRA layers are off but trained token rows stay as they are (merged or not).

        For inputs without the mask token this is the AR parent exactly, except for the mask token's own logit
        (tied embeddings), which every caller suppresses. Unlike `ar_parent` (PEFT's `disable_adapter`, which also
        unmerges the trained rows), switching back costs nothing: lossless mode alternates the two every round.
        """
        if not self.has_adapter:
            raise RuntimeError("this DiffusionLM has no adapter, so there is no AR parent to switch to")
        with LoraSwitch(self).off() as model:
            yield model

    @contextlib.contextmanager
    def trained_token_rows_merged(self) -> Iterator[None]:
        """Context for inference in which the trained mask-token row sits in the embedding matrix itself.

        PEFT's trainable-token wrapper otherwise rebuilds the whole embedding matrix (and, with tied embeddings,
        the LM head) on every forward pass to swap in the trained rows: about 110 ms per pass for SmolLM2's
        49152 x 576 matrix on one CPU thread, more than the transformer layers of a small block. Here the rows
        are written into the matrix in place (PEFT's own `merge` copies the whole matrix, about 85 ms per call);
        leaving restores the original rows exactly (PEFT's `unmerge`, from the copies it keeps). Gradients are not
        affected: use it only around inference. No-op without trainable tokens.
        """
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        layers = [m for m in self.model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged
                  and not m.disable_adapters]
        for layer in layers:
            weight = layer.base_layer.weight
            for name in layer.active_adapters:
                if name not in layer.token_indices:
                    continue
                rows = torch.tensor(layer.token_indices[name], device=weight.device)
                with torch.no_grad():
                    weight.data.index_copy_(0, rows, layer.trainable_tokens_delta[name].to(weight))
                layer.merged_adapters.append(name)
        try:
            yield
        finally:
            for layer in layers:
                if layer.merged:
                    layer.unmerge()

    @contextlib.contextmanager
    def lora_merged(self) -> Iterator[None]:
        """Context for inference in which the LoRA deltas are folded into the base weights.

        A merged layer runs one matrix product instead of three (base, A, B), which at small batches is a large
        share of a forward pass. The merged weights are built once (PEFT's `merge(safe_merge=True)`, which writes a
        new tensor and leaves the original alone) and kept, so later calls only swap tensors in and out; they are
        rebuilt when an adapter weight has changed since (e.g. training in between). On leaving, the original
        weights are put back untouched, so the AR parent (adapter off) stays exactly the parent (PEFT's `unmerge`
        would subtract the delta again and leave float rounding behind). Costs a second copy of the adapted weights
        for as long as this `DiffusionLM` lives. Not on a quantized base (its weights cannot hold the deltas); no-op
        without an adapter.
        """
        with LoraSwitch(self).merged():
            yield

    def _merged_lora(self, layer, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """(weight, bias or None) of a LoRA layer with its delta folded in, built once (PEFT's `merge(safe_merge=
        True)` over copies of the layer's tensors) and kept until an adapter weight changes. `weight`/`bias`: the layer's own tensors,
        which are put back in place before returning."""
        if not hasattr(self, "_merged_lora_cache"):
            self._merged_lora_cache: dict[int, tuple] = {}
        key = lora_state_key(layer, weight)
        cached = self._merged_lora_cache.get(id(layer))
        if cached is None or cached[0] != key:
            base = layer.get_base_layer()
            # PEFT's merge writes into the layer's tensors (in place since peft 0.22): it gets copies, so the
            # originals stay as they are
            base.weight.data = weight.clone()
            if bias is not None:
                base.bias.data = bias.clone()
            layer.merge(safe_merge=True)
            lora_bias = bias is not None and any(layer.lora_bias.get(name, False) for name in layer.active_adapters
                                                 if name in layer.lora_A)
            cached = (key, base.weight.data, base.bias.data if lora_bias else None)  # lora_bias: into the bias too
            self._merged_lora_cache[id(layer)] = cached
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            layer.merged_adapters.clear()
        return cached[1], cached[2]

    @torch.no_grad()
    def ar_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 256, **kwargs) -> torch.Tensor:
        """Greedy `generate` of the AR parent (adapter off). Returns sequences.

        The mask token and spare embedding rows are suppressed and generation stops at `eos_token_ids`, as the
        block sampler and lossless mode do, so the three are comparable token for token.
        """
        from llm2diff.modeling.parent import parent_suppressed_ids

        input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("eos_token_id", list(self.eos_token_ids) or None)
        with self.ar_parent() as parent:
            parent.eval()
            return parent.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                suppress_tokens=parent_suppressed_ids(self), **kwargs,
            )

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 decoding: DecodingConfig | Mapping[str, Any] | None = None, response_prefix: torch.Tensor | None = None,
                 streamer=None, **overrides: Any) -> GenerateOutput:
        """Decode after the prompts (left-padded batches) as the resolved `DecodingConfig` says.

        The settings are merged once (`DecodingConfig.resolve`): the library defaults, then this model's saved
        decoding (`self.decoding`, from `decoding_config.json`), then `decoding` (a `DecodingConfig`, whose
        non-default settings count, or a mapping, every key of which counts), then `overrides` (any setting by
        name: `generate(ids, threshold=0.7, max_new_tokens=64)`; an override of None is no override, so to unset
        a saved value give it in `decoding`, e.g. `decoding={"threshold": None}`). The decoder is the resolved `mode`: "block"
        (the KV-cached block sampler, `llm2diff.sampling.sampler`), "verified" (`llm2diff.sampling.verified`) or
        "lossless" (`llm2diff.sampling.lossless`); a setting named in this call that the mode would ignore is
        refused. The settings and what each does: `llm2diff.sampling.config` and docs/sampling.md.

        `response_prefix` (`(batch, P)`, the same length for every row; block sampler) continues responses whose
        first P tokens are given; `sequences` then holds prompt, prefix and the new tokens. `streamer` (one
        prompt; transformers' `TextStreamer` and the like) receives each block as it is finished (verified
        decoding: the tokens each verify pass adds).

        Returns a `GenerateOutput` (`llm2diff.sampling.output`): `sequences` (prompt plus new tokens, pad after a
        row stopped), `num_new_tokens`, `nfe`, `nfe_per_row`, `mode`, the resolved `decoding` and the decoder's
        own `stats`.
        """
        from llm2diff.sampling.config import DecodingConfig, check_applicable, explicit_settings
        from llm2diff.sampling.decoders import decoder

        input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
        overrides = {name: value for name, value in overrides.items() if value is not None}  # None: not given
        overrides, saved, legacy = _legacy_arguments(overrides, self.decoding)
        for name in legacy:
            import warnings

            warnings.warn(f"`{name}` is deprecated in DiffusionLM.generate: use {LEGACY_ARGUMENTS[name]}",
                          FutureWarning, stacklevel=3)
        call = {**explicit_settings(decoding), **explicit_settings(overrides)}
        resolved = DecodingConfig.resolve(saved, call)
        check_applicable({k: v for k, v in call.items() if v != DecodingConfig.__dataclass_fields__[k].default},
                         resolved.mode)
        prefix_len = response_prefix.shape[-1] if isinstance(response_prefix, torch.Tensor) else 0
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[1] + prefix_len + resolved.max_new_tokens > limit:
            raise ValueError(
                f"prompt length {input_ids.shape[1]}" + (f" + response prefix {prefix_len}" if prefix_len else "")
                + f" + max_new_tokens {resolved.max_new_tokens} exceeds the model's maximum "
                f"length {limit}; shorten the prompt or lower max_new_tokens"
            )
        if resolved.mode == "verified" and not self.config.causal_clean:
            raise ValueError("verified decoding checks every block with the model's causal clean stream, which a "
                             "model trained with clean_attention 'block' does not have: decode with mode 'block' "
                             "(or 'lossless'), or train with clean_attention: causal")
        return decoder(resolved.mode)(self, input_ids, attention_mask, resolved, response_prefix=response_prefix,
                                      streamer=streamer)

    def compiled_model(self):
        """`torch.compile` of the model, made once and kept (recompiles only for new input shapes)."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = torch.compile(self.model, dynamic=False)
        return self._compiled

    # -- saving -------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> Path:
        """Save the adapter (or the full model), the tokenizer and `diffusion_config.json`, as one atomic step.

        Only the files of this save, and those of the previous save into `directory` that this one no longer
        writes, are replaced: checkpoints, evaluation results and anything else in `directory` stay
        (`llm2diff.atomic.atomic_save`).
        """
        directory = Path(directory)
        with atomic_save(directory) as tmp:
            if self.has_adapter:
                self.model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers="auto", **kwargs)
            else:
                self.model.save_pretrained(tmp, **kwargs)  # transformers 5 always writes safetensors
            self.tokenizer.save_pretrained(tmp)
            self.config.save(tmp)
            self.decoding.save_pretrained(tmp)
            if self.significance is not None:
                save_significance(tmp, self.significance)
        return directory


# generate() arguments of earlier releases, and the settings that replace them
LEGACY_ARGUMENTS = {"lossless": "mode='lossless'", "verified": "mode='verified' (False: mode='block')",
                    "use_saved_defaults": "decoding=DecodingConfig().to_dict() (every setting from the library)"}


def _legacy_arguments(overrides: dict[str, Any], saved):
    """`generate`'s keyword arguments of earlier releases, translated: returns the overrides, the saved layer to
    merge under them, and the names given (for `generate`'s deprecation warning)."""
    overrides = dict(overrides)
    given = [name for name in LEGACY_ARGUMENTS if name in overrides]
    for name in given:
        value = overrides.pop(name)
        if name == "lossless" and value:
            overrides.setdefault("mode", "lossless")
        elif name == "verified" and value is not None:
            overrides.setdefault("mode", "verified" if value else "block")
        elif name == "use_saved_defaults" and not value:
            saved = None
    return overrides, saved, given


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len) with a non-empty prompt, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("batches must be left-padded (tokenizer.padding_side = 'left'): a row ends with padding")
    return input_ids, attention_mask.long()
