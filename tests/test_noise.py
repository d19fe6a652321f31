"""The noise menu: schedules, t sampling, semantic order, complementary and position-dependent masks, CART weights,
loss normalisation, attention annealing, and the combinations that are rejected."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff.modeling.attention import CLEAN, NOISY, anneal_block_mask, block_diffusion_mask
from llm2diff.noise.masking import (
    NoiseSpec,
    cart_weights,
    draw_noise,
    position_exponents,
    reduce_loss,
    semantic_order_mask,
    with_complement,
)
from llm2diff.noise.schedule import (
    complement_weight,
    elbo_weight,
    mask_probability,
    mask_probability_rate,
    sample_noise_levels,
)
from llm2diff.training.collator import BlockDiffusionCollator
from llm2diff.training.layout import build_layout
from llm2diff.training.objective import apply_noise, diffusion_loss


def _blocks(batch: int, length: int, block_size: int) -> torch.Tensor:
    return (torch.arange(length) // block_size)[None].expand(batch, -1).clone()


# -- schedules -------------------------------------------------------------------------------------------------
def test_schedule_values_by_hand():
    t = torch.tensor([0.5], dtype=torch.float64)
    assert mask_probability(t, "linear").item() == 0.5 and elbo_weight(t, "linear").item() == 2.0
    p = 1 - math.cos(math.pi / 4)
    rate = math.pi / 2 * math.sin(math.pi / 4)
    assert mask_probability(t, "cosine").item() == pytest.approx(p)
    assert mask_probability_rate(t, "cosine").item() == pytest.approx(rate)
    assert elbo_weight(t, "cosine").item() == pytest.approx(rate / p)  # 3.7922...
    assert mask_probability(t, "loglinear").item() == pytest.approx(0.999 * 0.5)
    assert elbo_weight(t, "loglinear").item() == pytest.approx(2.0)
    assert complement_weight(torch.tensor(0.25), "linear").item() == pytest.approx(1 / 0.75)
    assert complement_weight(t, "cosine").item() == pytest.approx(rate / (1 - p))


def test_stratified_draws_fill_every_stratum_and_antithetic_pairs():
    t = sample_noise_levels((2, 5), 0.0, 1.0, torch.Generator().manual_seed(0), sampling="stratified")
    strata = sorted((t.flatten() * 10).floor().long().tolist())
    assert strata == list(range(10))
    t = sample_noise_levels((3, 2), 0.2, 0.6, torch.Generator().manual_seed(0), sampling="antithetic").flatten()
    assert torch.allclose(t[:3] + t[3:], torch.full((3,), 0.8))
    assert t.min() >= 0.2 and t.max() <= 0.6
    with pytest.raises(ValueError, match="t_sampling must be one of uniform, stratified, antithetic"):
        sample_noise_levels((2,), 0, 1, sampling="sobol")


# -- semantic order --------------------------------------------------------------------------------------------
def test_semantic_masks_exactly_the_least_significant_fraction():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    spec = NoiseSpec(t_min=0.5, t_max=0.5, order="semantic")
    for seed in range(5):  # p n = 2 per block is an integer: the set does not depend on the seed
        noise = draw_noise(_blocks(1, 8, 4), valid, 4, spec, scores, torch.Generator().manual_seed(seed))
        assert noise.masked[0].nonzero().flatten().tolist() == [1, 3, 4, 7]
    # per sequence: the 4 least significant of the whole response
    spec = NoiseSpec(t_min=0.5, t_max=0.5, order="semantic", unit="sequence")
    noise = draw_noise(_blocks(1, 8, 4), valid, 4, spec, scores, torch.Generator().manual_seed(0))
    assert noise.masked[0].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_semantic_fractional_count_rounds_randomly_and_keeps_order():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]]).expand(400, -1)
    valid = torch.ones_like(scores, dtype=torch.bool)
    p = torch.full(scores.shape, 0.6)  # 2.4 tokens: the two least always, the third 40% of the time
    masked = semantic_order_mask(scores, valid, p, 4, 0.0, torch.Generator().manual_seed(0))
    assert masked[:, 1].all() and masked[:, 3].all() and not masked[:, 0].any()
    assert 0.3 < masked[:, 2].float().mean() < 0.5


def test_semantic_ignores_padding_and_temperature_mixes_toward_random():
    scores = torch.tensor([[0.4, 0.1, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, False]])
    masked = semantic_order_mask(scores, valid, torch.full((1, 4), 0.5), 4, 0.0, torch.Generator().manual_seed(0))
    assert masked.tolist() == [[False, True, False, False]]  # one of the two valid tokens, the least significant
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]]).expand(2000, -1)
    valid = torch.ones_like(scores, dtype=torch.bool)
    p = torch.full(scores.shape, 0.25)
    hot = semantic_order_mask(scores, valid, p, 4, 100.0, torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(hot, torch.full((4,), 0.25), atol=0.05)  # nearly uniform
    warm = semantic_order_mask(scores, valid, p, 4, 0.3, torch.Generator().manual_seed(0)).float().mean(0)
    assert warm[1] > warm[3] > warm[2] > warm[0]  # still least significant first


def test_infinite_temperature_is_ordinary_random_masking():
    scores = torch.rand(3, 8)
    valid = torch.ones(3, 8, dtype=torch.bool)
    hot = draw_noise(_blocks(3, 8, 4), valid, 4, NoiseSpec(order="semantic", semantic_temperature=math.inf), scores,
                     torch.Generator().manual_seed(7))
    plain = draw_noise(_blocks(3, 8, 4), valid, 4, NoiseSpec(), None, torch.Generator().manual_seed(7))
    assert torch.equal(hot.masked, plain.masked) and torch.equal(hot.t, plain.t)


def test_semantic_without_scores_is_an_error():
    with pytest.raises(ValueError, match="needs significance scores"):
        draw_noise(_blocks(1, 4, 4), torch.ones(1, 4, dtype=torch.bool), 4, NoiseSpec(order="semantic"))


def test_collator_carries_scores_and_block_padding_ranks_lowest():
    collate = BlockDiffusionCollator(block_size=4, eos_token_id=2, pad_token_id=0)
    batch = collate([{"prompt_ids": [5], "response_ids": [7, 8, 2], "response_scores": [0.5, 0.9, 0.2]},
                     {"prompt_ids": [5, 6], "response_ids": [7, 2], "response_scores": [0.3, 0.1]}])
    assert batch["scores"].tolist() == [pytest.approx([0.5, 0.9, 0.2, -0.8]), pytest.approx([0.3, 0.1, -0.9, -0.9])]
    assert batch["block_size"] == 4


# -- complementary and position-dependent masks ----------------------------------------------------------------
def test_complementary_masks_partition_the_response_with_their_weights():
    valid = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    spec = NoiseSpec(complementary=True, t_max=0.999)
    noise = draw_noise(_blocks(2, 8, 4), valid, 4, spec, None, torch.Generator().manual_seed(0))
    both = with_complement(noise, spec, 4, _blocks(2, 8, 4))
    first, second = both.masked[:2], both.masked[2:]
    assert not (first & second).any() and torch.equal(first | second, valid)
    assert both.copy.tolist() == [0, 0, 1, 1]
    t = both.t[2:]
    assert torch.allclose(both.weight[2:][second], (1 / (1 - t))[second])
    assert torch.allclose(both.weight[:2][first], (1 / both.t[:2])[first])


def test_position_dependent_masking_masks_later_tokens_more_with_jacobian_weights():
    g = position_exponents(_blocks(1, 4, 4), 4, 1.0)[0]
    assert torch.allclose(g, torch.tensor([math.e, math.exp(1 / 3), math.exp(-1 / 3), 1 / math.e]))
    spec = NoiseSpec(position_strength=1.0)
    noise = draw_noise(_blocks(4000, 4, 4), torch.ones(4000, 4, dtype=torch.bool), 4, spec, None,
                       torch.Generator().manual_seed(0))
    rates = noise.masked.float().mean(0)
    assert rates[0] < rates[1] < rates[2] < rates[3]
    # E[t^g] for t ~ U(0.001, 1) is about 1 / (g + 1)
    assert torch.allclose(rates, 1 / (g + 1), atol=0.03)
    t, m = noise.t, noise.masked
    assert torch.allclose(noise.weight[m], (g[None].expand_as(t) / t)[m])  # g_j / t for linear
    assert torch.allclose(noise.p, t ** g[None])


def test_position_dependent_complement_weight():
    spec = NoiseSpec(position_strength=0.5, complementary=True, t_max=0.9)
    noise = draw_noise(_blocks(64, 4, 4), torch.ones(64, 4, dtype=torch.bool), 4, spec, None,
                       torch.Generator().manual_seed(1))
    both = with_complement(noise, spec, 4, _blocks(64, 4, 4))
    g = position_exponents(_blocks(64, 4, 4), 4, 0.5)
    t = noise.t
    expected = g * t ** (g - 1) / (1 - t ** g)  # |d(1 - t^g)/dt| / (1 - t^g)
    second = both.masked[64:]
    assert torch.allclose(both.weight[64:][second], expected[second], rtol=1e-5)


# -- CART ------------------------------------------------------------------------------------------------------
def test_cart_weights_by_hand():
    # prompt of 2, blocks of 2, response of 4; block 1 has its first token masked, its second clean
    masked = torch.tensor([[False, True, True, False]])
    valid = torch.ones_like(masked)
    w = cart_weights(masked, valid, block_size=2, prompt_lengths=torch.tensor([2]), p=0.5)

    def kernel(d):  # geometric p (1-p)^(d-1)
        return 0.5 * 0.5 ** (d - 1)

    # response token 1 (absolute 3): visible clean = prompt (abs 0,1) and token 0 (abs 2) of its own block
    token1 = 0.5 * (kernel(3) + kernel(2) + kernel(1))
    # response token 2 (abs 4): prompt, block 0 (abs 0..3), and clean token 3 (abs 5) of its own block
    token2 = 0.5 * (kernel(4) + kernel(3) + kernel(2) + kernel(1) + kernel(1))
    assert w[0].tolist() == pytest.approx([0.0, token1, token2, 0.0])


# -- loss normalisation ------------------------------------------------------------------------------------------
def test_reduce_loss_normalisations():
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    weight = torch.tensor([[2.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    masked = weight > 0
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    assert reduce_loss(ce, weight, masked, valid, "response").item() == pytest.approx((2 + 3 + 5) / 6)
    assert reduce_loss(ce, weight, masked, valid, "masked").item() == pytest.approx((2 + 3 + 5) / 3)
    assert reduce_loss(ce, weight, masked, valid, "sequence").item() == pytest.approx(((2 + 3) / 4 + 5 / 2) / 2)
    with pytest.raises(ValueError, match="loss_normalization must be one of"):
        reduce_loss(ce, weight, masked, valid, "tokens")


# -- rejected combinations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, block, message", [
    (NoiseSpec(order="semantic", position_strength=1.0), 4, "both decide which tokens go first"),
    (NoiseSpec(order="semantic", complementary=True, t_max=0.9), 4, "inverts semantic noise"),
    (NoiseSpec(complementary=True), 4, "complementary_masks with loss_weighting 'elbo' needs t_max < 1"),
    (NoiseSpec(complementary=True, schedule="cosine"), 4, "needs t_max < 1"),
    (NoiseSpec(complementary=True, t_max=0.999), 1, "causal-LM SFT"),
    (NoiseSpec(weighting="cart"), 1, "causal-LM SFT"),
    (NoiseSpec(t_min=0.0), 4, "needs t_min > 0"),
    (NoiseSpec(schedule="cosine-ish"), 4, "unknown noise_schedule"),
    (NoiseSpec(unit="token"), 4, "noise_unit must be one of block, sequence"),
    (NoiseSpec(semantic_temperature=-1.0), 4, "semantic_temperature must be >= 0"),
    (NoiseSpec(cart_p=1.0, weighting="cart"), 4, "cart_p must be in"),
])
def test_invalid_combinations_are_rejected(spec, block, message):
    with pytest.raises(ValueError, match=message):
        spec.validate(block)


def test_valid_combinations_pass():
    NoiseSpec(complementary=True, schedule="loglinear").validate(4)  # p(1) = 0.999 < 1
    NoiseSpec(complementary=True, t_max=0.999, position_strength=1.0, t_sampling="antithetic").validate(4)
    NoiseSpec(order="semantic", semantic_temperature=math.inf, unit="sequence", weighting="cart").validate(4)
    NoiseSpec(weighting="mean").validate(1)


# -- the objective with the whole menu -------------------------------------------------------------------------
def _layout():
    return build_layout([[5, 6], [5, 6, 7]], [[8, 9, 10, 2], [11, 12, 2, 2]], block_size=2, pad_id=0,
                        scores=[[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.0, 0.0]])


def test_apply_noise_complementary_doubles_rows_and_masks_every_token_once():
    spec = NoiseSpec(complementary=True, t_max=0.999)
    layout, ids, noise = apply_noise(_layout(), 99, spec, torch.Generator().manual_seed(0))
    assert layout.input_ids.shape[0] == 4
    masked_count = (ids == 99).sum(1)
    assert masked_count[:2].tolist() == (4 - masked_count[2:]).tolist()
    assert torch.equal(noise.masked[:2] | noise.masked[2:], noise.valid[:2])


@pytest.mark.parametrize("spec", [
    NoiseSpec(schedule="cosine", t_sampling="stratified"),
    NoiseSpec(complementary=True, t_max=0.999, t_sampling="antithetic"),
    NoiseSpec(position_strength=1.0, normalization="sequence"),
    NoiseSpec(order="semantic", semantic_temperature=0.5),
    NoiseSpec(weighting="cart", unit="sequence"),
])
def test_diffusion_loss_runs_every_option_and_backpropagates(spec):
    from llm2diff import adapt

    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=2)
    loss, stats = diffusion_loss(dlm.model, _layout(), dlm.config.mask_token_id, spec=spec,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert dlm.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert stats.num_response_tokens == (16 if spec.complementary else 8)


# -- attention annealing ---------------------------------------------------------------------------------------
def test_annealing_at_zero_reads_each_block_causally_and_at_one_is_the_block_mask():
    layout = build_layout([[5, 6]], [[8, 9, 10, 11]], block_size=2, pad_id=0)
    allowed = block_diffusion_mask(layout.segment, layout.block)
    assert torch.equal(anneal_block_mask(allowed, layout.segment, layout.block, layout.position_ids, 1.0), allowed)
    causal = anneal_block_mask(allowed, layout.segment, layout.block, layout.position_ids, 0.0)
    pos, seg = layout.position_ids[0], layout.segment[0]
    same_block = (layout.block[0][:, None] == layout.block[0][None]) & (seg[:, None] == seg[None])
    response = (seg == CLEAN) | (seg == NOISY)
    later = pos[None, :] > pos[:, None]
    assert not (causal[0] & same_block & later & response[:, None]).any()
    assert torch.equal(causal[0] | (allowed[0] & same_block & later & response[:, None]), allowed[0])
    half = anneal_block_mask(allowed.expand(2000, -1, -1), layout.segment.expand(2000, -1),
                             layout.block.expand(2000, -1), layout.position_ids.expand(2000, -1), 0.5,
                             torch.Generator().manual_seed(0))
    dropped = (allowed.expand(2000, -1, -1) & ~half).float().sum((1, 2)).mean()
    candidates = (allowed[0] & same_block & later & response[:, None]).sum()
    assert abs(dropped.item() - 0.5 * candidates.item()) < 0.1 * candidates.item()


def test_annealing_at_zero_clean_copy_is_the_ar_parent():
    from llm2diff.modeling.attention import to_additive_mask

    model = make_model("llama")
    layout = build_layout([[5, 6, 7]], [[8, 9, 10, 11]], block_size=4, pad_id=0)
    allowed = anneal_block_mask(block_diffusion_mask(layout.segment, layout.block), layout.segment, layout.block,
                                layout.position_ids, 0.0)
    with torch.no_grad():
        ours = model(input_ids=layout.input_ids, attention_mask=to_additive_mask(allowed, torch.float32),
                     position_ids=layout.position_ids).logits[0, :7]
        parent = model(input_ids=layout.input_ids[:, :7]).logits[0]
    assert torch.allclose(ours, parent, atol=1e-5)
