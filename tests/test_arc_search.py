"""The candidate search with a probability floor: on a causal stream it returns exactly the sequences whose
probability is at least the floor (checked against brute-force enumeration), in probability order; the grid grammar
keeps only rectangular grids; the diffusion search respects the floor and its bounds, and gives the same candidates
with and without the KV cache; `BlockContext.pop` takes a committed block back off exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.arc.search import GridAlphabet, SearchSettings, _Shape, search_candidates
from llm2diff.sampling.block_cache import BlockContext

PROMPT = [5, 6, 7, 8, 9, 10, 11]


def _alphabet(tokenizer) -> GridAlphabet:
    # the tiny word-level tokenizer drops a bare newline when encoding, so the ids are read off its vocabulary
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    return GridAlphabet(ids, tokenizer.convert_tokens_to_ids("\n"), (tokenizer.eos_token_id,))


def _peaked(model, scale: float = 3.0):
    """Sharpen the tiny model's head so a few tokens carry most of the probability (a short search tree)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _grid_head(model, alphabet: GridAlphabet, scale: float = 2.0):
    """Only the alphabet's tokens get logits away from 0 (so grids have probability a search can find)."""
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[alphabet.ids] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= scale
    return model


def _grammar_ok(kinds: list[str], max_side: int = 30) -> bool:
    shape = _Shape()
    for kind in kinds:
        shape = shape.after(kind, max_side)
        if shape is None:
            return False
    return True


def _brute_force(model, alphabet: GridAlphabet, max_new_tokens: int, floor: float, grammar: bool):
    """Every sequence over the alphabet ending in end-of-sequence within `max_new_tokens`, with its exact log p
    under the causal `model` (full softmax, the alphabet's tokens only), kept when p >= floor."""
    kind = {t: "digit" for t in alphabet.digits} | {alphabet.newline: "newline", alphabet.eos[0]: "eos"}
    body = [*alphabet.digits, alphabet.newline]
    found = {}
    with torch.no_grad():
        for length in range(max_new_tokens):
            for seq in itertools.product(body, repeat=length):
                full = [*seq, alphabet.eos[0]]
                if grammar and not _grammar_ok([kind[t] for t in full]):
                    continue
                ids = torch.tensor([PROMPT + full])
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
                total = sum(float(logp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(full))
                if total >= math.log(floor):
                    found[tuple(seq)] = total
    return found


@pytest.mark.parametrize("grammar", [False, True])
def test_causal_search_returns_exactly_the_sequences_above_the_floor_in_order(grammar):
    tok = make_tokenizer()
    model = _peaked(make_model("qwen3"))
    alphabet = _alphabet(tok)
    floor, max_new = 0.002, 4
    settings = SearchSettings(floor=floor, max_candidates=10_000, max_new_tokens=max_new, grammar=grammar)
    result = search_candidates(model, PROMPT, 1, mask_token_id=0, alphabet=alphabet, settings=settings)
    expected = _brute_force(model, alphabet, max_new, floor, grammar)
    assert expected, "the test needs some sequences above the floor"
    got = {tuple(c.tokens): c.logprob for c in result.candidates}
    assert got.keys() == expected.keys()
    for seq, logprob in got.items():
        assert logprob == pytest.approx(expected[seq], abs=1e-4)
    logprobs = [c.logprob for c in result.candidates]
    assert logprobs == sorted(logprobs, reverse=True) and min(logprobs) >= math.log(floor)
    assert result.exhausted and result.stopped_by is None
    # one pass per token on the path: the prefill, then each committed token's pass (never more than the tree)
    assert result.passes <= 1 + sum(len(s) for s in expected) + len(expected) * max_new


def test_a_lower_floor_finds_a_superset_and_the_bounds_stop_the_search():
    tok = make_tokenizer()
    model = _peaked(make_model("llama"))
    alphabet = _alphabet(tok)

    def run(**kwargs):
        settings = SearchSettings(**{"max_candidates": 10_000, "max_new_tokens": 4, "grammar": False, **kwargs})
        return search_candidates(model, PROMPT, 1, mask_token_id=0, alphabet=alphabet, settings=settings)

    high, low = run(floor=0.01), run(floor=0.001)
    assert {tuple(c.tokens) for c in high.candidates} < {tuple(c.tokens) for c in low.candidates}
    capped = run(floor=0.001, max_candidates=2)
    assert len(capped.candidates) == 2 and capped.stopped_by == "max_candidates" and not capped.exhausted
    # depth first, most likely child first: the first grid found is the greedy path's
    assert capped.candidates[0].tokens in [c.tokens for c in low.candidates[:3]]
    short = run(floor=0.001, max_passes=3)
    assert short.stopped_by == "max_passes" and short.passes <= 4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_diffusion_search_respects_the_floor_and_cache_equals_recompute(arch, threshold):
    tok = make_tokenizer()
    alphabet = _alphabet(tok)
    dlm = adapt(_grid_head(make_model(arch), alphabet), tok, block_size=4)
    settings = SearchSettings(floor=0.001, max_candidates=50, max_new_tokens=8, threshold=threshold, grammar=False)
    runs = [search_candidates(dlm.model, PROMPT, 4, dlm.config.mask_token_id, alphabet, settings, use_cache=cache)
            for cache in (True, False)]
    cached, recomputed = runs
    assert [c.tokens for c in cached.candidates] == [c.tokens for c in recomputed.candidates]
    assert [c.logprob for c in cached.candidates] == pytest.approx([c.logprob for c in recomputed.candidates],
                                                                   abs=1e-4)
    assert cached.candidates, "the test needs candidates"
    logprobs = [c.logprob for c in cached.candidates]
    assert logprobs == sorted(logprobs, reverse=True) and min(logprobs) >= math.log(0.001)
    assert len({tuple(c.tokens) for c in cached.candidates}) == len(cached.candidates)  # no duplicates
    for c in cached.candidates:
        assert all(t in alphabet.ids and t not in alphabet.eos for t in c.tokens)


def test_grammar_keeps_rectangular_grids_and_searches_their_size():
    tok = make_tokenizer()
    alphabet = _alphabet(tok)
    dlm = adapt(_grid_head(make_model("qwen2"), alphabet), tok, block_size=4)
    settings = SearchSettings(floor=1e-4, max_candidates=30, max_new_tokens=12, threshold=0.9, max_side=3)
    result = search_candidates(dlm.model, PROMPT, 4, dlm.config.mask_token_id, alphabet, settings)
    assert result.candidates
    shapes = set()
    for c in result.candidates:
        assert c.grid is not None, c.text  # every candidate parses as a rectangular grid
        assert len(c.grid) <= 3 and all(len(row) == len(c.grid[0]) <= 3 for row in c.grid)
        shapes.add((len(c.grid), len(c.grid[0])))
    assert len(shapes) > 1  # the output size is searched too


def test_search_runs_the_adapted_model_and_its_parent():
    from peft import LoraConfig

    from llm2diff.arc.search import search

    tok = make_tokenizer()
    alphabet = _alphabet(tok)
    settings = SearchSettings(floor=0.001, max_candidates=20, max_new_tokens=6, grammar=False)
    parent = _grid_head(make_model("llama"), alphabet)
    direct = search_candidates(parent, PROMPT, 1, 0, alphabet, settings)
    dlm = adapt(_grid_head(make_model("llama"), alphabet), tok, block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    via_parent = search(dlm, PROMPT, settings, use_parent=True, alphabet=alphabet)
    assert [c.tokens for c in via_parent.candidates] == [c.tokens for c in direct.candidates] and direct.candidates
    diffusion = search(dlm, PROMPT, settings, alphabet=alphabet)
    assert diffusion.passes > 0 and all(c.logprob >= math.log(0.001) for c in diffusion.candidates)


def test_grammar_rules():
    def walk(text):
        kinds = ["digit" if ch.isdigit() else "newline" if ch == "\n" else "eos" for ch in text]
        return _grammar_ok(kinds, max_side=3)

    assert walk("12\n34$") and walk("1$") and walk("123\n456\n789$")
    assert not walk("$") and not walk("\n") and not walk("12\n\n") and not walk("12\n3$") and not walk("12\n345")
    assert not walk("1234") and not walk("1\n2\n3\n") and not walk("12\n$")


def test_pop_takes_a_committed_block_back_off_exactly():
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    mask = dlm.config.mask_token_id
    ctx = BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long), 4,
                       fuse=False)
    canvas = torch.tensor([[mask, 20, mask, 22]])
    with torch.no_grad():
        ctx.commit(torch.tensor([[20, 21, 22, 23]]))
        before, first = ctx.block_logits(canvas), ctx.last_logits
        ctx.commit(torch.tensor([[24, 25, 26, 27]]))
        ctx.pop(first)
        after = ctx.block_logits(canvas)
    assert torch.equal(before, after) and ctx.num_blocks == 1 and ctx.generated.tolist() == [[20, 21, 22, 23]]
    with pytest.raises(RuntimeError, match="pop needs a committed block"):
        BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long), 4).pop(None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"floor must be in \(0, 1\]"):
        SearchSettings(floor=0.0)
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        SearchSettings(max_candidates=0)
    with pytest.raises(ValueError, match="needs one token per digit"):
        GridAlphabet.of(make_tokenizer(), [2])  # the tiny tokenizer cannot write a bare newline
