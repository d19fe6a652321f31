"""Self-conditioning: a denoising pass also receives, at each masked position, what the previous pass concluded.

    attach_self_conditioning(model, "expected_embedding")   # on the stock causal LM, before the LoRA (adapt does it)
    vectors = expected_embedding(logits, embedding_matrix, mask_token_id, vocab_size)
    with self_conditioned(model, rows, cols, vectors):       # this forward adds the projection of vectors there
        out = model(input_ids=ids, ...)

The added path is `SelfConditioning`, a linear map of the hidden size (no bias) that starts at zero: a freshly
adapted model computes exactly what it computed without it, and training grows it. It sits on the causal LM as the
submodule `llm2diff_self_conditioning`; with LoRA it is one of PEFT's `modules_to_save` (saved in the adapter file,
restored with it, checkpoints included), without LoRA it is part of the model's own weights. The projected vectors
are added to the input embeddings by a forward hook on the embedding layer that lives for one `with` block only,
so the model's forward itself is untouched and nothing stays registered.

What is carried (`self_conditioning` recipe key, saved in `diffusion_config.json`):
  expected_embedding  the token embedding expected under the distribution that predicts the token at the masked
                      position (softmax of its logits, the mask token and spare rows removed, times the embedding
                      matrix): the previous pass's belief, in the space the input already lives in;
  hidden              the last hidden state (after the final norm) at that same position in the previous pass.

Training runs a no-grad pass on half of the batches to produce the conditioning, then trains on the conditioned
pass (`llm2diff.training.objective.diffusion_loss`); the block sampler carries it from each pass of a block to the
next (`llm2diff.sampling.sampler`), and `latent_steps` adds passes that only refine it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llm2diff.names import check_choice

KINDS = ("expected_embedding", "hidden")
ATTRIBUTE = "llm2diff_self_conditioning"


class SelfConditioning(nn.Module):
    """The learned path from a previous pass's conclusion to the next pass's input: `proj`, zero at the start."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.proj(vectors.to(self.proj.weight.dtype))


def check_self_conditioning(kind: str | None, block_size: int | None = None) -> None:
    """Refuse an unknown kind (naming the nearest) or a model with nothing masked to condition (block size 1)."""
    if kind is None:
        return
    check_choice("self_conditioning", kind, KINDS, none_ok=True)
    if block_size == 1:
        raise ValueError("self_conditioning needs block_size > 1: at block size 1 (the AR twin) no position is ever "
                         "masked, so there is nothing to carry from pass to pass")


def _unwrap(model) -> nn.Module:
    """The causal LM under a DistributedDataParallel and a PEFT wrapper."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach_self_conditioning(model) -> nn.Module:
    """Give a stock causal LM the zero-initialised `SelfConditioning` submodule (once). Returns it."""
    base = _unwrap(model)
    existing = getattr(base, ATTRIBUTE, None)
    if existing is not None:
        return existing
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    from llm2diff.modeling.lora import embedding_weight

    module = SelfConditioning(config.hidden_size).to(embedding_weight(base).device)
    base.add_module(ATTRIBUTE, module)
    return module


def self_conditioning_module(model) -> nn.Module | None:
    """The model's self-conditioning path (PEFT's wrapper around it under LoRA, which runs the trained copy while
    the adapter is on), or None when the model has none."""
    return getattr(_unwrap(model), ATTRIBUTE, None)


def load_self_conditioning_weights(model, directory) -> bool:
    """Put the saved projection of a full (adapter-less) model back: `from_pretrained` drops keys its class does not
    know. Returns whether the saved weights held it."""
    from pathlib import Path

    from safetensors import safe_open

    module = self_conditioning_module(model)
    key = f"{ATTRIBUTE}.proj.weight"
    for file in sorted(Path(directory).glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                with torch.no_grad():
                    module.proj.weight.copy_(f.get_tensor(key))
                return True
    return False


def expected_embedding(logits: torch.Tensor, embedding: torch.Tensor, mask_token_id: int,
                       vocab_size: int | None = None) -> torch.Tensor:
    """`(..., hidden)` embedding expected under softmax(`logits`), the mask token and the rows at or above
    `vocab_size` (spare rows no tokenizer id reaches) removed: what the sampler could commit there."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[..., vocab_size:] = float("-inf")
    probs = logits.softmax(-1)
    return probs @ embedding[: probs.shape[-1]].float()


@contextlib.contextmanager
def self_conditioned(model, rows: torch.Tensor, cols: torch.Tensor, vectors: torch.Tensor | None) -> Iterator[None]:
    """Within the block, each forward of `model` adds the self-conditioning projection of `vectors` (`(n, hidden)`)
    to its input embeddings at (`rows[i]`, `cols[i]`); a negative column counts from the end of that forward's
    input. Without vectors (None or none selected) nothing changes."""
    if vectors is None or vectors.shape[0] == 0:
        yield
        return
    module = self_conditioning_module(model)
    if module is None:
        raise RuntimeError("this model has no self-conditioning path: train it with self_conditioning set")

    def add(_layer, _args, output):
        columns = torch.where(cols < 0, cols + output.shape[1], cols)
        return output.index_put((rows, columns), module(vectors).to(output.dtype), accumulate=True)

    handle = _unwrap(model).get_input_embeddings().register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


class LastHidden:
    """Holds the last forward's final hidden states (after the final norm), `(batch, L, hidden)`, once captured."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture_last_hidden(model) -> Iterator[LastHidden]:
    """Within the block, keep each forward's last hidden states (the output of the decoder's final norm, which
    every supported family has) in the yielded holder's `value`."""
    decoder = _unwrap(model).get_decoder()
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise RuntimeError(f"self_conditioning 'hidden' needs the decoder's final norm; {type(decoder).__name__} has "
                           "no `norm`: use self_conditioning 'expected_embedding'")
    holder = LastHidden()

    def keep(_layer, _args, output):
        holder.value = output

    handle = norm.register_forward_hook(keep)
    try:
        yield holder
    finally:
        handle.remove()
