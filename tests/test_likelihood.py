"""Log-likelihoods for scoring: the diffusion model's Monte-Carlo ELBO and the AR parent's exact log-likelihood.

Invariants: block size 1 with shift (the AR twin) makes the ELBO the exact AR log-likelihood; the AR score is the
gathered log-softmax of a plain forward; a pad that completes the last block is never scored; the estimate is
deterministic for a seed; and after training, the ELBO ranks the planted continuation first."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.evaluation.likelihood import ar_loglikelihood, elbo_loglikelihood, elbo_samples, loglikelihood
from llm2diff.training.layout import build_layout, pad_response_to_blocks
from llm2diff.training.objective import diffusion_loss

CONTEXT = [5, 6, 7, 8, 9]
CONTINUATION = [20, 21, 22, 23, 24, 25]  # 6 tokens: with block size 4 the last block has 2 pad positions


def _independent_ar_loglikelihood(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(continuation))


def train_planted(dlm, pairs, steps=40, lr=1e-2, copies=4, seed=0):
    """Full fine-tune with AdamW directly on `diffusion_loss` until the model completes each prompt as planted."""
    model, cfg, tok = dlm.model, dlm.config, dlm.tokenizer
    prompts = [list(p) for p, _ in pairs] * copies
    responses = [pad_response_to_blocks(r, cfg.block_size, tok.eos_token_id) for _, r in pairs] * copies
    layout = build_layout(prompts, responses, cfg.block_size, pad_id=tok.pad_token_id, shift=cfg.shift)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss, _ = diffusion_loss(model, layout, cfg.mask_token_id, t_min=0.1, t_max=1.0, weighting="mean",
                                 generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return dlm


def test_elbo_is_deterministic_for_a_seed_and_changes_with_it():
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    first = elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=8, seed=3)
    assert elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=8, seed=3) == first
    # the batch size only groups the forward passes: same samples, same estimate
    regrouped = elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=8, seed=3, batch_size=3)
    assert regrouped == pytest.approx(first, abs=1e-4)
    assert elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=8, seed=4) != first
    samples = elbo_samples(dlm, CONTEXT, CONTINUATION, num_samples=8, seed=3)
    assert samples.shape == (8,) and bool((samples <= 0).all()) and float(samples.mean()) == pytest.approx(first)
    # the global RNG is neither used nor disturbed
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=4, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_size_one_elbo_is_the_exact_ar_loglikelihood(arch):
    """The AR twin: with block size 1 and shift every token is masked with weight 1 and read from the clean prefix."""
    model = make_model(arch)
    reference = _independent_ar_loglikelihood(model, CONTEXT, CONTINUATION)
    dlm = adapt(model, make_tokenizer(), block_size=1)
    for seed in (0, 1):
        estimate = elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=4, seed=seed)
        assert estimate == pytest.approx(reference, abs=1e-4)
    assert loglikelihood(dlm, CONTEXT, CONTINUATION) == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ar_loglikelihood_is_the_gathered_log_softmax_of_a_plain_forward(arch):
    model = make_model(arch)
    expected = _independent_ar_loglikelihood(model, CONTEXT, CONTINUATION)
    assert ar_loglikelihood(model, CONTEXT, CONTINUATION) == pytest.approx(expected, abs=1e-4)
    assert ar_loglikelihood(model, CONTEXT, CONTINUATION[:1]) == pytest.approx(
        _independent_ar_loglikelihood(model, CONTEXT, CONTINUATION[:1]), abs=1e-5)


def test_pads_completing_the_last_block_are_not_scored():
    """With t = 1 everything real is masked (weight 1): a one-token continuation is the first token of its block,
    read from the clean last context position, so its ELBO is the exact AR log-prob; the 3 pad positions of the
    block add no term."""
    model = make_model("llama")
    dlm = adapt(model, make_tokenizer(), block_size=4)
    one = elbo_loglikelihood(dlm, CONTEXT, [20], num_samples=2, t_min=1.0, t_max=1.0)
    assert one == pytest.approx(_independent_ar_loglikelihood(model, CONTEXT, [20]), abs=1e-4)
    # deterministic at t = 1 whatever the seed, and a partial block scores exactly its real tokens
    two = [elbo_loglikelihood(dlm, CONTEXT, [20, 21], num_samples=2, seed=s, t_min=1.0, t_max=1.0) for s in (0, 1)]
    assert two[0] == pytest.approx(two[1], abs=1e-5) and two[0] < one


def test_parent_loglikelihood_is_the_model_without_its_adapter():
    from peft import LoraConfig

    parent_score = _independent_ar_loglikelihood(make_model("qwen3"), CONTEXT, CONTINUATION)
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    parent = loglikelihood(dlm, CONTEXT, CONTINUATION, use_parent=True, num_samples=4)  # ELBO options ignored
    assert parent == pytest.approx(parent_score, abs=1e-4)
    adapted = ar_loglikelihood(dlm.model, CONTEXT, CONTINUATION)
    assert abs(adapted - parent_score) > 1e-3  # the adapter matters
    # the ELBO runs through the PEFT model, adapter on (t = 1, one token: the adapted model's AR log-prob)
    one = elbo_loglikelihood(dlm, CONTEXT, [20], num_samples=2, t_min=1.0, t_max=1.0)
    assert one == pytest.approx(ar_loglikelihood(dlm.model, CONTEXT, [20]), abs=1e-4)
    text = loglikelihood(dlm, "tom has 3", "apples now", use_parent=True)  # strings are tokenized
    ids = dlm.tokenizer("tom has 3", add_special_tokens=False).input_ids
    with dlm.ar_parent() as parent:
        assert text == pytest.approx(ar_loglikelihood(parent, ids, dlm.tokenizer("apples now").input_ids))


def test_bad_input():
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    with pytest.raises(ValueError, match="context"):
        elbo_loglikelihood(dlm, [], CONTINUATION)
    with pytest.raises(ValueError, match="continuation"):
        elbo_loglikelihood(dlm, CONTEXT, [])
    with pytest.raises(ValueError, match="num_samples"):
        elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, num_samples=0)
    with pytest.raises(ValueError, match="noise window"):
        elbo_loglikelihood(dlm, CONTEXT, CONTINUATION, t_min=0.5, t_max=0.2)
    dlm.weights_are_parent = False  # as after full fine-tuning; no base is recorded to load the parent from
    with pytest.raises(RuntimeError, match="no adapter"):
        loglikelihood(dlm, CONTEXT, CONTINUATION, use_parent=True)


def test_trained_model_ranks_the_planted_continuation_first():
    planted = [30, 31, 32, 33, 34, 35]
    distractors = [CONTINUATION, [35, 34, 33, 32, 31, 30], [20, 21, 22, 30, 31, 32]]
    assert all(len(d) == len(planted) for d in distractors)
    dlm = adapt(make_model("qwen2", seed=1), make_tokenizer(), block_size=4)

    def ranked_first(seed):
        score = elbo_loglikelihood(dlm, CONTEXT, planted, num_samples=16, seed=seed)
        others = [elbo_loglikelihood(dlm, CONTEXT, d, num_samples=16, seed=seed) for d in distractors]
        return score > max(others), (seed, score, others)

    assert not ranked_first(0)[0]  # not already true of the untrained model: the check below is not vacuous
    train_planted(dlm, [(CONTEXT, planted)], steps=40)
    for seed in (0, 1, 2):
        first, detail = ranked_first(seed)
        assert first, detail


@pytest.mark.parametrize("kind", ["expected_embedding", "hidden"])
def test_a_self_conditioned_model_is_scored_as_the_sampler_runs_it(kind):
    """At t = 1 every block is fully masked, so the ELBO is the sum of GRPO's one-pass log-probs (both
    self-conditioned: a first pass conditions the scored one); a fresh path scores as a model without one."""
    from llm2diff.modeling.self_conditioning import self_conditioning_module
    from llm2diff.rl.logprobs import diffusion_token_logps

    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4, self_conditioning=kind)
    plain = adapt(make_model("llama"), make_tokenizer(), block_size=4)
    context, continuation = [5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25]
    assert elbo_loglikelihood(dlm, context, continuation, num_samples=4) == \
        pytest.approx(elbo_loglikelihood(plain, context, continuation, num_samples=4), abs=1e-5)
    weight = self_conditioning_module(dlm.model).proj.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    full = elbo_samples(dlm, context, continuation, num_samples=2, t_min=1.0, t_max=1.0)
    c = dlm.config
    one_pass = diffusion_token_logps(
        dlm.model, torch.tensor([context]), torch.ones(1, 5, dtype=torch.long), torch.tensor([continuation]),
        torch.ones(1, 6, dtype=torch.long), c.block_size, c.mask_token_id, dlm.tokenizer.eos_token_id,
        shift=c.shift, self_conditioning=kind, vocab_size=c.vocab_size)
    assert full[0] == full[1] == pytest.approx(float(one_pass.sum()), abs=1e-4)
    assert float(full[0]) != pytest.approx(elbo_loglikelihood(plain, context, continuation, num_samples=1,
                                                              t_min=1.0, t_max=1.0), abs=1e-3)
