"""Self-conditioning, latent refinement steps and the block-size curriculum: a fresh path changes nothing, training
forward = cached inference with the conditioning carried, cache = recompute, save/load keeps the path, and a
re-blocked layout is the layout built at that block size."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer

from llm2diff import adapt, load
from llm2diff.modeling.lora import embedding_weight
from llm2diff.modeling.self_conditioning import (
    expected_embedding,
    self_conditioned,
    self_conditioning_module,
)
from llm2diff.sampling.block_cache import BlockContext
from llm2diff.training.layout import (
    build_layout,
    parse_block_size_schedule,
    reblock,
    scheduled_block_size,
)
from llm2diff.training.objective import diffusion_loss, layout_logits

PROMPT = [5, 6, 7, 8, 9, 10, 11]
RESPONSE = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 2]  # 3 blocks of 4
KINDS = ("expected_embedding", "hidden")


def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules="all-linear", **kwargs)


def _randomize_path(dlm, seed: int = 0, scale: float = 0.5) -> None:
    """A trained-looking projection (the fresh one is zero)."""
    module = self_conditioning_module(dlm.model)
    weight = getattr(module, "modules_to_save", {"default": module})["default"].proj.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_path_changes_nothing(kind):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 6, 7, 8]])
    attention = (ids != 0).long()
    plain = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, lora=_lora())
    conditioned = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, lora=_lora(), self_conditioning=kind)
    module = self_conditioning_module(conditioned.model)
    assert module is not None and self_conditioning_module(plain.model) is None
    vectors = torch.randn(3, 32)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        reference = conditioned.model(input_ids=x).logits
        with self_conditioned(conditioned.model, torch.tensor([0, 0, 0]), torch.tensor([1, 2, -1]), vectors):
            assert torch.equal(conditioned.model(input_ids=x).logits, reference)
    for latent in (0, 2):
        out = conditioned.generate(ids, attention, max_new_tokens=10, threshold=0.3, latent_steps=latent)
        ref = plain.generate(ids, attention, max_new_tokens=10, threshold=0.3)
        assert torch.equal(out.sequences, ref.sequences)
        if latent:  # each block starts with `latent` passes that commit nothing (counted)
            assert out.nfe > ref.nfe and out.tokens_per_step.count(0) >= latent


@pytest.mark.parametrize("kind", KINDS)
def test_conditioning_reaches_the_masked_positions_only(kind):
    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4, self_conditioning=kind)
    _randomize_path(dlm)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = dlm.model(input_ids=x).logits
        with self_conditioned(dlm.model, torch.tensor([0]), torch.tensor([3]), torch.randn(1, 32)):
            changed = dlm.model(input_ids=x).logits
    # causal parent attention here: positions before 3 cannot see the change, 3 and after do
    assert torch.equal(changed[0, :3], reference[0, :3]) and not torch.allclose(changed[0, 3:], reference[0, 3:])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [True, False])
def test_training_forward_equals_cached_inference_with_conditioning(arch, kind, shift):
    dlm = adapt(make_model(arch), make_tokenizer(), block_size=4, shift=shift, self_conditioning=kind)
    _randomize_path(dlm)
    mask_id = dlm.config.mask_token_id
    layout = build_layout([PROMPT], [RESPONSE], 4, pad_id=0, shift=shift)
    ids = layout.input_ids.clone()
    masked = torch.zeros_like(layout.response_valid)
    masked[0, [1, 2, 3, 5, 6, 9, 10, 11]] = True
    ids[0, layout.noisy_index[masked]] = mask_id
    from llm2diff.training.objective import self_conditioning_inputs

    rows, cols, vectors = self_conditioning_inputs(dlm.model, layout, ids, masked, kind, mask_id,
                                                   dlm.config.vocab_size)
    with torch.no_grad(), self_conditioned(dlm.model, rows, cols, vectors):
        train = layout_logits(dlm.model, layout, ids, layout.response_valid)
    noisy = ids[0, layout.noisy_index[0]]
    for use_cache in (True, False):
        ctx = BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long),
                           block_size=4, shift=shift, use_cache=use_cache, keep_hidden=kind == "hidden")
        for b in range(3):
            block = slice(4 * b, 4 * b + 4)
            canvas = noisy[None, block]
            with torch.no_grad():  # the first pass over the block: what it concludes conditions the second
                first = ctx.block_logits(canvas)
                c = (canvas[0] == mask_id).nonzero().squeeze(-1)
                if kind == "hidden":
                    carried = ctx.block_hidden[0, c].float()
                else:
                    carried = expected_embedding(first[0, c], embedding_weight(dlm.model), mask_id,
                                                 dlm.config.vocab_size)
                infer = ctx.block_logits(canvas, (torch.zeros_like(c), c, carried))[0]
            # the same conclusions the training pass computed for this block
            assert torch.allclose(carried, vectors[(cols >= layout.noisy_index[0, 4 * b]) &
                                                   (cols < layout.noisy_index[0, 4 * b] + 4)], atol=1e-5)
            diff = (infer - train[block]).abs().max().item()
            assert diff <= 1e-4, f"block {b} use_cache={use_cache}: max |diff| {diff}"
            ctx.commit(torch.tensor([RESPONSE[block]]))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_equals_recompute_with_conditioning_and_latent_steps(kind):
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4, self_conditioning=kind)
    _randomize_path(dlm, scale=2.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 6, 7, 8]])
    attention = (ids != 0).long()
    for latent in (0, 1):
        kwargs = dict(max_new_tokens=11, threshold=0.2, latent_steps=latent)
        runs = [dlm.generate(ids, attention, use_cache=cache, fuse_commit=fuse, **kwargs)
                for cache, fuse in ((True, True), (True, False), (False, True))]
        for other in runs[1:]:
            assert torch.equal(runs[0].sequences, other.sequences)
            assert runs[0].tokens_per_step == other.tokens_per_step
    plain = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    # the trained-looking path changes what is decoded (else the tests above could not fail)
    assert not torch.equal(plain.generate(ids, attention, max_new_tokens=11, threshold=0.2).sequences,
                           dlm.generate(ids, attention, max_new_tokens=11, threshold=0.2).sequences)


def test_latent_steps_need_a_self_conditioned_model():
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    with pytest.raises(ValueError, match="latent_steps refine the self-conditioning.*has none"):
        dlm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, latent_steps=1)
    with pytest.raises(ValueError, match="latent_steps must be >= 0"):
        dlm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, latent_steps=-1)


@pytest.mark.parametrize("lora", [True, False])
def test_save_and_load_keep_the_path(tmp_path, lora):
    from conftest import adapted_with_saved_base

    if lora:
        dlm = adapted_with_saved_base(tmp_path, self_conditioning="hidden")
    else:
        dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, self_conditioning="hidden")
    _randomize_path(dlm, seed=5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = dlm.generate(ids, max_new_tokens=8, threshold=0.2, latent_steps=1)
    dlm.save_pretrained(tmp_path / "saved")
    loaded = load(tmp_path / "saved")
    assert loaded.config.self_conditioning == "hidden"
    saved, restored = (self_conditioning_module(m.model) for m in (dlm, loaded))
    unwrap = (lambda m: m.modules_to_save["default"]) if lora else (lambda m: m)
    assert torch.equal(unwrap(saved).proj.weight, unwrap(restored).proj.weight)
    assert unwrap(restored).proj.weight.abs().sum() > 0
    after = loaded.generate(ids, max_new_tokens=8, threshold=0.2, latent_steps=1)
    assert torch.equal(before.sequences, after.sequences)


def test_bad_kinds_are_refused():
    from llm2diff.modeling.self_conditioning import check_self_conditioning

    with pytest.raises(ValueError, match="unknown self_conditioning 'expected_embeding'.*Did you mean "
                                         "'expected_embedding'"):
        check_self_conditioning("expected_embeding")
    with pytest.raises(ValueError, match="self_conditioning needs block_size > 1"):
        check_self_conditioning("hidden", block_size=1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_trains_the_path_and_rate_zero_is_the_plain_objective(kind):
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, lora=_lora(), self_conditioning=kind)
    layout = build_layout([PROMPT, PROMPT[:4]], [RESPONSE, RESPONSE[:8]], 4, pad_id=0)
    mask_id = dlm.config.mask_token_id

    def loss(**kwargs):
        return diffusion_loss(dlm.model, layout, mask_id, generator=torch.Generator().manual_seed(3), **kwargs)[0]

    plain = loss()
    assert torch.equal(loss(self_conditioning=kind, self_conditioning_rate=0.0), plain)
    dlm.model.zero_grad()
    conditioned = loss(self_conditioning=kind, self_conditioning_rate=1.0)
    conditioned.backward()
    # a fresh path adds zero, so the loss is the same (the noise is drawn before the coin) ...
    assert torch.allclose(conditioned, plain, atol=1e-6)
    weight = self_conditioning_module(dlm.model).modules_to_save["default"].proj.weight
    # ... and the gradient reaches the path, which starts to learn
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# -- block-size curriculum ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("small", [1, 2, 4])
def test_reblock_equals_the_layout_built_at_that_block_size(shift, packed, small):
    if small == 1 and shift:
        small = 2  # the shifted layout at block size 1 drops its noisy copy: not a re-blocking
    prompts = [PROMPT, PROMPT[:3], PROMPT[:5]]
    responses = [RESPONSE[:8] + [2] * 0, RESPONSE[:8], RESPONSE]  # whole blocks of 8 and of 4
    responses = [r + [2] * (-len(r) % 8) for r in responses]
    rows = [0, 0, 1] if packed else None
    big = build_layout(prompts, responses, 8, pad_id=0, shift=shift, rows=rows)
    want = build_layout(prompts, responses, small, pad_id=0, shift=shift, rows=rows)
    got = reblock(big, small)
    for name, value in vars(want).items():
        other = getattr(got, name)
        if name == "block":  # ids differ in numbering only: the same blocks, in the same order, within each row
            valid = value >= 0
            assert torch.equal(valid, other >= 0)
            for r in range(value.shape[0]):
                assert torch.equal(torch.unique(value[r][valid[r]], return_inverse=True)[1],
                                   torch.unique(other[r][valid[r]], return_inverse=True)[1])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def test_reblock_refuses_a_size_that_does_not_divide():
    layout = build_layout([PROMPT], [RESPONSE], 4, pad_id=0)
    with pytest.raises(ValueError, match="block size must divide the layout's own"):
        reblock(layout, 3)


def test_block_size_schedule():
    phases = parse_block_size_schedule("2:0.25,4:0.5", 8)
    assert phases == [(0.25, 2), (0.5, 4)]
    assert [scheduled_block_size(phases, 8, step, 100) for step in (0, 24, 25, 49, 50, 99)] == [2, 2, 4, 4, 8, 8]
    assert parse_block_size_schedule(None, 8) == []
    for text, message in (("3:0.5", "must divide block_size 8"), ("2:0.5,4:0.4", "must rise within"),
                          ("2-0.5", "is not 'size:fraction'"), ("2:1.5", "must rise within")):
        with pytest.raises(ValueError, match=message):
            parse_block_size_schedule(text, 8)
