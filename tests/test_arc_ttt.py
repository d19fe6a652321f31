"""Test-time training for ARC (`llm2diff.arc.ttt`): rows from the demonstrations only, the model's own adapter bit
for bit unchanged after the block, training visible inside it, budgets, the AR twin, a fresh LoRA, bad settings."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer
from peft import LoraConfig

from llm2diff import adapt
from llm2diff.arc.ttt import (
    TTTSettings,
    test_time_trained,
    ttt_dataset,
    ttt_examples,
    ttt_rows,
)
from llm2diff.evaluation.runner import PromptRenderer
from llm2diff.tasks.arc_agi import ARCAGITask, all_transforms, augment_row, grid_to_text

TASK = ARCAGITask()
ROW = {"id": "swap", "test_index": 0,
       "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]},
                 {"input": [[5, 6]], "output": [[6, 5]]},
                 {"input": [[7], [8]], "output": [[8], [7]]}],
       "test_input": [[1, 1, 2, 3]], "test_output": [[3, 2, 1, 1]]}
PROBE = torch.tensor([[5, 6, 7, 8, 9, 4, 10, 11]])
FAST = {"steps": 4, "learning_rate": 1e-2, "num_colour_perms": 0}


def _adapted(block_size: int = 4, lora_dropout: float = 0.0, **adapt_kwargs):
    """A tiny model whose adapter is not the identity (random B), so that an inexact copy would show."""
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=lora_dropout)
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=block_size, lora=config, **adapt_kwargs)
    dlm.model.eval().requires_grad_(False)  # as `load` leaves it (PEFT makes new adapter modules trainable)
    return dlm


def _logits(dlm) -> torch.Tensor:
    with torch.no_grad():
        return dlm.model(PROBE).logits


def _state(dlm) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in dlm.model.state_dict().items()}


def _assert_same_state(dlm, before: dict[str, torch.Tensor]) -> None:
    after = dlm.model.state_dict()
    assert set(after) == set(before)
    different = [name for name, tensor in before.items()
                 if tensor.dtype != after[name].dtype or not torch.equal(tensor, after[name])]
    assert not different, different[:3]


def _attributes(dlm) -> tuple:
    """Every module's instance attributes (plain values by value, others by identity) and the model config's."""
    plain = (str, int, float, bool, list, tuple, type(None))
    modules = [(name, {k: v if isinstance(v, plain) else id(v) for k, v in vars(m).items()})
               for name, m in dlm.model.named_modules()]
    return modules, dlm.model.config.to_dict()


def _task_loss(dlm, dataset) -> float:
    """The diffusion loss on all of the task's rows under one fixed noise draw (comparable before and after)."""
    from llm2diff.training.collator import BlockDiffusionCollator
    from llm2diff.training.layout import Layout
    from llm2diff.training.objective import diffusion_loss

    tok, config = dlm.tokenizer, dlm.config
    batch = BlockDiffusionCollator(config.block_size, tok.eos_token_id, tok.pad_token_id, config.shift)(list(dataset))
    with torch.no_grad():
        loss, _ = diffusion_loss(dlm.model, Layout(**batch), config.mask_token_id, spec=config.noise_spec,
                                 generator=torch.Generator().manual_seed(0), vocab_size=config.vocab_size)
    return loss.item()


# --- rows ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("perms,leave_one_out", [(0, True), (1, True), (2, False)])
def test_rows_come_from_the_demonstrations_only(perms, leave_one_out):
    settings = TTTSettings(num_colour_perms=perms, leave_one_out=leave_one_out)
    rows = ttt_rows(TASK, ROW, settings)
    assert len(rows) == 3 * 8 * (1 + perms)  # demonstrations x symmetries x (own colours + permutations)
    other_test = {**ROW, "test_input": [[9, 9]], "test_output": None}  # the test plays no part in any row
    assert rows == ttt_rows(TASK, other_test, settings)
    context = 2 if leave_one_out else 0  # leave-one-out: the other two pairs as context, else none
    assert all(r["prompt"].count("Input:") == context + 1 for r in rows)
    # example 0 (pair 0 as the test) under its first transform, the identity
    assert rows[0]["completion"] == grid_to_text(ROW["train"][0]["output"])
    first = augment_row(ttt_examples(ROW, leave_one_out)[1], all_transforms(perms, 1)[5])
    assert rows[8 * (1 + perms) + 5] == {"prompt": TASK.question(first), "completion": TASK.target(first)}


def test_a_task_with_one_demonstration_trains_on_it_without_context():
    row = {**ROW, "train": ROW["train"][:1]}
    rows = ttt_rows(TASK, row, TTTSettings(num_colour_perms=1))
    assert len(rows) == 16 and all(r["prompt"].count("Input:") == 1 for r in rows)
    assert rows[0]["prompt"] == TASK.question({**row, "train": [], "test_input": row["train"][0]["input"]})
    with pytest.raises(ValueError, match="no demonstration pairs"):
        ttt_rows(TASK, {**ROW, "train": []}, TTTSettings())


@pytest.mark.parametrize("chat", [True, False])
def test_dataset_renders_prompts_as_evaluation_and_responses_as_training(chat, caplog):
    dlm = _adapted()
    dlm.config.use_chat_template = chat
    settings = TTTSettings(num_colour_perms=0)
    dataset, dropped = ttt_dataset(dlm, TASK, ROW, settings)
    assert dropped == 0 and len(dataset) == 24 and "render differently" not in caplog.text
    render, eos = PromptRenderer(dlm), dlm.tokenizer.eos_token_id
    example = augment_row(ttt_examples(ROW)[2], all_transforms(0, 2)[3])
    row = dataset[2 * 8 + 3]
    assert row["prompt_ids"] == render(TASK, example, [])
    assert row["response_ids"] == dlm.tokenizer(TASK.target(example), add_special_tokens=False).input_ids + [eos]
    assert (dlm.tokenizer.convert_ids_to_tokens(row["prompt_ids"][:1]) == ["<|im_start|>"]) == chat
    alone = TTTSettings(num_colour_perms=0, leave_one_out=False)  # pairs of different sizes, no context
    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in ttt_dataset(dlm, TASK, ROW, alone)[0]]
    short, dropped = ttt_dataset(dlm, TASK, ROW, TTTSettings(num_colour_perms=0, leave_one_out=False,
                                                             max_length=max(lengths) - 1))
    assert 0 < dropped == sum(n == max(lengths) for n in lengths) and len(short) + dropped == 24
    with pytest.raises(ValueError, match="longer than 3 tokens"):
        ttt_dataset(dlm, TASK, ROW, TTTSettings(max_length=3))


# --- the block -----------------------------------------------------------------------------------------------------

def test_continue_trains_a_copy_and_leaves_the_adapter_bit_for_bit():
    dlm = _adapted(lora_dropout=0.1)
    dataset, _ = ttt_dataset(dlm, TASK, ROW, TTTSettings(**FAST))
    state, logits, loss = _state(dlm), _logits(dlm), _task_loss(dlm, dataset)
    flags = {n: p.requires_grad for n, p in dlm.model.named_parameters()}
    attributes = _attributes(dlm)
    rng = torch.get_rng_state()
    with test_time_trained(dlm, TASK, ROW, TTTSettings(steps=8, learning_rate=1e-2, num_colour_perms=0)) as record:
        assert dlm.model.active_adapter == "ttt"
        assert not any(m.training for m in dlm.model.modules())  # decoding in eval mode (the new dropouts too)
        assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == 1
        inside = _logits(dlm)
        assert not torch.equal(inside, logits)
        assert _task_loss(dlm, dataset) < loss  # it learned the task's rows
        dlm.generate(PROBE, max_new_tokens=4)  # merges the trained mask row in and out of the embedding
    assert record["steps"] == 8 and record["rows"] == 24 and not record["stopped_early"]
    assert len(record["losses"]) == 8 and record["seconds"] > 0
    assert record["first_loss"] == pytest.approx(sum(record["losses"][:2]) / 2, abs=1e-4)  # the first quarter
    assert record["final_loss"] == pytest.approx(sum(record["losses"][-2:]) / 2, abs=1e-4)  # the last quarter
    assert dlm.model.active_adapter == "default" and list(dlm.model.peft_config) == ["default"]
    _assert_same_state(dlm, state)
    assert torch.equal(_logits(dlm), logits)
    assert flags == {n: p.requires_grad for n, p in dlm.model.named_parameters()}
    assert not any(m.training for m in dlm.model.modules()) and not dlm.model.is_activation_checkpointing
    assert _attributes(dlm) == attributes  # e.g. TRL's fused-LM-head forward, use_cache turned off


def test_merged_lora_is_the_task_adapter_inside_and_the_model_own_after():
    dlm = _adapted()
    with dlm.lora_merged():
        merged_before = _logits(dlm)
    cache = dict(dlm._merged_lora_cache)  # the model's own merged weights, built once
    tokens_before = dlm.generate(PROBE, max_new_tokens=8, merge_lora=True).sequences
    for lr in (1e-2, 3e-2):  # two tasks' adapters, allocated and trained alike, with different weights
        with test_time_trained(dlm, TASK, ROW, TTTSettings(**{**FAST, "learning_rate": lr})):
            plain = _logits(dlm)
            with dlm.lora_merged():
                merged = _logits(dlm)
            torch.testing.assert_close(merged, plain, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(merged, merged_before, atol=1e-3)
            tokens = dlm.generate(PROBE, max_new_tokens=8, merge_lora=True).sequences
            assert torch.equal(tokens, dlm.generate(PROBE, max_new_tokens=8).sequences)
    # the task adapters' merged weights went with their blocks: a later adapter at the same addresses, whose
    # version counters fused AdamW leaves alone, must not find them
    assert dlm._merged_lora_cache == cache
    with dlm.lora_merged():
        assert torch.equal(_logits(dlm), merged_before)
    assert torch.equal(dlm.generate(PROBE, max_new_tokens=8, merge_lora=True).sequences, tokens_before)


def test_the_ar_twin_trains_the_same_way():
    dlm = _adapted(block_size=1)
    state, logits = _state(dlm), _logits(dlm)
    with test_time_trained(dlm, TASK, ROW, TTTSettings(**FAST)) as record:
        assert not torch.equal(_logits(dlm), logits)
    assert record["steps"] == 4
    _assert_same_state(dlm, state)
    assert torch.equal(_logits(dlm), logits)


def test_a_saved_module_is_copied_too():
    """Self-conditioning's projection is saved with the adapter (PEFT modules_to_save): the copy carries it."""
    dlm = _adapted(self_conditioning="expected_embedding")
    with torch.no_grad():  # the zero-initialised path made non-trivial, so that a fresh copy would differ
        for name, param in dlm.model.named_parameters():
            if "modules_to_save.default" in name:
                param.add_(0.5)
    state, logits = _state(dlm), _logits(dlm)
    with test_time_trained(dlm, TASK, ROW, TTTSettings(**{**FAST, "steps": 2})) as record:
        copied = [n for n in dlm.model.state_dict() if "modules_to_save.ttt" in n]
        assert copied and record["steps"] == 2
    _assert_same_state(dlm, state)
    assert torch.equal(_logits(dlm), logits)


def test_fresh_adds_a_lora_to_a_model_without_adapter_and_removes_it():
    from peft.tuners.tuners_utils import BaseTunerLayer

    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)  # full weights, no adapter
    state, logits = _state(dlm), _logits(dlm)
    modules = [(name, type(m)) for name, m in dlm.model.named_modules()]
    flags, attributes = {n: p.requires_grad for n, p in dlm.model.named_parameters()}, _attributes(dlm)
    with test_time_trained(dlm, TASK, ROW, TTTSettings(**FAST, mode="fresh", lora_r=2)) as record:
        assert not dlm.has_adapter and not dlm.weights_are_parent  # no free AR parent inside either
        assert not torch.equal(_logits(dlm), logits)
    assert record["steps"] == 4 and record["mode"] == "fresh" and dlm.weights_are_parent
    assert modules == [(name, type(m)) for name, m in dlm.model.named_modules()]
    assert not any(isinstance(m, BaseTunerLayer) for m in dlm.model.modules())
    assert flags == {n: p.requires_grad for n, p in dlm.model.named_parameters()}
    assert _attributes(dlm) == attributes
    _assert_same_state(dlm, state)
    assert torch.equal(_logits(dlm), logits)


def test_max_seconds_stops_early_and_zero_steps_trains_nothing():
    dlm = _adapted()
    state = _state(dlm)
    with test_time_trained(dlm, TASK, ROW, TTTSettings(steps=1000, max_seconds=0.01, num_colour_perms=0)) as record:
        pass
    assert record["stopped_early"] and 1 <= record["steps"] < 1000
    with test_time_trained(dlm, TASK, ROW, TTTSettings(steps=0)) as record:
        assert dlm.model.active_adapter == "default"
    assert record["steps"] == 0 and record["rows"] == 0
    _assert_same_state(dlm, state)


def test_an_error_inside_the_block_still_restores_the_model():
    dlm = _adapted()
    state = _state(dlm)
    with pytest.raises(KeyError), test_time_trained(dlm, TASK, ROW, TTTSettings(steps=1, num_colour_perms=0)):
        raise KeyError("decoding failed")
    assert list(dlm.model.peft_config) == ["default"]
    _assert_same_state(dlm, state)


# --- bad settings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"mode": "fersh"}, "Did you mean 'fresh'"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"max_seconds": 0}, "max_seconds must be > 0"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"num_colour_perms": -1}, "num_colour_perms must be >= 0"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TTTSettings(**settings)


def test_a_mode_the_model_cannot_take_is_refused_before_anything_changes():
    plain = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    with pytest.raises(ValueError, match="mode='fresh'"), test_time_trained(plain, TASK, ROW, TTTSettings()):
        pass
    adapted = _adapted()
    with pytest.raises(ValueError, match="mode='continue'"), \
            test_time_trained(adapted, TASK, ROW, TTTSettings(mode="fresh")):
        pass
    with test_time_trained(adapted, TASK, ROW, TTTSettings(steps=1, num_colour_perms=0)), \
            pytest.raises(ValueError, match="cannot be nested"), test_time_trained(adapted, TASK, ROW, TTTSettings()):
        pass
    assert list(adapted.model.peft_config) == ["default"]
