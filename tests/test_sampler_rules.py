"""Commit rules, sub-blocks, the step cap, correction, the fused commit pass, dropping finished rows, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.compat import cache_kwargs
from llm2diff.sampling.rules import (
    entropy_bounded_commits,
    entropy_scores,
    margin_scores,
    select_remasks,
    sub_block_window,
)
from llm2diff.sampling.block_cache import BlockContext
from llm2diff.sampling.sampler import BlockSampler, SamplerSettings

PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]])
MASK = (PROMPTS != 0).long()


def _dlm(arch="qwen3", block_size=4):
    model = adapt(make_model(arch), make_tokenizer(), block_size=block_size)
    model.model.generation_config.eos_token_id = None
    model.tokenizer.eos_token = "<|im_start|>"  # a token this random model never picks: nothing stops early
    return model


@pytest.fixture
def dlm():
    return _dlm()


# -- pure rules -------------------------------------------------------------------------------------------------
def test_margin_and_entropy_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]])
    assert torch.allclose(margin_scores(probs), torch.tensor([[0.5, 0.0]]))
    expected = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
                -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))]
    assert torch.allclose(entropy_scores(probs), torch.tensor([expected]))


def test_entropy_bounded_commits_takes_lowest_entropies_within_the_bound():
    entropy = torch.tensor([[0.5, 0.1, 2.0, 0.3, 0.2]])
    todo = torch.tensor([[True, True, True, True, False]])  # position 4 is not eligible
    # increasing entropy among eligible: 0.1 (1), 0.3 (3), 0.5 (0), 2.0 (2); running sums 0.1, 0.4, 0.9, 2.9
    assert entropy_bounded_commits(entropy, todo, bound=0.4).tolist() == [[False, True, False, True, False]]
    assert entropy_bounded_commits(entropy, todo, bound=1.0).tolist() == [[True, True, False, True, False]]
    # a bound below the smallest entropy still commits `minimum` positions
    assert entropy_bounded_commits(entropy, todo, bound=0.0, minimum=1).tolist() == [[False, True, False, False, False]]
    assert entropy_bounded_commits(entropy, todo, bound=0.0, minimum=2).tolist() == [[False, True, False, True, False]]


def test_sub_block_window_is_the_first_unfinished_sub_block():
    todo = torch.tensor([[True] * 8, [False, False, True, True, True, True, True, True], [False] * 6 + [True, False]])
    assert sub_block_window(todo, 2).tolist() == [
        [True, True] + [False] * 6, [False, False, True, True] + [False] * 4, [False] * 6 + [True, False]]
    assert sub_block_window(todo, 4).tolist() == [[True] * 4 + [False] * 4, [False, False, True, True] + [False] * 4,
                                                  [False] * 6 + [True, False]]
    assert torch.equal(sub_block_window(todo, None), todo)


def test_select_remasks_lowest_within_budget():
    prob = torch.tensor([[0.05, 0.5, 0.01, 0.2], [0.01, 0.02, 0.9, 0.9]])
    revisable = torch.tensor([[True, True, True, True], [False, True, True, True]])
    out = select_remasks(prob, revisable, threshold=0.3, budget=torch.tensor([1, 5]))
    assert out.tolist() == [[False, False, True, False], [False, True, False, False]]
    out = select_remasks(prob, revisable, threshold=0.3, budget=torch.tensor([2, 0]))
    assert out.tolist() == [[True, False, True, False], [False, False, False, False]]


# -- rules in the sampler ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["confidence", "threshold", "margin", "entropy", "random"])
def test_every_rule_fills_every_position_and_respects_max_new_tokens(dlm, rule):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=10, commit_rule=rule, seed=0)
    assert out.num_new_tokens.tolist() == [10, 10]
    assert sum(out.tokens_per_step) == 20
    assert not (out.sequences[:, 6:] == dlm.config.mask_token_id).any()


def test_random_rule_commits_k_per_step_in_seeded_order(dlm):
    a = dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="random", tokens_per_step=2, seed=3)
    b = dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="random", tokens_per_step=2, seed=3)
    assert a.tokens_per_step == [4] * 4
    assert torch.equal(a.sequences, b.sequences)


def test_margin_threshold_commits_by_margin(dlm):
    """Threshold 0 on the margin commits every position whose top two differ (all, for these logits)."""
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="margin", threshold=0.0)
    assert out.tokens_per_step == [8, 8]


def test_entropy_bound_zero_is_one_token_per_step_and_huge_is_one_step(dlm):
    slow = dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="entropy", entropy_bound=0.0)
    fast = dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="entropy", entropy_bound=1e9)
    assert slow.tokens_per_step == [2] * 8
    assert fast.tokens_per_step == [8, 8]
    # one token per step in increasing entropy order is the confidence rule's greedy order up to ties: same text
    # is not guaranteed, but the whole-block step is exactly one argmax per position, as threshold 0 does
    assert torch.equal(fast.sequences, dlm.generate(PROMPTS, MASK, max_new_tokens=8, threshold=0.0).sequences)


def test_sub_blocks_decode_left_to_right(dlm):
    out = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=8, sub_block_size=2, threshold=0.0,
                       record_trajectory=True)
    # threshold 0 commits a whole sub-block per step: 2 sub-blocks per block
    assert out.tokens_per_step == [2, 2, 2, 2]
    committed = [step_committed_positions(step) for step in out.trajectory.steps]
    assert committed == [[0, 1], [2, 3], [0, 1], [2, 3]]


def step_committed_positions(step) -> list[int]:
    return [i for i, flag in enumerate(step.committed[0]) if flag]


def test_step_cap_finishes_each_block_in_at_most_that_many_steps(dlm):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, max_steps_per_block=2)
    assert out.tokens_per_step == [2, 6, 2, 6]  # one token, then the rest, per block (2 rows)


def test_bad_sampler_options_are_rejected(dlm):
    with pytest.raises(ValueError, match="sub_block_size must divide the block size 4"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, sub_block_size=3)
    with pytest.raises(ValueError, match="unknown commit_rule 'confident'.*did you mean 'confidence'"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, commit_rule="confident")
    with pytest.raises(ValueError, match="remask_threshold must be in"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, remask_threshold=1.5)
    with pytest.raises(ValueError, match="max_steps_per_block must be >= 1"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, max_steps_per_block=0)


# -- correction --------------------------------------------------------------------------------------------------
def _settings(dlm, **kwargs):
    c = dlm.config
    return SamplerSettings(block_size=c.block_size, mask_token_id=c.mask_token_id, eos_token_ids=(),
                           pad_token_id=dlm.tokenizer.pad_token_id, vocab_size=c.vocab_size, shift=c.shift,
                           max_new_tokens=8, **kwargs)


def _denoise_with_draft(dlm, draft, **settings):
    """Denoise one block after the first prompt with `draft` pre-committed; returns (canvas, sampler)."""
    sampler = BlockSampler(dlm.model, _settings(dlm, **settings))
    with torch.no_grad():
        ctx = BlockContext(dlm.model, PROMPTS[:1], MASK[:1], 4)
        return sampler.denoise_block(ctx, 4, draft=draft), sampler


def test_correction_retracts_a_planted_wrong_token(dlm):
    prompt, mask = PROMPTS[:1], MASK[:1]
    with torch.no_grad():
        ctx = BlockContext(dlm.model, prompt, mask, 4)
        logits = ctx.block_logits(torch.full((1, 4), dlm.config.mask_token_id))
    probs = logits[0, 2, : dlm.config.vocab_size].softmax(-1)
    probs[dlm.config.mask_token_id] = 1.0
    wrong = int(probs.argmin())  # the token the model believes least at position 2
    draft = torch.full((1, 4), dlm.config.mask_token_id)
    draft[0, 2] = wrong

    def run(**kwargs):
        return _denoise_with_draft(dlm, draft, **kwargs)

    kept, _ = run()
    assert int(kept[0, 2]) == wrong  # without correction the planted token stays
    fixed, sampler = run(remask_threshold=float(probs[wrong]) * 1.5 + 1e-6, remask_budget=1)
    assert sampler.remasked == 1
    assert int(fixed[0, 2]) != wrong
    assert fixed[0, 2] != dlm.config.mask_token_id


def test_select_disputes_takes_the_most_confident_within_budget():
    best = torch.tensor([[0.95, 0.99, 0.5, 0.97], [0.99, 0.2, 0.2, 0.2]])
    disputed = torch.tensor([[True, True, True, False], [True, True, True, True]])
    from llm2diff.sampling.rules import select_disputes

    got = select_disputes(best, disputed, 0.9, torch.tensor([1, 3]))
    assert got.tolist() == [[False, True, False, False], [True, False, False, False]]  # 0.97 is not disputed
    assert select_disputes(best, disputed, 0.9, torch.tensor([0, 0])).sum() == 0


def test_a_causal_judge_takes_the_first_confident_dispute_only():
    """After a wrong token a causal judge reads the rest under the error: the leftmost confident dispute, one per
    row, whatever the confidences after it (and none for a row without budget)."""
    from llm2diff.sampling.rules import select_first_dispute

    best = torch.tensor([[0.95, 0.99, 0.5, 0.97], [0.5, 0.2, 0.99, 1.0], [0.99, 0.99, 0.99, 0.99]])
    disputed = torch.tensor([[True, True, True, False], [True, True, True, True], [False, True, True, True]])
    got = select_first_dispute(best, disputed, 0.9, torch.tensor([2, 3, 0]))
    assert got.tolist() == [[True, False, False, False], [False, False, True, False], [False] * 4]
    assert select_first_dispute(best, disputed, 0.999, torch.tensor([1, 1, 1])).tolist() == [
        [False] * 4, [False, False, False, True], [False] * 4]


@pytest.mark.parametrize("action", ["replace", "remask"])
def test_learned_correction_acts_where_the_model_predicts_another_token(dlm, action):
    """A wrong token planted at position 2: the model's top prediction there is another token; with an edit
    threshold below that prediction's probability the sampler replaces it (or remasks and re-denoises it); with one
    the model never reaches, it keeps it. The block's first token is never disputed (token shift)."""
    prompt, mask = PROMPTS[:1], MASK[:1]
    draft = torch.full((1, 4), dlm.config.mask_token_id)

    def run(**kwargs):
        return _denoise_with_draft(dlm, draft, **kwargs)

    plain, _ = run()
    draft[0, 2] = (int(plain[0, 2]) + 1) % dlm.config.mask_token_id  # not what the model would put there
    kept, _ = run()
    assert int(kept[0, 2]) == int(draft[0, 2])
    with torch.no_grad():  # the model's reading of the block as the first step sees it
        ctx = BlockContext(dlm.model, prompt, mask, 4)
        logits = ctx.block_logits(draft)
    from llm2diff.sampling.rules import suppress_ids

    probs = suppress_ids(logits, dlm.config.mask_token_id, dlm.config.vocab_size).softmax(-1)[0, 2]
    top = int(probs.argmax())
    assert top != int(draft[0, 2])
    fixed, sampler = run(edit_threshold=float(probs[top]) * 0.99, edit_action=action, remask_budget=1)
    assert int(fixed[0, 2]) != int(draft[0, 2]) and fixed[0, 2] != dlm.config.mask_token_id
    if action == "replace":
        assert sampler.edited == 1 and sampler.remasked == 0 and int(fixed[0, 2]) == top
    else:
        assert sampler.edited == 0 and sampler.remasked == 1
    unsure, sampler = run(edit_threshold=0.999, edit_action=action, remask_budget=1)  # never that sure
    assert sampler.edited == sampler.remasked == 0 and int(unsure[0, 2]) == int(draft[0, 2])


def test_learned_correction_is_bounded_clean_and_counted_in_trajectories(dlm):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=12, edit_threshold=0.01, remask_budget=2,
                       record_trajectory=True)
    assert 0 < out.stats["edited"] <= 2 * 2 * 3  # at most the budget per block and row
    assert not (out.sequences[:, 6:] == dlm.config.mask_token_id).any()
    assert out.num_new_tokens.tolist() == [12, 12]
    history = out.trajectory.history(row=0) + out.trajectory.history(row=1)
    assert sum(entry["remasks"] for entry in history) == out.stats["edited"]  # each edit drawn as a retraction
    assert all(entry["position"] % 4 != 0 or entry["remasks"] == 0 for entry in history)  # never a first token
    off = dlm.generate(PROMPTS, MASK, max_new_tokens=12)
    assert off.stats["edited"] == 0


def test_a_draft_after_a_prefix_is_kept_without_correction_and_checked(dlm):
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    decoding = DecodingConfig(max_new_tokens=8)
    reference = run_block_sampler(dlm, PROMPTS, MASK, decoding)
    prefix = reference.sequences[:, 6:10]  # the first block, as decided
    draft = torch.full((2, 4), dlm.config.mask_token_id)
    draft[:, 2] = (reference.sequences[:, 12] + 1) % dlm.config.mask_token_id  # a planted token
    out = run_block_sampler(dlm, PROMPTS, MASK, decoding.replace(max_new_tokens=4), prefix, draft)
    assert torch.equal(out.sequences[:, 6:10], prefix) and torch.equal(out.sequences[:, 12], draft[:, 2])
    with pytest.raises(ValueError, match="draft must be a .batch, block_size. = .2, 4. tensor after a response prefix "
                                         "of whole blocks"):
        run_block_sampler(dlm, PROMPTS, MASK, decoding, prefix[:, :3], draft)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reopening_finished_blocks_is_the_same_with_a_cache_and_without(arch):
    """A threshold a random model reaches reopens finished blocks; the tokens are those of recomputing the whole
    sequence every step (the cache after a reopened block equals a recompute), fused or not, and bounded."""
    dlm = _dlm(arch, 4)
    settings = {"max_new_tokens": 12, "reopen_threshold": 0.02, "reopen_budget": 1, "threshold": 0.5}
    out = dlm.generate(PROMPTS, MASK, **settings)
    assert 0 < out.stats["reopened"] <= 1 * 2 * 2  # budget x rows x blocks that have a next block
    assert not (out.sequences[:, 6:] == dlm.config.mask_token_id).any()
    for variant in ({"use_cache": False}, {"fuse_commit": False}, {"drop_finished": False}):
        again = dlm.generate(PROMPTS, MASK, **settings, **variant)
        assert torch.equal(again.sequences, out.sequences), variant
        assert again.stats["reopened"] == out.stats["reopened"]
    plain = dlm.generate(PROMPTS, MASK, max_new_tokens=12, threshold=0.5)
    assert out.nfe > plain.nfe and plain.stats["reopened"] == 0  # each reopening costs one pass


def test_reopening_a_causal_clean_model_is_the_same_with_a_cache_and_without():
    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4, clean_attention="causal")
    dlm.model.generation_config.eos_token_id = None
    dlm.tokenizer.eos_token = "<|im_start|>"
    settings = {"max_new_tokens": 12, "reopen_threshold": 0.02, "reopen_budget": 1, "threshold": 0.5}
    out = dlm.generate(PROMPTS, MASK, **settings)
    assert 0 < out.stats["reopened"] <= 1 * 2 * 2
    assert not (out.sequences[:, 6:] == dlm.config.mask_token_id).any()
    for variant in ({"use_cache": False}, {"fuse_commit": False}, {"drop_finished": False}):
        again = dlm.generate(PROMPTS, MASK, **settings, **variant)
        assert torch.equal(again.sequences, out.sequences), variant
        assert again.stats["reopened"] == out.stats["reopened"]


def test_a_reopened_block_is_drawn_and_the_cache_holds_the_corrected_block(dlm):
    out = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=8, reopen_threshold=0.02, reopen_budget=2,
                       record_trajectory=True)
    assert out.stats["reopened"] > 0
    history = out.trajectory.history(row=0)
    assert sum(entry["remasks"] for entry in history) == out.stats["reopened"]
    assert all(entry["position"] >= 1 and entry["position"] < 4 for entry in history if entry["remasks"])
    assert [entry["token"] for entry in history] == out.sequences[0, 6:14].tolist()  # the drawn tokens are the output
    # the corrected first block, decoded as a given prefix, continues exactly as the run did
    again = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=4, response_prefix=out.sequences[:, 6:10])
    assert torch.equal(again.sequences[0, 10:14], out.sequences[0, 10:14])


def test_reopening_refuses_what_it_cannot_do(dlm):
    from transformers import TextStreamer

    with pytest.raises(ValueError, match="reopen_threshold must be in"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, reopen_threshold=1.5)
    with pytest.raises(ValueError, match="may rewrite a finished block that a streamer has already shown"):
        dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=4, reopen_threshold=0.5,
                     streamer=TextStreamer(dlm.tokenizer))
    c = dlm.config
    with pytest.raises(ValueError, match="clean_attention: causal reads its AR stream .* it needs a model with "
                                         "shift: true"):
        SamplerSettings(block_size=4, mask_token_id=c.mask_token_id, eos_token_ids=(), pad_token_id=0,
                        causal_clean=True, shift=False, reopen_threshold=0.5)
    SamplerSettings(block_size=4, mask_token_id=c.mask_token_id, eos_token_ids=(), pad_token_id=0,
                    causal_clean=True, reopen_threshold=0.5)  # its AR stream judges (tests/test_causal_clean.py)


def test_correction_budget_bounds_remasks_and_output_is_clean(dlm):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=12, remask_threshold=0.99, remask_budget=2)
    # every committed token is below 0.99 for a random model: each block retracts exactly its budget per row
    assert out.remasked == 2 * 2 * 3
    assert not (out.sequences[:, 6:] == dlm.config.mask_token_id).any()
    assert out.num_new_tokens.tolist() == [12, 12]


# -- the fused commit pass and dropping finished rows are pure speed-ups -------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_fused_commit_and_dropping_rows_change_no_token(arch, block_size):
    dlm = _dlm(arch, block_size)
    free = dlm.generate(PROMPTS, MASK, max_new_tokens=9, fuse_commit=False, drop_finished=False).sequences[:, 6:]
    eos_id = int(free[0, 3])  # make a token row 0 emits early the end-of-sequence token
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos_id)
    reference = dlm.generate(PROMPTS, MASK, max_new_tokens=9, fuse_commit=False, drop_finished=False, threshold=0.5)
    for fuse in (True, False):
        for drop in (True, False):
            out = dlm.generate(PROMPTS, MASK, max_new_tokens=9, fuse_commit=fuse, drop_finished=drop, threshold=0.5)
            assert torch.equal(out.sequences, reference.sequences), (fuse, drop)
            assert out.num_new_tokens.tolist() == reference.num_new_tokens.tolist()
            assert out.tokens_per_step == reference.tokens_per_step
    assert reference.num_new_tokens[0] <= 4


def test_fused_commit_saves_one_forward_per_block(dlm):
    fused = dlm.generate(PROMPTS, MASK, max_new_tokens=16, threshold=0.0)
    unfused = dlm.generate(PROMPTS, MASK, max_new_tokens=16, threshold=0.0, fuse_commit=False)
    assert unfused.nfe == 1 + 4 + 3  # prefill, 4 one-step blocks, 3 commits
    assert fused.nfe == 4  # the prompt rides along with block 1, each commit with the next block
    assert torch.equal(fused.sequences, unfused.sequences)


# -- streaming ---------------------------------------------------------------------------------------------------
class Collect:
    def __init__(self):
        self.parts, self.ended = [], False

    def put(self, value):
        self.parts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_block(dlm):
    streamer = Collect()
    out = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=10, streamer=streamer)
    assert streamer.ended
    assert streamer.parts[0] == PROMPTS[0].tolist()
    assert [len(p) for p in streamer.parts[1:]] == [4, 4, 2]
    assert sum(streamer.parts[1:], []) == out.sequences[0, 6:].tolist()
    with pytest.raises(ValueError, match="batch of one"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, streamer=Collect())


def test_streamer_stops_at_end_of_sequence(dlm):
    free = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=12).sequences[0, 6:]
    eos_id = int(free[5])
    stop = free.tolist().index(eos_id) + 1
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos_id)
    streamer = Collect()
    dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=12, streamer=streamer)
    assert sum(streamer.parts[1:], []) == free[:stop].tolist()


# -- trajectories ------------------------------------------------------------------------------------------------
def test_trajectory_matches_the_output_and_survives_rows_leaving(dlm):
    free = dlm.generate(PROMPTS, MASK, max_new_tokens=12).sequences[:, 6:]
    eos_id = int(free[0, 1])
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos_id)
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=12, record_trajectory=True)
    assert out.num_new_tokens[0] <= 2 < out.num_new_tokens[1]  # row 0 left the batch after its first block
    assert out.trajectory.num_steps == len(out.tokens_per_step)
    for row in range(2):
        n = int(out.num_new_tokens[row])
        history = out.trajectory.history(row)
        assert [h["token"] for h in history][:n] == out.sequences[row, 6 : 6 + n].tolist()
        assert sum(sum(step.committed[row]) for step in out.trajectory.steps) == len(history)


def test_merging_the_trained_mask_row_for_inference_is_exact_and_reversible():
    from peft import LoraConfig

    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    layer = next(m for m in dlm.model.modules() if type(m).__name__ == "TrainableTokensLayer")
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].normal_()  # a trained mask row, unlike the base row
    before = layer.base_layer.weight.detach().clone()
    before_ptr = layer.base_layer.weight.data_ptr()
    canvas = torch.tensor([[5, 6, 7, dlm.config.mask_token_id, dlm.config.mask_token_id]])
    with torch.no_grad():
        reference = dlm.model(input_ids=canvas).logits
        with dlm.trained_token_rows_merged():
            assert layer.merged
            assert layer.base_layer.weight.data_ptr() == before_ptr  # written in place, the matrix not copied
            assert torch.equal(layer.base_layer.weight[dlm.config.mask_token_id],
                               layer.trainable_tokens_delta["default"][0])
            merged = dlm.model(input_ids=canvas).logits
    assert torch.allclose(merged, reference, atol=1e-6)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, before)  # the original rows are back, bit for bit


# -- the static cache (the torch.compile / GPU path) gives the same tokens ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_cache_equals_dynamic_cache(arch):
    dlm = _dlm(arch, 4)
    prefix = torch.tensor([[11, 12, 13, 14, 15, 16]])[:, :5].expand(2, -1)
    for kwargs in ({}, {"threshold": 0.3}, {"fuse_commit": False}, {"response_prefix": prefix},
                   {"remask_threshold": 0.5, "remask_budget": 1}):
        dynamic = dlm.generate(PROMPTS, MASK, max_new_tokens=10, **kwargs)
        static = dlm.generate(PROMPTS, MASK, max_new_tokens=10, static_cache=True, **kwargs)
        assert torch.equal(static.sequences, dynamic.sequences), kwargs
        assert static.tokens_per_step == dynamic.tokens_per_step


def test_static_cache_crop_moves_the_write_position_back(dlm):
    from llm2diff.sampling.static_cache import BlockStaticCache

    cache = BlockStaticCache(config=dlm.model.config, max_cache_len=16)
    with torch.no_grad():
        dlm.model(input_ids=PROMPTS[:1], use_cache=True, **cache_kwargs(cache))
    assert cache.get_seq_length() == 6
    cache.crop(-2)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_saved_sampler_defaults_apply_and_no_threshold_overrides_them(dlm):
    from llm2diff.sampling.rules import NO_THRESHOLD

    dlm.decoding = dlm.decoding.replace(threshold=0.0)  # as a recipe's `sampler_threshold: 0.0` saves it
    assert dlm.generate(PROMPTS, MASK, max_new_tokens=8).tokens_per_step == [8, 8]
    assert dlm.generate(PROMPTS, MASK, max_new_tokens=8, threshold=NO_THRESHOLD).tokens_per_step == [2] * 8


def test_library_defaults_instead_of_saved_ones(dlm):
    from llm2diff.sampling.config import DecodingConfig

    dlm.decoding = dlm.decoding.replace(tokens_per_step=2, remask_threshold=0.99, remask_budget=2)
    saved = dlm.generate(PROMPTS, MASK, max_new_tokens=8)
    plain = dlm.generate(PROMPTS, MASK, decoding=DecodingConfig().to_dict(), max_new_tokens=8)
    assert saved.remasked > 0 and saved.tokens_per_step[0] == 4
    assert plain.remasked == 0 and plain.tokens_per_step == [2] * 8  # 1 token per step, no correction


def test_generating_with_the_lora_merged_gives_the_same_tokens_and_restores_the_weights_exactly():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in dlm.model.named_parameters()}
    for kwargs in ({}, {"threshold": 0.3}, {"commit_rule": "entropy", "entropy_bound": 1.0}):
        plain = dlm.generate(PROMPTS, MASK, max_new_tokens=10, **kwargs)
        merged = dlm.generate(PROMPTS, MASK, max_new_tokens=10, merge_lora=True, **kwargs)
        assert torch.equal(merged.sequences, plain.sequences), kwargs
        assert merged.nfe == plain.nfe
    canvas = torch.tensor([[5, 6, 7, dlm.config.mask_token_id, dlm.config.mask_token_id]])
    with torch.no_grad():
        reference = dlm.model(input_ids=canvas).logits
        with dlm.lora_merged():
            layers = [m for m in dlm.model.modules() if isinstance(m, LoraLayer)]
            assert layers and all(m.merged for m in layers)
            assert (dlm.model(input_ids=canvas).logits - reference).abs().max() < 1e-5
    assert not any(m.merged for m in layers)
    for name, param in dlm.model.named_parameters():  # bit for bit: the AR parent is untouched
        assert torch.equal(param, before[name]), name
    with dlm.ar_parent() as parent, torch.no_grad():
        assert not torch.allclose(parent(input_ids=canvas).logits, reference, atol=1e-3)
    # the merged weights are kept and swapped in again; an adapter change (a training step) rebuilds them
    with dlm.lora_merged():
        kept = {id(m): m.get_base_layer().weight.data_ptr() for m in layers}
    with dlm.lora_merged():
        assert all(m.get_base_layer().weight.data_ptr() == kept[id(m)] for m in layers)
    with torch.no_grad():
        layers[0].lora_B["default"].weight.add_(1.0)
        moved = dlm.model(input_ids=canvas).logits
        with dlm.lora_merged():
            assert layers[0].get_base_layer().weight.data_ptr() != kept[id(layers[0])]
            assert all(m.get_base_layer().weight.data_ptr() == kept[id(m)] for m in layers[1:])
            assert (dlm.model(input_ids=canvas).logits - moved).abs().max() < 1e-4


def test_a_fused_optimizer_step_rebuilds_the_merged_lora():
    """torch's fused AdamW (the transformers default) updates parameters without advancing their version counters:
    the merged weights must still follow the training step."""
    from peft import LoraConfig

    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    canvas = torch.tensor([[5, 6, 7, dlm.config.mask_token_id, dlm.config.mask_token_id]])
    with torch.no_grad(), dlm.lora_merged():
        dlm.model(input_ids=canvas)  # builds and keeps the merged weights
    trained = [p for n, p in dlm.model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(trained, lr=0.1, fused=True)
    versions = [p._version for p in trained]
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert [p._version for p in trained] == versions  # the counters did not move
    with torch.no_grad():
        moved = dlm.model(input_ids=canvas).logits
        with dlm.lora_merged():
            stale = (dlm.model(input_ids=canvas).logits - moved).abs().max()
    assert stale < 1e-3, f"the merged weights are the ones from before the step (max |diff| {stale})"
