"""Sampler semantics: lengths, stopping, padding, commit rules, forbidden ids, seeds, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.sampling.rules import choose_tokens, coarse_to_fine_priority, filter_top_k_top_p, select_commits

PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]])
MASK = (PROMPTS != 0).long()


@pytest.fixture
def dlm():
    """Block size 4; end-of-sequence set to a token this random model never picks, so nothing stops early."""
    model = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    model.model.generation_config.eos_token_id = None
    model.tokenizer.eos_token = "<|im_start|>"
    return model


def test_max_new_tokens_honoured_when_not_a_multiple_of_block(dlm):
    for n in (1, 3, 4, 7, 10):
        out = dlm.generate(PROMPTS, MASK, max_new_tokens=n)
        assert out.sequences.shape == (2, 6 + n)
        assert out.num_new_tokens.tolist() == [n, n]
        assert sum(out.tokens_per_step) == 2 * n


def test_rows_stop_independently_and_pad_after_eos(dlm):
    free = dlm.generate(PROMPTS, MASK, max_new_tokens=12).sequences[:, 6:]
    # make a token that row 0 emits at position 5 (inside block 2) the end-of-sequence token
    eos_id = int(free[0, 5])
    assert eos_id not in free[0, :5].tolist(), "pick a token that appears first at position 5"
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos_id)
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=12)
    new = out.sequences[:, 6:]
    pad = dlm.tokenizer.pad_token_id
    assert new[0, :6].tolist() == free[0, :6].tolist()
    assert (new[0, 6:] == pad).all()  # tokens committed after eos in the same block, and later blocks, are pad
    assert out.num_new_tokens[0] == 6
    assert out.nfe_per_row[0] < out.nfe  # row 0 stopped counting forward passes when it finished
    first = (free[1] == eos_id).nonzero()
    stop = int(first[0]) + 1 if len(first) else 12
    assert new[1, :stop].tolist() == free[1, :stop].tolist()
    assert out.num_new_tokens[1] == stop


def test_stop_strings(dlm):
    tok = dlm.tokenizer

    free = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=12).sequences[0, 6:]
    target = tok.decode(free[3:5])
    stop_at = next(n for n in range(1, 13) if target in tok.decode(free[:n]))
    out = dlm.generate(PROMPTS[:1], MASK[:1], max_new_tokens=12, stop_strings=[target])
    assert out.num_new_tokens.item() == stop_at
    assert out.sequences[0, 6 : 6 + stop_at].tolist() == free[:stop_at].tolist()
    assert (out.sequences[0, 6 + stop_at :] == tok.pad_token_id).all()


def test_threshold_zero_commits_whole_block_per_step(dlm):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, threshold=0.0)
    assert out.tokens_per_step == [8, 8]  # 2 rows x 4 tokens, one step per block
    assert out.nfe == 1 + 1  # [prompt ; block 1], [commit block 1 ; block 2] fused (no commit after the last)
    assert out.nfe_per_row.tolist() == [2, 2]
    unfused = dlm.generate(PROMPTS, MASK, max_new_tokens=8, threshold=0.0, fuse_commit=False)
    assert unfused.nfe == 1 + 1 + 1 + 1  # prefill, block 1, commit, block 2 (no fusion: the prompt alone too)
    assert torch.equal(unfused.sequences, out.sequences)


def test_tokens_per_step_exact_without_threshold(dlm):
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, tokens_per_step=2, threshold=None)
    assert out.tokens_per_step == [4, 4, 4, 4]
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, tokens_per_step=3, threshold=0.999999)
    assert out.tokens_per_step == [6, 2, 6, 2]


def test_mask_token_and_spare_rows_never_sampled(dlm):
    mask_id, vocab = dlm.config.mask_token_id, dlm.config.vocab_size
    with torch.no_grad():  # make the mask token and a spare row the most likely outputs everywhere
        dlm.model.lm_head.weight[mask_id] = 0
        dlm.model.lm_head.bias = None
        dlm.model.lm_head.weight[mask_id, :] = 0
        dlm.model.lm_head.weight[vocab + 3, :] = 0
        hidden = dlm.model.model.norm.weight.shape[0]
        dlm.model.lm_head.weight[mask_id, :] = 50.0 / hidden
        dlm.model.lm_head.weight[vocab + 3, :] = 50.0 / hidden
        dlm.model.model.norm.weight.abs_()
    for temperature in (0.0, 1.0):
        out = dlm.generate(PROMPTS, MASK, max_new_tokens=8, temperature=temperature, seed=0)
        new = out.sequences[:, 6:]
        assert (new != mask_id).all() and (new < vocab).all()


def test_seeded_sampling_is_reproducible(dlm):
    a = dlm.generate(PROMPTS, MASK, max_new_tokens=12, temperature=1.0, seed=1).sequences
    b = dlm.generate(PROMPTS, MASK, max_new_tokens=12, temperature=1.0, seed=1).sequences
    c = dlm.generate(PROMPTS, MASK, max_new_tokens=12, temperature=1.0, seed=2).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top-k 1 sampling proposes the argmax; committing whole blocks removes the (tied) commit order from the test
    greedy = dlm.generate(PROMPTS, MASK, max_new_tokens=12, tokens_per_step=4).sequences
    top1 = dlm.generate(PROMPTS, MASK, max_new_tokens=12, tokens_per_step=4, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(top1.sequences, greedy)


def test_input_checks(dlm):
    with pytest.raises(ValueError, match="left-padded"):
        dlm.generate(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="exceeds the model's maximum length 512"):
        dlm.generate(torch.ones(1, 500, dtype=torch.long) * 5, max_new_tokens=20)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=0)


def test_select_commits_rules():
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.4]])
    todo = torch.tensor([[False, True, True, True]])
    assert select_commits(conf, todo, 1).tolist() == [[False, False, True, False]]
    assert select_commits(conf, todo, 2).tolist() == [[False, False, True, True]]
    assert select_commits(conf, todo, 1, threshold=0.3).tolist() == [[False, False, True, True]]
    assert select_commits(conf, todo, 1, threshold=0.99).tolist() == [[False, False, True, False]]  # at least one
    assert select_commits(conf, todo, 5).tolist() == [[False, True, True, True]]
    with pytest.raises(ValueError, match="tokens_per_step must be >= 1"):
        select_commits(conf, todo, 0)


def test_confidence_floor_and_priority():
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.4], [0.3, 0.2, 0.1, 0.25]])
    todo = torch.tensor([[False, True, True, True], [True, True, True, True]])
    # two per step, but nothing under 0.5: row 0 keeps only 0.6; row 1 has nothing above, so its most confident
    assert select_commits(conf, todo, 2, floor=0.5).tolist() == [[False, False, True, False],
                                                                 [True, False, False, False]]
    priority = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 5.0, 0.0]])
    assert select_commits(conf, todo, 1, priority=priority).tolist() == [[False, True, False, False],
                                                                         [False, False, True, False]]
    # coarse-to-fine: log(confidence) + weight * significance[token]
    significance = torch.tensor([0.0, 1.0, 0.5])
    tokens = torch.tensor([[0, 1, 2]])
    conf = torch.tensor([[0.8, 0.4, 0.5]])
    prio = coarse_to_fine_priority(tokens, conf, significance, weight=2.0)
    assert prio[0].tolist() == pytest.approx([math.log(0.8), math.log(0.4) + 2.0, math.log(0.5) + 1.0])
    assert coarse_to_fine_priority(tokens, conf, significance, 0.0).argmax().item() == 0  # weight 0: confidence


def test_coarse_to_fine_commits_significant_tokens_first(dlm, monkeypatch):
    import llm2diff.sampling.sampler as sampler_module

    with pytest.raises(ValueError, match="needs the token significance table"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, commit_rule="coarse_to_fine")
    vocab = dlm.model.get_input_embeddings().weight.shape[0]
    dlm.significance = torch.rand(vocab, generator=torch.Generator().manual_seed(0))
    proposals, commits = [], []

    def priority_spy(tokens, confidence, significance, weight):
        proposals.append(tokens.clone())
        return coarse_to_fine_priority(tokens, confidence, significance, weight)

    def select_spy(confidence, todo, *args, **kwargs):
        commit = select_commits(confidence, todo, *args, **kwargs)
        commits.append((todo.clone(), commit.clone()))
        return commit

    monkeypatch.setattr(sampler_module, "coarse_to_fine_priority", priority_spy)
    monkeypatch.setattr(sampler_module, "select_commits", select_spy)
    dlm.generate(PROMPTS, MASK, max_new_tokens=8, commit_rule="coarse_to_fine", significance_weight=1000.0)
    assert len(proposals) == len(commits) == 8  # 2 blocks x 4 steps, one token per step
    for tokens, (todo, commit) in zip(proposals, commits):
        sig = dlm.significance[tokens].masked_fill(~todo, -1.0)
        most = sig == sig.max(-1, keepdim=True).values  # ties: the same token proposed at two positions
        assert (commit <= most).all() and commit.sum(-1).tolist() == [1, 1]


def test_top_k_top_p_and_confidence():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)[0, 0, 2:]).all()
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_p=0.7)[0, 0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    tokens, conf = choose_tokens(logits)
    assert tokens.item() == 0 and conf.item() == pytest.approx(0.5)
    tokens, conf = choose_tokens(logits, top_k=2)
    assert conf.item() == pytest.approx(0.5 / 0.8)


@pytest.mark.parametrize("use_cache", [True, False])
def test_continuing_from_a_response_prefix(dlm, use_cache):
    full = dlm.generate(PROMPTS, MASK, max_new_tokens=12, use_cache=use_cache).sequences
    start = PROMPTS.shape[1]
    # a prefix of whole blocks: the later blocks see the same clean context, so the continuation is the same
    cont = dlm.generate(PROMPTS, MASK, max_new_tokens=4, use_cache=use_cache,
                        response_prefix=full[:, start : start + 8])
    assert torch.equal(cont.sequences, full)
    assert cont.num_new_tokens.tolist() == [4, 4]
    # a prefix ending inside a block: the given tokens stay, denoising starts after them, and exactly
    # max_new_tokens follow (the first block has 2 positions left, then a whole block, then one more)
    prefix = full[:, start : start + 6]
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=7, use_cache=use_cache, response_prefix=prefix)
    assert out.sequences.shape[1] == start + 6 + 7
    assert torch.equal(out.sequences[:, : start + 6], full[:, : start + 6])
    assert out.num_new_tokens.tolist() == [7, 7]


def test_prefix_continuation_cache_equals_recompute(dlm):
    prefix = torch.tensor([[11, 12, 13], [14, 15, 16]])
    cached = dlm.generate(PROMPTS, MASK, max_new_tokens=9, response_prefix=prefix)
    recomputed = dlm.generate(PROMPTS, MASK, max_new_tokens=9, response_prefix=prefix, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    with pytest.raises(ValueError, match="response_prefix must be a \\(batch, P\\) tensor"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4, response_prefix=prefix[:1])
    with pytest.raises(ValueError, match="contains the mask token"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=4,
                     response_prefix=torch.full((2, 2), dlm.config.mask_token_id))


@pytest.mark.parametrize("arch,causal_clean", [("qwen2", False), ("qwen3", False), ("llama", False), ("qwen2", True)])
def test_prompt_fused_into_the_first_block_pass_gives_the_same_predictions_one_pass_fewer(arch, causal_clean):
    from llm2diff.sampling.block_cache import BlockContext

    model = make_model(arch).eval()
    gen = torch.Generator().manual_seed(0)
    canvas = torch.randint(3, 60, (2, 4), generator=gen)
    block, canvas2 = torch.randint(3, 60, (2, 4), generator=gen), torch.randint(3, 60, (2, 4), generator=gen)
    with torch.no_grad():
        separate = BlockContext(model, PROMPTS, MASK, 4, causal_clean=causal_clean)
        fused = BlockContext(model, PROMPTS, MASK, 4, causal_clean=causal_clean, fuse_prompt=True)
        assert (separate.nfe, fused.nfe) == (1, 0)  # the prompt waits for the first block
        first = separate.block_logits(canvas)
        torch.testing.assert_close(fused.block_logits(canvas), first, atol=1e-5, rtol=0)
        assert (separate.nfe, fused.nfe) == (2, 1)
        assert fused.cache.get_seq_length() == separate.cache.get_seq_length() == PROMPTS.shape[1]
        for ctx in (separate, fused):  # the cached prompt then serves the next blocks alike
            ctx.commit(block)
        torch.testing.assert_close(fused.block_logits(canvas2), separate.block_logits(canvas2), atol=1e-5, rtol=0)
        # asked for the first token's logits before any block pass, a deferred prompt runs alone
        alone = BlockContext(model, PROMPTS, MASK, 4, causal_clean=causal_clean, fuse_prompt=True)
        torch.testing.assert_close(alone.first_position_logits(), first[:, 0], atol=1e-5, rtol=0)
        assert alone.nfe == 1 and not alone.prompt_pending
        # no fusion without a fusing cache: the prompt is prefilled at once
        assert BlockContext(model, PROMPTS, MASK, 4, fuse=False, fuse_prompt=True).nfe == 1
