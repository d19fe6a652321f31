"""The adapter's weights as stored, and switching the LoRA off or to its merged weights without walking the model.

    switch = LoraSwitch(dlm)
    with switch.off(): ...          # the AR parent's weights (the trained mask row stays)
    with switch.merged(): ...       # one linear per layer: the LoRA folded into the base weights

`embedding_weight` / `stored_weight` read a weight as stored, under PEFT's wrappers (whose `.weight` would rebuild a
copy with the trained rows swapped in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def embedding_weight(model) -> torch.Tensor:
    """The input embedding matrix as stored. (`.weight` of PEFT's trainable-token wrapper would build a copy with
    the trained rows swapped in: about 85 ms for SmolLM2's 49152 x 576 matrix, just to read a dtype or device.)"""
    return stored_weight(model.get_input_embeddings())


def stored_weight(layer) -> torch.Tensor:
    """`layer.weight` as stored, under PEFT's trainable-token wrapper or layer too (see `embedding_weight`)."""
    layer = getattr(layer, "token_adapter", layer)  # PEFT's TrainableTokensWrapper
    return getattr(layer, "base_layer", layer).weight


class LoraSwitch:
    """A model's active LoRA layers, found once, then switched off or to their merged weights as often as needed.

    `DiffusionLM.lora_off()` and `lora_merged()` each build one, which walks every module (about 10 ms for
    SmolLM2 on one CPU thread, with the merged weights' checks); lossless decoding switches twice a round, so it
    holds one for a whole call. The adapter weights must not change while it is held (inference only).
    """

    def __init__(self, dlm):
        from peft.tuners.lora import LoraLayer

        self.dlm = dlm
        self.layers = [m for m in dlm.model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters]
        self._merged: list[tuple] | None = None  # (layer, base, weight, bias, merged weight, merged bias or None)

    @contextlib.contextmanager
    def off(self) -> Iterator[torch.nn.Module]:
        """The LoRA layers off (`DiffusionLM.lora_off`)."""
        for layer in self.layers:
            layer._disable_adapters = True  # PEFT's own flag; enable_adapters() would also touch requires_grad
        try:
            yield self.dlm.model
        finally:
            for layer in self.layers:
                layer._disable_adapters = False

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """The merged weights swapped in (`DiffusionLM.lora_merged`), the originals back on leaving."""
        model = self.dlm.model
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError("merge_lora folds the LoRA into the base weights, which a quantized (QLoRA) base cannot "
                             "hold: generate without merge_lora, or export a merged full-precision model "
                             "(llm2diff export --merge)")
        if self._merged is None:
            self._merged = []
            for layer in self.layers:
                if layer.merged:
                    continue
                base = layer.get_base_layer()
                bias = base.bias.data if getattr(base, "bias", None) is not None else None
                self._merged.append((layer, base, base.weight.data, bias,
                                     *self.dlm._merged_lora(layer, base.weight.data, bias)))
        # with the merged weights in, each layer is marked merged (PEFT then runs its base layer alone)
        try:
            for layer, base, _, _, weight, bias in self._merged:
                base.weight.data = weight
                if bias is not None:  # lora_bias: merged into the bias too
                    base.bias.data = bias
                layer.merged_adapters.extend(a for a in layer.active_adapters if a in layer.lora_A)
            yield
        finally:
            for layer, base, weight, bias, _, merged_bias in self._merged:
                base.weight.data = weight
                if merged_bias is not None:
                    base.bias.data = bias
                layer.merged_adapters.clear()


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process (all optimizers), see `lora_state_key`


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def lora_state_key(layer, weight: torch.Tensor) -> tuple:
    """What a LoRA layer's merged weight depends on: the base weight and the active adapters' A and B (storage
    and in-place version counters, which in-place writes advance), the scaling, and the number of optimizer steps
    taken in this process: fused optimizers (torch's fused AdamW, the transformers default) update parameters
    without advancing their version counters, so any optimizer step invalidates a merged weight."""
    parts = [_OPTIMIZER_STEPS[0], weight.data_ptr(), weight._version]
    for name in layer.active_adapters:
        if name in layer.lora_A:
            for module in (layer.lora_A[name], layer.lora_B[name]):
                parts += [(p.data_ptr(), p._version) for p in module.parameters()]
            parts.append(layer.scaling[name])
    return tuple(parts)
