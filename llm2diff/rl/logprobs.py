"""Per-token log-probabilities of a completion under the block-diffusion model (the policy term of diffusion GRPO).

    seeds = row_seeds(prompt_completion_ids, attention_mask)
    logps = diffusion_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, block_size=4,
                                  mask_token_id=dlm.config.mask_token_id, pad_token_id=tok.pad_token_id,
                                  estimator="coupled", seed=seeds)            # (B, T), differentiable

A diffusion LM has no exact per-token likelihood, so GRPO uses a one- or two-forward estimate, built on the
training layout `[prompt ; clean response ; noisy response]` (`llm2diff.training.layout`):

* "one_pass" (diffu-GRPO, Zhao et al. 2025, "d1"): every completion token of the noisy copy is masked, so token j
  is scored as log p(x_j | prompt, clean earlier blocks, its own block fully masked); one forward. Optionally each
  prompt token is replaced by the mask token with probability `mask_prompt_prob` (d1's prompt masking).
* "coupled" (coupled-GRPO, Gong et al. 2025, "DiffuCoder"): draw a noise level t and a mask m (each completion token
  masked with probability t), run the layout with m and with its complement ~m (one batched forward of 2B rows);
  each token's log-prob comes from the pass in which it is masked, so every token is scored exactly once per pair.

Positions of the last block past the completion's end are always masked (at sampling time they are unknown too).
With block size 1 and token shift the layout is the plain causal sequence and "one_pass" is exactly the AR log-prob.

All randomness comes from `torch.Generator`s seeded by `seed`, so old, new and reference log-probs of the same batch
draw the same masks. `seed` is an int (one generator for the batch, rows drawn in order) or one int per row (a
generator per row: the draw then depends on the row's content only, not on its place in the batch; see `row_seeds`).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import replace

import torch

from llm2diff.training.layout import build_layout
from llm2diff.modeling.self_conditioning import self_conditioned
from llm2diff.training.objective import _embedding_weight, _repeat_layout, layout_logits, self_conditioning_inputs

ESTIMATORS = ("one_pass", "coupled")


def _digest(parts: Sequence[torch.Tensor], base: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(int(base).to_bytes(8, "little", signed=True))
    for part in parts:
        h.update(part.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def batch_seed(input_ids: torch.Tensor, base: int = 0) -> int:
    """A deterministic seed from a whole batch's token ids (blake2b of the ids, shape and `base`)."""
    ids = torch.as_tensor(input_ids)
    return _digest([torch.tensor(ids.shape), ids.reshape(-1)], base)


def row_seeds(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, base: int = 0) -> list[int]:
    """One deterministic seed per row from that row's non-padding token ids (independent of batch order/padding)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    return [_digest([row[keep]], base) for row, keep in zip(ids, mask)]


def _generators(seed: int | Sequence[int], batch: int) -> list[torch.Generator]:
    if isinstance(seed, numbers.Integral) or (isinstance(seed, torch.Tensor) and seed.dim() == 0):
        gen = torch.Generator().manual_seed(int(seed))
        return [gen] * batch  # one generator, rows drawn in order
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or one int per row; got {len(seeds)} seeds for {batch} rows")
    return [torch.Generator().manual_seed(s) for s in seeds]


def coupled_masks(valid: torch.Tensor, t: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled pair of masks over the valid completion tokens.

    Args:
        valid: `(batch, R)` bool, the completion tokens (a prefix of each row).
        t: `(batch,)` mask probability per row.
        generator: one generator, or one per row (each draws `valid[b].sum()` uniforms).

    Returns:
        `(m, complement)`, both `(batch, R)` bool: m & complement is empty and m | complement == valid.
    """
    gens = [generator] * valid.shape[0] if isinstance(generator, torch.Generator) else list(generator)
    m = torch.zeros(valid.shape, dtype=torch.bool)
    for b, gen in enumerate(gens):
        n = int(valid[b].sum())
        m[b, :n] = torch.rand(n, generator=gen) < float(t[b])
    m = m.to(valid.device) & valid
    return m, valid & ~m


def _token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool,
                 entropy_grad: bool):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token = logp.gather(-1, targets[:, None]).squeeze(-1)
    entropy = None
    if want_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


def diffusion_token_logps(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, block_size: int, mask_token_id: int, pad_token_id: int, shift: bool = True,
    estimator: str = "one_pass", mask_prompt_prob: float = 0.0, seed: int | Sequence[int] = 0,
    t: float | None = None, t_range: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0,
    return_entropy: bool = False, entropy_grad: bool = True, causal_clean: bool = False,
    self_conditioning: str | None = None, vocab_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the completion tokens under the block-diffusion model.

    Args:
        model: the (PEFT) causal LM driven as a block-diffusion LM (also a DDP wrapper).
        prompt_ids, prompt_mask: `(B, P)` prompts, padded on either side (mask 1 = real token).
        completion_ids, completion_mask: `(B, T)` completions, right-padded (mask 1 = token to score). Tokens past
            the last 1 of a row are dropped.
        block_size, mask_token_id, shift, causal_clean: the model's diffusion settings (`DiffusionConfig`).
        pad_token_id: id written at layout padding.
        estimator: "one_pass" (d1) or "coupled" (DiffuCoder); see the module docstring.
        mask_prompt_prob: probability of replacing each prompt token by the mask token (d1's prompt masking).
        seed: an int, or one int per row (`row_seeds`), for every random draw (t, masks, prompt masking).
        t: the coupled estimator's mask probability; None draws t ~ U(t_range) per row.
        t_range: `(low, high)` window t is drawn from when `t` is None.
        temperature: logits are divided by it before the softmax (as TRL's log-probs are).
        return_entropy: also return the `(B, T)` entropy of each scored token's predictive distribution.
        entropy_grad: keep the entropy differentiable (an entropy bonus needs it; False saves memory).
        self_conditioning, vocab_size: the model's self-conditioning kind and vocabulary size
            (`DiffusionConfig`). With a kind, a no-grad pass over the same masked input first, whose conclusions at
            the masked positions condition the scored pass: the model is scored as the sampler runs it (each pass
            conditioned on the one before) and as training's self-conditioned batches train it.

    Returns:
        `(B, T)` float32 log-probs (0 at padding), differentiable w.r.t. the model's parameters; with
        `return_entropy`, the pair (log-probs, entropies).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if not 0.0 <= mask_prompt_prob < 1.0:
        raise ValueError(f"mask_prompt_prob must be in [0, 1), got {mask_prompt_prob}")
    if t is not None and not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if not 0.0 <= t_range[0] <= t_range[1] <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= low <= high <= 1, got {t_range}")
    if prompt_ids.shape[0] != completion_ids.shape[0] or completion_ids.shape != completion_mask.shape \
            or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"shape mismatch: prompt_ids {tuple(prompt_ids.shape)}, prompt_mask "
                         f"{tuple(prompt_mask.shape)}, completion_ids {tuple(completion_ids.shape)}, completion_mask "
                         f"{tuple(completion_mask.shape)}")
    batch, width = completion_ids.shape
    device = _embedding_weight(model).device
    gens = _generators(seed, batch)
    cmask = completion_mask.bool().cpu()
    lengths = [int(row.nonzero().max()) + 1 if bool(row.any()) else 0 for row in cmask]

    # Rows in the training layout; the tail of the last block (past the completion) is padded and always masked.
    prompts, responses = [], []
    for b in range(batch):
        prompts.append(prompt_ids[b][prompt_mask[b].bool()].tolist())
        resp = completion_ids[b, : lengths[b]].tolist()
        resp += [pad_token_id] * (-len(resp) % block_size)
        responses.append(resp)
    layout = build_layout(prompts, responses, block_size, pad_token_id, shift, causal_clean=causal_clean)
    rmax = layout.target.shape[1]
    valid = torch.zeros(batch, rmax, dtype=torch.bool)  # completion tokens to score
    for b in range(batch):
        valid[b, : lengths[b]] = cmask[b, : lengths[b]]
    in_response = layout.response_valid  # completion tokens plus the block tail

    # Draws, in a fixed order per row: t, the coupled mask, the prompt mask.
    if estimator == "coupled":
        if t is None:
            low, high = t_range
            t_rows = torch.stack([low + (high - low) * torch.rand((), generator=g) for g in gens])
        else:
            t_rows = torch.full((batch,), float(t))
        m, comp = coupled_masks(valid, t_rows, gens)
        passes = [m, comp] if layout.noisy_copy else [valid]
    else:
        passes = [valid]
    ids = layout.input_ids.clone()
    if mask_prompt_prob > 0:
        for b, gen in enumerate(gens):
            p = len(prompts[b])
            hit = torch.rand(p, generator=gen) < mask_prompt_prob
            ids[b, :p][hit] = mask_token_id

    # One batched forward over the passes (rows stacked pass after pass).
    all_ids, selects, hides = [], [], []
    for masked in passes:
        pass_ids = ids.clone()
        if layout.noisy_copy:
            # one_pass masks the whole noisy copy; coupled masks m (or ~m) plus the block tail
            hide = in_response if estimator == "one_pass" else (masked | (in_response & ~valid))
            rows, cols = hide.nonzero(as_tuple=True)
            pass_ids[rows, layout.noisy_index[rows, cols]] = mask_token_id
            hides.append(hide)
        all_ids.append(pass_ids)
        selects.append(masked)
    n_pass = len(passes)
    stacked = layout if n_pass == 1 else _repeat_layout(layout, n_pass)
    stacked = replace(stacked, **{k: v.to(device) for k, v in vars(stacked).items() if isinstance(v, torch.Tensor)})
    select = torch.cat(selects).to(device)
    input_ids = torch.cat(all_ids).to(device)

    logps = torch.zeros(batch, width, device=device, dtype=torch.float32)
    entropy = torch.zeros(batch, width, device=device, dtype=torch.float32) if return_entropy else None
    if not bool(select.any()):  # nothing to score: zeros still connected to the graph
        # (through a trainable parameter: the stored embedding is frozen under LoRA)
        trainable = next((p for p in model.parameters() if p.requires_grad), None)
        if trainable is not None:
            logps = logps + trainable.sum() * 0.0
        return (logps, entropy) if return_entropy else logps
    condition = (None, None, None)
    if self_conditioning and layout.noisy_copy:
        hidden = torch.cat(hides).to(device)  # the masked positions of every pass's noisy copy
        condition = self_conditioning_inputs(model, stacked, input_ids, hidden, self_conditioning, mask_token_id,
                                             vocab_size)
    with self_conditioned(model, *condition):
        logits = layout_logits(model, stacked, input_ids, select)
    rows, cols = select.nonzero(as_tuple=True)
    token, ent = _token_logps(logits, stacked.target[rows, cols], temperature, return_entropy, entropy_grad)
    rows = rows % batch  # pass k's row b is stacked row k * batch + b
    logps = logps.index_put((rows, cols), token, accumulate=True)
    if return_entropy:
        entropy = entropy.index_put((rows, cols), ent, accumulate=True)
        return logps, entropy
    return logps

