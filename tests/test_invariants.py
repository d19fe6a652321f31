"""The invariants that catch silent errors: mask visibility, training forward = cached inference, block size 1 =
the AR parent, cache = recompute, save/load and LoRA merge reproduce logits. Tiny random Qwen2 / Qwen3 / Llama
models under sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, MODEL_VOCAB, make_model, make_tokenizer

from llm2diff import adapt, load
from llm2diff.modeling.attention import block_diffusion_mask, to_additive_mask
from llm2diff.sampling.block_cache import BlockContext
from llm2diff.training.layout import build_layout
from llm2diff.training.objective import layout_logits

CASES = [(arch, attn) for arch in ARCHITECTURES for attn in ("sdpa", "eager")]
PROMPT = [5, 6, 7, 8, 9, 10, 11]
RESPONSE = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 2]  # 3 blocks of 4, ends with eos (id 2)


def _noisy_layout(block_size: int, masked_positions: list[int], mask_id: int, shift: bool = True):
    layout = build_layout([PROMPT], [RESPONSE], block_size, pad_id=0, shift=shift)
    ids = layout.input_ids.clone()
    for j in masked_positions:
        ids[0, layout.noisy_index[0, j]] = mask_id
    return layout, ids


@pytest.mark.parametrize("arch,attn", CASES)
def test_visibility_matches_the_rules(arch, attn):
    """Perturbing the input at j moves the output at i exactly when the mask lets i see j (directly or through
    earlier layers: with these rules visibility is transitive, so reachability equals the mask)."""
    model = make_model(arch, attn, layers=2)
    layout = build_layout([PROMPT[:3]], [RESPONSE[:8]], block_size=4, pad_id=0)
    allowed = block_diffusion_mask(layout.segment, layout.block)[0]
    mask = to_additive_mask(allowed[None], torch.float32)
    kwargs = dict(attention_mask=mask, position_ids=layout.position_ids)
    base = model(input_ids=layout.input_ids, **kwargs).logits[0]
    length = layout.input_ids.shape[1]
    for j in range(length):
        ids = layout.input_ids.clone()
        ids[0, j] = 40 if ids[0, j] != 40 else 41
        moved = (model(input_ids=ids, **kwargs).logits[0] - base).abs().amax(-1) > 1e-6
        assert torch.equal(moved, allowed[:, j]), f"position {j}: moved {moved.tolist()} allowed {allowed[:, j].tolist()}"


def test_mask_rules_by_hand():
    layout = build_layout([[5, 6]], [[7, 8, 9, 10]], block_size=2, pad_id=0)
    # layout: p0 p1 | c0 c1 c2 c3 | n0 n1 n2 n3   (blocks: c0 c1 = 0, c2 c3 = 1)
    allowed = block_diffusion_mask(layout.segment, layout.block)[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(allowed, expected)
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    # shift: first token of a block reads the clean position before it, the others the noisy token before them
    assert layout.source_index[0].tolist() == [1, 6, 3, 8]


@pytest.mark.parametrize("arch,attn", CASES)
@pytest.mark.parametrize("shift", [True, False])
def test_training_forward_equals_cached_inference(arch, attn, shift):
    tok = make_tokenizer()
    dlm = adapt(make_model(arch, attn), tok, block_size=4, shift=shift)
    mask_id = dlm.config.mask_token_id
    masked = [0, 2, 3, 5, 8, 9, 10, 11]
    layout, noisy_ids = _noisy_layout(4, masked, mask_id, shift)
    select = layout.response_valid.clone()
    train = layout_logits(dlm.model, layout, noisy_ids, select)  # (R, vocab), response order
    noisy_response = noisy_ids[0, layout.noisy_index[0]]
    for use_cache in (True, False):
        ctx = BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long),
                           block_size=4, shift=shift, use_cache=use_cache)
        for b in range(3):
            block = slice(4 * b, 4 * b + 4)
            infer = ctx.block_logits(noisy_response[None, block])[0]
            diff = (infer - train[block]).abs().max().item()
            assert diff <= 1e-4, f"block {b} use_cache={use_cache}: max |diff| {diff}"
            ctx.commit(torch.tensor([RESPONSE[block]]))


@pytest.mark.parametrize("arch,attn", CASES)
def test_block_size_one_is_the_ar_parent(arch, attn):
    tok = make_tokenizer()
    model = make_model(arch, attn)
    dlm = adapt(model, tok, block_size=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]])
    attention = (ids != 0).long()
    suppressed = [dlm.config.mask_token_id, *range(dlm.config.vocab_size, MODEL_VOCAB)]
    ref = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=16, do_sample=False,
                         suppress_tokens=suppressed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = dlm.generate(ids, attention, max_new_tokens=16)
    assert torch.equal(out.sequences, ref)
    assert out.nfe == ref.shape[1] - ids.shape[1]  # prefill + one pass per further token, as AR decoding


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_size_one_with_fresh_lora_is_the_ar_parent(arch):
    from peft import LoraConfig

    tok = make_tokenizer()
    model = make_model(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    suppressed_ref = None
    dlm = adapt(model, tok, block_size=1, lora=LoraConfig(r=4, target_modules="all-linear"))
    suppressed_ref = [dlm.config.mask_token_id, *range(dlm.config.vocab_size, MODEL_VOCAB)]
    out = dlm.generate(ids, max_new_tokens=12)
    with dlm.ar_parent() as parent:
        ref = parent.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              suppress_tokens=suppressed_ref, pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch,attn", CASES)
@pytest.mark.parametrize("block_size,tokens_per_step,threshold", [(4, 1, None), (4, 2, None), (3, 1, 0.05), (5, 2, None)])
def test_cache_equals_recompute(arch, attn, block_size, tokens_per_step, threshold):
    dlm = adapt(make_model(arch, attn), make_tokenizer(), block_size=block_size)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 6, 7, 8]])
    attention = (ids != 0).long()
    kwargs = dict(max_new_tokens=11, tokens_per_step=tokens_per_step, threshold=threshold)
    cached = dlm.generate(ids, attention, use_cache=True, **kwargs)
    recomputed = dlm.generate(ids, attention, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert cached.tokens_per_step == recomputed.tokens_per_step


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_and_merge_reproduce_logits(arch, tmp_path):
    from peft import LoraConfig

    tok = make_tokenizer()
    base_dir = tmp_path / "base"
    make_model(arch).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    dlm = adapt(model, tok, block_size=4, lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():  # make the adapter and the mask row non-trivial
        for name, param in dlm.model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    layout, noisy = _noisy_layout(4, [0, 1, 5, 6, 7, 9], dlm.config.mask_token_id)
    select = layout.response_valid
    before = layout_logits(dlm.model, layout, noisy, select)
    dlm.save_pretrained(tmp_path / "dlm")
    loaded = load(tmp_path / "dlm")
    assert loaded.config == dlm.config
    after = layout_logits(loaded.model, layout, noisy, select)
    assert (before - after).abs().max().item() <= 1e-5
    merged = loaded.model.merge_and_unload()
    assert (before - layout_logits(merged, layout, noisy, select)).abs().max().item() <= 1e-4
    # the adapter moved the logits, so the comparison above is not vacuous
    with dlm.ar_parent() as parent:
        assert (before - layout_logits(parent, layout, noisy, select)).abs().max().item() > 1e-3
