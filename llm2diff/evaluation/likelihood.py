"""Log-likelihood of a continuation given a context: a Monte-Carlo ELBO for the block-diffusion model, the exact
sum of log-probs for its AR parent. Used to score multiple-choice answers (e.g. ARC-Challenge).

    from llm2diff.evaluation.likelihood import loglikelihood
    ll = loglikelihood(dlm, context_ids, continuation_ids, num_samples=32, seed=0)   # diffusion: ELBO <= log p
    ll_ar = loglikelihood(dlm, context_ids, continuation_ids, use_parent=True)      # AR parent: exact log p

The ELBO estimator (absorbing noise, linear schedule; MDLM, Sahoo et al. 2024; BD3-LM, Arriola et al. 2025)
---------------------------------------------------------------------------------------------------------
The context is the prompt and the continuation the response of the *training* layout
(`llm2diff.training.layout.build_layout`), so one forward scores every block at once exactly as training does. For
one Monte-Carlo sample:

    t_b ~ U[t_min, t_max]                       one noise level per block b (window from `dlm.config`)
    m_j ~ Bernoulli(t_b(j))                     which continuation tokens are masked in the noisy copy
    elbo = - sum_{j : m_j} w(t_b(j)) * CE_j     w(t) = -alpha'(t) / (1 - alpha(t)) = 1/t for the linear schedule

where `CE_j = -log p_theta(x_j | noisy block, clean context and earlier clean blocks)`. The estimate is the mean of
`num_samples` such samples. Its expectation is `-(1/(t_max - t_min)) * integral_{t_min}^{t_max} E[sum w CE] dt`
per block: the masked-diffusion ELBO (a lower bound of log p(continuation | context)) when the window is [0, 1],
and the same truncated-window objective the trainer minimises otherwise. With `stratified=True` (default) the t of
each block are stratified over the samples (one draw per stratum `[k/S, (k+1)/S)` of the window, strata shuffled
independently per block), which lowers the variance without bias. Deterministic for a seed: all randomness comes
from a CPU `torch.Generator` (never the global RNG), so the same seed gives the same t and masks on any device.

Partial last block: the continuation is scored as is (no end-of-sequence is appended). When its length is not a
multiple of `block_size`, the layout is padded to whole blocks with extra positions (end-of-sequence ids) that are
*always masked* in the noisy copy and never scored: they are visible-as-masked context to the last block (as the
not-yet-committed positions of a block are at inference), i.e. the estimate is the ELBO of the real tokens with the
pads marginalised, never a term for the pads themselves.

A self-conditioned model (`self_conditioning` set) is scored as the sampler runs it: per sample, a first pass over
the noised input computes what it concludes at the masked positions, which conditions the scored pass (two forwards
per chunk of samples).

Block size 1 with token shift is the AR twin: every token is predicted from the clean causal prefix with weight 1,
so the ELBO is deterministic and equals the exact AR log-likelihood (one forward, no sampling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from llm2diff.noise.schedule import elbo_weight, sample_token_mask
from llm2diff.training.layout import Layout, build_layout
from llm2diff.modeling.self_conditioning import self_conditioned
from llm2diff.training.objective import layout_logits, self_conditioning_inputs

__all__ = ["ar_loglikelihood", "elbo_loglikelihood", "elbo_samples", "loglikelihood"]


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_ids(context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    context, continuation = [int(i) for i in context_ids], [int(i) for i in continuation_ids]
    if not context:
        raise ValueError("the context must hold at least one token (it predicts the continuation's first token)")
    if not continuation:
        raise ValueError("the continuation to score is empty")
    return context, continuation


def _repeat(layout: Layout, n: int, device: torch.device) -> Layout:
    """The single-example layout repeated `n` times along the batch (one row per Monte-Carlo sample)."""
    fields = {k: (v.to(device).repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v)
              for k, v in vars(layout).items()}
    return Layout(**fields)


def _sample_noise(num_samples: int, num_blocks: int, response_block: torch.Tensor, real: torch.Tensor,
                  t_min: float, t_max: float, schedule: str, stratified: bool, generator: torch.Generator,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """t per token `(S, R)` and the scored mask `(S, R)` (real tokens only), drawn on the CPU from `generator`."""
    u = torch.rand((num_samples, num_blocks), generator=generator)
    if stratified:
        strata = torch.stack([torch.randperm(num_samples, generator=generator) for _ in range(num_blocks)], dim=1)
        u = (strata + u) / num_samples
    t_block = t_min + (t_max - t_min) * u
    t = t_block[:, response_block]
    masked = sample_token_mask(t, real.expand(num_samples, -1), schedule, generator)
    return t, masked


@torch.no_grad()
def elbo_samples(
    dlm, context_ids: Sequence[int], continuation_ids: Sequence[int], num_samples: int = 32, seed: int = 0,
    batch_size: int = 8, t_min: float | None = None, t_max: float | None = None, stratified: bool = True,
) -> torch.Tensor:
    """The `num_samples` Monte-Carlo ELBO samples whose mean `elbo_loglikelihood` returns (see the module doc).

    Args:
        dlm: a `DiffusionLM` (its `config` gives block_size, mask_token_id, shift, noise_schedule, t_min, t_max).
        context_ids: the prompt tokens (non-empty), kept clean.
        continuation_ids: the tokens to score (non-empty), not padded with end-of-sequence.
        num_samples: S, Monte-Carlo samples (each one noised copy of the continuation).
        seed: seed of the CPU `torch.Generator` that draws t and the masks.
        batch_size: samples per forward pass.
        t_min, t_max: override the noise window of `dlm.config` (e.g. 0 and 1 for the untruncated ELBO).
        stratified: stratify each block's t over the samples.

    Returns:
        `(S,)` float64 CPU tensor, one ELBO sample each (nats; <= 0). For the AR-twin layout (block size 1 with
        shift) the S samples are identical and equal the exact AR log-likelihood.
    """
    context, continuation = _check_ids(context_ids, continuation_ids)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    cfg = dlm.config
    t_min = cfg.t_min if t_min is None else float(t_min)
    t_max = cfg.t_max if t_max is None else float(t_max)
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"noise window must satisfy 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    block_size, mask_id = cfg.block_size, cfg.mask_token_id
    tok = dlm.tokenizer
    filler = tok.eos_token_id if tok.eos_token_id is not None else mask_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else filler
    n = len(continuation)
    num_blocks = -(-n // block_size)
    response = continuation + [int(filler)] * (num_blocks * block_size - n)
    layout = build_layout([context], [response], block_size, pad_id=int(pad_id), shift=cfg.shift,
                          causal_clean=cfg.causal_clean)
    model = dlm.model
    device = _device(model)

    with _eval_mode(model):
        if not layout.noisy_copy:  # AR twin: every token "masked" with t = 1 (weight 1), nothing random
            single = _repeat(layout, 1, device)
            select = single.response_valid
            logits = layout_logits(model, single, single.input_ids, select)
            ll = -F.cross_entropy(logits.float(), single.target[select], reduction="sum")
            return ll.double().cpu().expand(num_samples).clone()

        generator = torch.Generator().manual_seed(int(seed))
        real = torch.arange(len(response)) < n                                      # (R,)
        t, masked = _sample_noise(num_samples, num_blocks, layout.response_block[0], real, t_min, t_max,
                                  cfg.noise_schedule, stratified, generator)        # (S, R) each
        hidden = masked | ~real                                                     # pads are always masked
        totals = torch.zeros(num_samples, dtype=torch.float64)
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            select = masked[start:stop]
            if not bool(select.any()):
                continue  # no masked real token in this chunk: those samples are 0
            chunk = _repeat(layout, stop - start, device)
            ids = chunk.input_ids.clone()
            rows, cols = hidden[start:stop].nonzero(as_tuple=True)
            ids[rows.to(device), chunk.noisy_index[rows.to(device), cols.to(device)]] = mask_id
            select_dev = select.to(device)
            condition = (None, None, None)
            if cfg.self_conditioning:  # scored as the sampler runs it: a first pass conditions the scored one
                condition = self_conditioning_inputs(model, chunk, ids, hidden[start:stop].to(device),
                                                     cfg.self_conditioning, mask_id, cfg.vocab_size)
            with self_conditioned(model, *condition):
                logits = layout_logits(model, chunk, ids, select_dev)               # (num_selected, vocab)
            ce = F.cross_entropy(logits.float(), chunk.target[select_dev], reduction="none").double().cpu()
            weight = elbo_weight(t[start:stop][select].double(), cfg.noise_schedule)
            sample_rows = select.nonzero(as_tuple=True)[0] + start
            totals.index_add_(0, sample_rows, -(weight * ce))
        return totals


def elbo_loglikelihood(
    dlm, context_ids: list[int], continuation_ids: list[int], num_samples: int = 32, seed: int = 0,
    batch_size: int = 8, **kwargs,
) -> float:
    """Monte-Carlo estimate of the masked-diffusion ELBO of `continuation_ids` given `context_ids` (nats).

    The mean of `elbo_samples(dlm, context_ids, continuation_ids, num_samples, seed, batch_size, **kwargs)`: per
    sample, t per block in `[t_min, t_max]` (from `dlm.config` unless overridden), tokens masked with probability
    t, and `-sum over masked real tokens of (1/t) * CE` (linear schedule; see the module doc). A lower bound of
    log p(continuation | context) in expectation (window [0, 1]); deterministic for a seed; pads that complete
    the last block are masked context, never scored. Runs under `torch.no_grad()` with the model in eval mode.
    """
    return float(elbo_samples(dlm, context_ids, continuation_ids, num_samples=num_samples, seed=seed,
                              batch_size=batch_size, **kwargs).mean())


@torch.no_grad()
def ar_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Exact `sum_j log p(continuation_j | context, continuation_<j)` under a plain causal forward (nats).

    One forward over `context + continuation` (shape `(1, P + n)`); the logits at positions `P-1 .. P+n-2` predict
    the continuation (only those `n` go through the LM head). For the AR parent of a `DiffusionLM` use
    `with dlm.ar_parent() as parent: ar_loglikelihood(parent, ...)` (or `loglikelihood(..., use_parent=True)`).
    """
    context, continuation = _check_ids(context_ids, continuation_ids)
    device = _device(model)
    ids = torch.tensor([context + continuation], dtype=torch.long, device=device)
    with _eval_mode(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                    logits_to_keep=len(continuation) + 1)
    logits = out.logits[0, -(len(continuation) + 1):-1].float()                     # (n, vocab)
    targets = torch.tensor(continuation, dtype=torch.long, device=logits.device)
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())


def _as_ids(tokenizer, value: str | Sequence[int]) -> list[int]:
    if isinstance(value, str):
        return list(tokenizer(value, add_special_tokens=False).input_ids)
    return [int(i) for i in value]


def loglikelihood(dlm, context: str | Sequence[int], continuation: str | Sequence[int], use_parent: bool = False,
                  **kwargs) -> float:
    """log p(continuation | context): the ELBO estimate of the diffusion model, or (`use_parent`) the exact
    log-likelihood of its AR parent (`dlm.ar_parent()`: adapter disabled, or loaded from the recorded base).

    `context` and `continuation` are token ids or strings (tokenized separately, no special tokens added).
    `kwargs` go to `elbo_loglikelihood` (num_samples, seed, batch_size, t_min, t_max, stratified); the exact AR
    score has no such options, so they are ignored with `use_parent=True`.
    """
    context_ids, continuation_ids = _as_ids(dlm.tokenizer, context), _as_ids(dlm.tokenizer, continuation)
    if use_parent:
        with dlm.ar_parent() as parent:
            return ar_loglikelihood(parent, context_ids, continuation_ids)
    return elbo_loglikelihood(dlm, context_ids, continuation_ids, **kwargs)
