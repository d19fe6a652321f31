"""The one generation step behind every grader (`llm2diff.evaluation.completions.complete`) and the one stop rule
(`llm2diff.sampling.stops.StopRule`): every decoder and the AR parent stop a row at the same token; rows are cut
where the decoder stopped them; passes and tokens are counted per row."""

from __future__ import annotations

import torch
from test_lossless import byte_level_tokenizer, make_dlm, set_eos

from llm2diff.evaluation.completions import Throughput, complete, left_pad
from llm2diff.sampling.stops import StopRule

PROMPTS = [[5, 6, 7, 8, 9, 10], [5, 6, 7]]
NEW = 13


def twin_of_parent():
    """Block size 1 with the adapter doing nothing: every decoder's greedy output is the AR parent's."""
    dlm = make_dlm("qwen3", 1, scale=0.0, tokenizer=byte_level_tokenizer())
    set_eos(dlm, None)
    return dlm


def test_every_decoder_and_the_parent_stop_at_the_same_token():
    dlm = twin_of_parent()
    tok = dlm.tokenizer
    free = complete(dlm, PROMPTS, {"max_new_tokens": NEW}, ar_parent=True)
    assert [len(r.tokens) for r in free.rows] == [NEW, NEW]
    new = free.rows[0].tokens
    target = tok.decode(new[4:6])
    stop = next(n for n in range(1, NEW + 1) if target in tok.decode(new[:n]))
    layer = {"max_new_tokens": NEW, "stop_strings": [target]}
    parent = complete(dlm, PROMPTS, layer, ar_parent=True)
    assert parent.rows[0].tokens == new[:stop]
    for mode in ("block", "lossless"):
        done = complete(dlm, PROMPTS, {**layer, "mode": mode})
        assert [r.tokens for r in done.rows] == [r.tokens for r in parent.rows], mode
        assert [r.text for r in done.rows] == [r.text for r in parent.rows], mode
    # the block sampler's rows as `generate` returns them: the stop kept, padding after it
    out = dlm.generate(*left_pad(PROMPTS, tok.pad_token_id), decoding={**layer, "mode": "block"})
    assert out.num_new_tokens[0] == stop
    assert (out.sequences[0, len(PROMPTS[0]) + stop:] == tok.pad_token_id).all()


def test_a_stop_string_may_begin_in_the_prompt_as_in_generate():
    """Matched on the prompt followed by the new tokens, as `generate(stop_strings=...)` matches."""
    tok = byte_level_tokenizer()
    prompt, new = [5, 6, 7], [8, 9, 10]
    spanning = tok.decode([7, 8])
    assert spanning not in tok.decode(new)
    rule = StopRule((), [spanning], tok)
    assert rule.criteria is not None
    assert rule.first_stop(torch.tensor(prompt), new) == 1
    assert rule.first_stop(None, new) is None
    assert StopRule((), [tok.decode([9, 10])], tok).first_stop(torch.tensor(prompt), new) == 3
    assert StopRule((9,), [tok.decode([9, 10])], tok).first_stop(torch.tensor(prompt), new) == 2  # eos first
    assert StopRule((9,), (), tok).first_stop(None, new, start=2) is None  # tokens before `start` were checked


def test_word_level_tokenizers_fall_back_on_the_decoded_new_tokens():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    rule = StopRule((), ["x"], tok)
    assert rule.criteria is None
    new = tok("tom has 5 apples").input_ids
    stop_string = tok.decode(new[1:3])
    stop = next(n for n in range(1, len(new) + 1) if stop_string in tok.decode(new[:n]))
    assert StopRule((), [stop_string], tok).first_stop(None, new) == stop


def test_rows_passes_and_throughput():
    dlm = make_dlm("qwen2", 4)
    tok = dlm.tokenizer
    parent = complete(dlm, PROMPTS, {"max_new_tokens": NEW}, ar_parent=True)
    assert [r.passes for r in parent.rows] == [len(r.tokens) for r in parent.rows]  # one pass per token
    assert parent.nfe == NEW
    diffusion = complete(dlm, PROMPTS, {"max_new_tokens": NEW, "threshold": 0.0}, seed=0)
    out = dlm.generate(*left_pad(PROMPTS, tok.pad_token_id), decoding={"max_new_tokens": NEW, "threshold": 0.0},
                       seed=0)
    width = max(map(len, PROMPTS))
    assert [r.tokens for r in diffusion.rows] == [out.sequences[k, width:width + int(n)].tolist()
                                                   for k, n in enumerate(out.num_new_tokens)]
    assert [r.passes for r in diffusion.rows] == out.nfe_per_row.tolist()
    assert diffusion.nfe == out.nfe
    assert [r.text for r in diffusion.rows] == [tok.decode(r.tokens, skip_special_tokens=True) for r in diffusion.rows]
    cost = Throughput()
    cost.add_batch(parent)
    cost.add_batch(diffusion)
    assert cost.new_tokens == parent.new_tokens + diffusion.new_tokens
    assert cost.row_forwards == parent.passes + diffusion.passes
    assert cost.sequences == 4 and cost.nfe == parent.nfe + diffusion.nfe
    assert cost.nfe_per_token == cost.row_forwards / cost.new_tokens


def test_the_parent_samples_with_the_decodings_temperature_and_seed():
    dlm = make_dlm("qwen2", 4)
    sampled = {"max_new_tokens": NEW, "temperature": 1.5}
    first = complete(dlm, PROMPTS, sampled, ar_parent=True, seed=1)
    assert [r.tokens for r in complete(dlm, PROMPTS, sampled, ar_parent=True, seed=1).rows] == \
        [r.tokens for r in first.rows]
    greedy = complete(dlm, PROMPTS, {"max_new_tokens": NEW}, ar_parent=True)
    assert [r.tokens for r in first.rows] != [r.tokens for r in greedy.rows]

