"""Editing noise (`llm2diff.noise.editing`, `apply_edits` in `llm2diff.training.objective`): which tokens it may corrupt, that a corrupted token is never the true
one, that the parent source reads the AR parent's own next-token distribution, and that the loss with editing off
is today's objective exactly while the edit terms add what they say."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.noise import editing
from llm2diff.noise.editing import draw_edits, edit_candidates, lora_off, wrong_tokens
from llm2diff.noise.masking import Noise, NoiseSpec
from llm2diff.training.layout import build_layout
from llm2diff.training.objective import apply_edits, apply_noise, diffusion_loss

MASK = 3


def _dlm(block_size=4):
    from peft import LoraConfig

    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=block_size, lora=LoraConfig(r=4,
                                                                                             target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA that changes the model, so the parent and the model differ
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return dlm


def _layout(batch=2):
    prompts = [[5, 6, 7], [5, 9]][:batch]
    responses = [[10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 2, 2]][:batch]
    return build_layout(prompts, responses, block_size=4, pad_id=0)


def test_candidates_are_the_visible_tokens_past_each_blocks_first():
    valid = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    masked = torch.tensor([[False, True, False, False, True, False, True, False]] + [[False] * 8])
    noise = Noise(masked, valid.float(), valid.float(), valid.float(), valid, torch.zeros(2, dtype=torch.long))
    block = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
    got = edit_candidates(noise, block, 4)
    assert got.tolist() == [[False, False, True, True, False, True, False, True],
                            [False, True, True, True, False, True, False, False]]
    assert draw_edits(got, 0.0).sum() == 0
    assert torch.equal(draw_edits(got, 0.999999, torch.Generator().manual_seed(0)), got)
    many = draw_edits(torch.ones(100, 100, dtype=torch.bool), 0.2, torch.Generator().manual_seed(0))
    assert 0.18 < many.float().mean() < 0.22


def test_wrong_tokens_are_never_the_true_one_nor_excluded():
    true = torch.tensor([4, 4, 7, 0] * 50)
    got = wrong_tokens(true, 10, [MASK], generator=torch.Generator().manual_seed(0))
    assert not (got == true).any() and not (got == MASK).any()
    assert set(got.tolist()) == set(range(10)) - {MASK}  # uniform: every other token turns up
    logits = torch.full((3, 10), -5.0)
    logits[:, 4] = 10.0  # the true token is the model's favourite; 6 comes next
    logits[:, 6] = 8.0
    assert wrong_tokens(torch.tensor([4, 4, 4]), 10, [MASK], logits).tolist() == [6, 6, 6]


def test_apply_edits_changes_only_chosen_visible_tokens_of_the_noisy_copy():
    dlm = _dlm()
    layout = _layout()
    spec = NoiseSpec(edit_fraction=0.5)
    gen = torch.Generator().manual_seed(1)
    _, ids, noise = apply_noise(layout, MASK, spec, gen)
    new, edited = apply_edits(dlm.model, layout, ids, noise, spec, MASK, gen)
    assert edited.any() and not (edited & noise.masked).any() and not (edited & ~noise.valid).any()
    assert not edited[:, ::4].any()  # never a block's first token
    changed = new != ids
    rows, cols = edited.nonzero(as_tuple=True)
    expected = torch.zeros_like(changed)
    expected[rows, layout.noisy_index[rows, cols]] = True
    assert torch.equal(changed, expected)  # exactly the edited tokens of the noisy copy: prompt and clean untouched
    assert not (new[rows, layout.noisy_index[rows, cols]] == layout.target[edited]).any()


def _edits_reading(monkeypatch, source: str, seed: int):
    """Apply editing noise (fraction 0.9) from `source` to one example, recording the logits the wrong tokens were
    drawn from. Returns (dlm, layout, noised ids, noise, edited, those logits)."""
    dlm = _dlm()
    layout = _layout(batch=1)
    spec = NoiseSpec(edit_fraction=0.9, edit_source=source)
    gen = torch.Generator().manual_seed(seed)
    _, ids, noise = apply_noise(layout, MASK, spec, gen)
    seen = {}

    def recording(true, vocab, excluded, logits=None, generator=None):
        seen["logits"] = logits
        return wrong_tokens(true, vocab, excluded, logits, generator)

    monkeypatch.setattr(editing, "wrong_tokens", recording)
    _, edited = apply_edits(dlm.model, layout, ids, noise, spec, MASK, gen)
    return dlm, layout, ids, noise, edited, seen["logits"]


def test_the_parent_source_samples_from_the_ar_parents_next_token_distribution(monkeypatch):
    dlm, layout, _, _, edited, seen = _edits_reading(monkeypatch, "parent", 2)
    sequence = torch.tensor([[5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17]])
    with dlm.ar_parent() as parent, torch.no_grad():
        reference = parent(input_ids=sequence).logits[0]  # the stock causal LM, adapter off
    cols = edited[0].nonzero().squeeze(1)
    assert torch.allclose(seen, reference[3 + cols - 1], atol=1e-4)  # token j read at position j - 1
    with torch.no_grad():
        adapted = dlm.model(input_ids=sequence).logits[0]
    assert not torch.allclose(adapted[3 + cols - 1], reference[3 + cols - 1], atol=1e-2)  # the LoRA matters
    assert all(not layer.disable_adapters for layer in _lora_layers(dlm.model))  # back on after
    assert all(p.requires_grad for n, p in dlm.model.named_parameters() if "lora_" in n)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_the_parent_source_needs_a_lora_adapter():
    with pytest.raises(ValueError, match="has no LoRA adapter: train with use_lora: true"):
        with lora_off(make_model("qwen2")):
            pass


def test_editing_off_is_todays_objective_and_the_edit_terms_add_what_they_say():
    dlm = _dlm()
    layout = _layout()
    base = NoiseSpec()

    def loss(spec, seed=3):
        return diffusion_loss(dlm.model, layout, MASK, spec=spec, generator=torch.Generator().manual_seed(seed))

    plain, stats = loss(base)
    off, off_stats = loss(dataclasses.replace(base, edit_fraction=0.0, edit_keep_weight=1.0))
    assert off.item() == plain.item() and off_stats.edit_sums is None
    # with editing: the absorbing part (edit weights 0) plus each term's cross-entropy sum per response token
    spec = dataclasses.replace(base, edit_fraction=0.5, edit_source="uniform")
    absorbing, _ = loss(dataclasses.replace(spec, edit_loss_weight=0.0))
    full, stats = loss(dataclasses.replace(spec, edit_loss_weight=2.0, edit_keep_weight=0.5))
    edit_sum, n_edit, keep_sum, n_keep = stats.edit_sums.tolist()
    assert n_edit > 0 and n_keep > 0
    tokens = int(layout.response_valid.sum())
    assert full.item() == pytest.approx(absorbing.item() + (2.0 * edit_sum + 0.5 * keep_sum) / tokens, rel=1e-5)
    assert stats.num_masked == off_stats.num_masked  # the same masks: editing draws after them


@pytest.mark.parametrize("changes, message", [
    ({"edit_fraction": 1.0}, r"edit_fraction must be in \[0, 1\)"),
    ({"edit_fraction": -0.1}, r"edit_fraction must be in \[0, 1\)"),
    ({"edit_source": "parnt"}, "unknown edit_source 'parnt'; available: uniform, parent, self. Did you mean 'parent'"),
    ({"edit_keep_weight": -1.0}, "edit_loss_weight and edit_keep_weight must be >= 0"),
])
def test_bad_editing_settings_say_what_is_wrong(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(NoiseSpec(), **changes).validate(block_size=4)


def test_editing_needs_blocks_of_more_than_one_token(tmp_path):
    from llm2diff.training.config import DiffusionSFTConfig

    with pytest.raises(ValueError, match="edit_fraction needs block_size > 1"):
        DiffusionSFTConfig(output_dir=str(tmp_path), block_size=1, edit_fraction=0.1, use_cpu=True, report_to="none")
    config = DiffusionSFTConfig(output_dir=str(tmp_path), block_size=4, edit_fraction=0.1, edit_source="self",
                                use_cpu=True, report_to="none")
    assert (config.noise_spec().edit_fraction, config.noise_spec().edit_source) == (0.1, "self")


def test_the_self_source_reads_the_model_with_the_corrupted_positions_masked(monkeypatch):
    dlm, layout, ids, noise, edited, seen = _edits_reading(monkeypatch, "self", 5)
    from llm2diff.training.objective import layout_logits

    both = ids.clone()
    rows, cols = (edited | noise.masked).nonzero(as_tuple=True)
    both[rows, layout.noisy_index[rows, cols]] = MASK
    with torch.no_grad():
        reference = layout_logits(dlm.model, layout, both, edited)  # the model's own reading, those masked too
    assert torch.allclose(seen, reference, atol=1e-5)
