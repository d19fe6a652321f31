"""The training objective: layout, noise, loss weights; block size 1 is exactly causal-LM SFT."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.modeling.attention import CLEAN, NOISY, PROMPT
from llm2diff.noise.schedule import elbo_weight, masked_diffusion_loss, sample_noise_levels
from llm2diff.training.layout import build_layout, pad_response_to_blocks
from llm2diff.training.objective import diffusion_loss, noise_layout


def test_pad_response_to_blocks():
    assert pad_response_to_blocks([7, 8, 9], 4, eos_id=2) == [7, 8, 9, 2]
    assert pad_response_to_blocks([7, 8, 9, 2], 4, eos_id=2) == [7, 8, 9, 2]
    assert pad_response_to_blocks([7, 8, 9, 10], 4, eos_id=2) == [7, 8, 9, 10, 2, 2, 2, 2]
    assert pad_response_to_blocks([7], 1, eos_id=2) == [7, 2]


def test_layout_batch_with_different_lengths():
    layout = build_layout([[5, 6, 7], [5]], [[8, 9], [8, 9, 10, 11]], block_size=2, pad_id=0)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 8, 9, 0, 0], [5, 8, 9, 10, 11, 8, 9, 10, 11]]
    assert layout.segment[0].tolist()[:7] == [PROMPT] * 3 + [CLEAN] * 2 + [NOISY] * 2
    assert layout.target.tolist() == [[8, 9, -100, -100], [8, 9, 10, 11]]
    assert layout.source_index.tolist() == [[2, 5, 0, 0], [0, 5, 2, 7]]


def test_layout_rejects_unpadded_response():
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        build_layout([[5]], [[6, 7, 8]], block_size=4, pad_id=0)


def test_ar_twin_layout_has_no_noisy_copy():
    layout = build_layout([[5, 6]], [[7, 8, 2]], block_size=1, pad_id=0)
    assert not layout.noisy_copy
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 2]]
    assert layout.source_index.tolist() == [[1, 2, 3]]


def test_masked_loss_values():
    token_loss = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    masked = torch.tensor([[True, False, True, False]])
    t = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    # elbo: (1/0.5 * 1 + 1/0.25 * 3) / 4 response tokens
    assert masked_diffusion_loss(token_loss, masked, t, 4, "elbo").item() == pytest.approx((2 + 12) / 4)
    assert masked_diffusion_loss(token_loss, masked, t, 4, "mean").item() == pytest.approx(2.0)
    assert elbo_weight(torch.tensor(0.25)).item() == pytest.approx(4.0)


def test_noise_levels_stay_in_window():
    t = sample_noise_levels((1000,), 0.2, 0.3, torch.Generator().manual_seed(0))
    assert t.min() >= 0.2 and t.max() <= 0.3 and t.std() > 0.02


def test_noise_touches_only_the_noisy_copy_and_t_is_per_block():
    layout = build_layout([[5, 6, 7]] * 64, [[8, 9, 10, 11, 12, 13, 14, 15]] * 64, block_size=4, pad_id=0)
    ids, masked, t = noise_layout(layout, mask_token_id=99, t_min=0.001, t_max=1.0,
                                  generator=torch.Generator().manual_seed(0))
    changed = ids != layout.input_ids
    assert not changed[layout.segment != NOISY].any()
    assert torch.equal(changed.sum(1), masked.sum(1))
    assert torch.equal(t[:, 0:4], t[:, 0:1].expand(-1, 4)) and torch.equal(t[:, 4:8], t[:, 4:5].expand(-1, 4))
    assert not torch.equal(t[:, 0], t[:, 4])
    rate = masked.float().mean().item()
    assert 0.4 < rate < 0.6  # E[t] ~ 0.5
    all_masked = noise_layout(layout, 99, 1.0, 1.0)[1]
    assert all_masked.all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_size_one_loss_is_causal_lm_sft(arch):
    tok = make_tokenizer()
    model = make_model(arch)
    dlm = adapt(model, tok, block_size=1)
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 2], [13, 14, 15, 16, 2]]
    layout = build_layout(prompts, responses, block_size=1, pad_id=0)
    loss, stats = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id)
    # the same examples as plain causal-LM SFT: labels only on the response, mean over response tokens
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), -100)
    attention = torch.zeros(2, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        attention[i, : len(p) + len(r)] = 1
    reference = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert stats.num_masked == stats.num_response_tokens == 8


def test_loss_backpropagates_into_lora_and_mask_row():
    from peft import LoraConfig

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=2, lora=LoraConfig(r=4, target_modules="all-linear"))
    layout = build_layout([[5, 6]], [[7, 8, 9, 2]], block_size=2, pad_id=0)
    loss, _ = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id, t_min=1.0, t_max=1.0)
    loss.backward()
    grads = {n: p.grad for n, p in dlm.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads)
    token_grads = [g for n, g in grads.items() if "trainable_tokens_delta" in n]
    assert token_grads and token_grads[0].abs().sum() > 0  # the mask row learns
    base = [n for n, p in dlm.model.named_parameters() if not p.requires_grad and "embed_tokens" in n]
    assert base  # the rest of the embedding stays frozen
