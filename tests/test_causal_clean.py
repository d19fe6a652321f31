"""`clean_attention: causal`: clean blocks read themselves causally, in training and in the sampler's commit pass.

The invariants of the block layout hold again (training forward = cached inference, cache = recompute, fused =
unfused commit), the clean stream is exactly the causal LM over prompt and response, and its AR loss rides on the
diffusion forward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, make_model, make_tokenizer
from peft import LoraConfig

from llm2diff import adapt, load
from llm2diff.cli import main
from llm2diff.modeling.attention import block_diffusion_mask, block_diffusion_mask_mod, cached_block_mask
from llm2diff.modeling.config import DiffusionConfig
from llm2diff.noise.masking import NoiseSpec
from llm2diff.sampling.lossless import lossless_generate
from llm2diff.sampling.block_cache import BlockContext
from llm2diff.training.config import DiffusionSFTConfig
from llm2diff.training.layout import build_layout
from llm2diff.training.objective import diffusion_loss, layout_logits

CASES = [(arch, attn) for arch in ARCHITECTURES for attn in ("sdpa", "eager")]
PROMPT = [5, 6, 7, 8, 9, 10, 11]
RESPONSE = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 2]  # 3 blocks of 4


def test_mask_rules_by_hand():
    layout = build_layout([[5, 6]], [[7, 8, 9, 10]], block_size=2, pad_id=0, causal_clean=True)
    # layout: p0 p1 | c0 c1 c2 c3 | n0 n1 n2 n3; the clean rows are now causal, the noisy rows unchanged
    allowed = block_diffusion_mask(layout.segment, layout.block, causal_clean=True)[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(allowed, expected)
    assert layout.causal_clean
    assert layout.clean_source_index[0].tolist() == [1, 2, 3, 4]  # last prompt token, then clean token j-1


def test_mask_mod_reproduces_the_causal_clean_mask():
    from torch.nn.attention.flex_attention import create_mask

    g = torch.Generator().manual_seed(0)
    segment = torch.randint(0, 4, (3, 17), generator=g)
    block = torch.randint(-1, 4, (3, 17), generator=g)
    document = torch.randint(-1, 2, (3, 17), generator=g)
    for doc in (None, document):
        expected = block_diffusion_mask(segment, block, doc, causal_clean=True)[:, None]
        got = create_mask(block_diffusion_mask_mod(segment, block, doc, causal_clean=True), 3, 1, 17, 17, device="cpu")
        assert torch.equal(got, expected)
        assert not torch.equal(expected, block_diffusion_mask(segment, block, doc)[:, None])


def test_cached_mask_reads_the_clean_block_causally():
    key_valid = torch.tensor([[False, True]])
    allowed = cached_block_mask(key_valid, 4, torch.float32, block_size=2, causal_blocks=1)[0, 0] == 0
    # keys: 2 cached | clean c0 c1 | noisy n0 n1
    assert allowed.int().tolist() == [
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1],
    ]
    plain = cached_block_mask(key_valid, 4, torch.float32, block_size=2)[0, 0] == 0
    assert plain[0].int().tolist() == [0, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("arch,attn", CASES)
def test_training_forward_equals_cached_inference(arch, attn):
    dlm = adapt(make_model(arch, attn), make_tokenizer(), block_size=4, clean_attention="causal")
    mask_id = dlm.config.mask_token_id
    layout = build_layout([PROMPT], [RESPONSE], 4, pad_id=0, causal_clean=True)
    noisy_ids = layout.input_ids.clone()
    for j in [0, 2, 3, 5, 8, 9, 10, 11]:
        noisy_ids[0, layout.noisy_index[0, j]] = mask_id
    train = layout_logits(dlm.model, layout, noisy_ids, layout.response_valid.clone())
    block_layout = build_layout([PROMPT], [RESPONSE], 4, pad_id=0)
    other = layout_logits(dlm.model, block_layout, noisy_ids, block_layout.response_valid.clone())
    assert (train[4:] - other[4:]).abs().max() > 1e-3  # the later blocks do read the clean blocks differently
    noisy_response = noisy_ids[0, layout.noisy_index[0]]
    for use_cache, fuse in ((True, True), (True, False), (False, False)):
        ctx = BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long),
                           block_size=4, use_cache=use_cache, fuse=fuse, causal_clean=True)
        for b in range(3):
            block = slice(4 * b, 4 * b + 4)
            infer = ctx.block_logits(noisy_response[None, block])[0]
            diff = (infer - train[block]).abs().max().item()
            assert diff <= 1e-4, f"block {b} use_cache={use_cache} fuse={fuse}: max |diff| {diff}"
            ctx.commit(torch.tensor([RESPONSE[block]]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_clean_stream_is_the_causal_lm_and_its_loss_rides_along(arch):
    dlm = adapt(make_model(arch), make_tokenizer(), block_size=4, clean_attention="causal")
    layout = build_layout([PROMPT, PROMPT[:4]], [RESPONSE, RESPONSE[:8]], 4, pad_id=0, causal_clean=True)
    valid = layout.response_valid
    _, clean = layout_logits(dlm.model, layout, layout.input_ids, valid, clean_select=valid)
    causal = []
    for prompt, response in ((PROMPT, RESPONSE), (PROMPT[:4], RESPONSE[:8])):
        logits = dlm.model(input_ids=torch.tensor([prompt + response])).logits[0]
        causal.append(logits[len(prompt) - 1 : len(prompt) + len(response) - 1])
    assert torch.allclose(clean, torch.cat(causal), atol=1e-5)

    spec = NoiseSpec(t_min=0.2, t_max=0.8)
    plain, _ = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id, spec=spec,
                              generator=torch.Generator().manual_seed(3))
    total, stats = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id, spec=spec,
                                  generator=torch.Generator().manual_seed(3), ar_weight=0.5)
    ar = F.cross_entropy(torch.cat(causal), layout.target[valid])
    assert torch.allclose(stats.ar_loss, ar, atol=1e-5)
    assert torch.allclose(total, plain + 0.5 * ar, atol=1e-5)
    # complementary masks train each example twice; the AR term is still the mean over each example once
    twice, stats2 = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id,
                                   spec=NoiseSpec(complementary=True), generator=torch.Generator().manual_seed(3),
                                   ar_weight=1.0)
    assert torch.allclose(stats2.ar_loss, ar, atol=1e-5)


def test_ar_loss_needs_a_causal_clean_stream():
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    layout = build_layout([PROMPT], [RESPONSE], 4, pad_id=0)
    with pytest.raises(ValueError, match="needs a causal clean stream"):
        diffusion_loss(dlm.model, layout, dlm.config.mask_token_id, ar_weight=1.0)


@pytest.mark.parametrize("arch,attn", [("qwen2", "sdpa"), ("llama", "eager")])
@pytest.mark.parametrize("block_size,tokens_per_step", [(4, 1), (3, 2)])
def test_cache_equals_recompute_and_fusion(arch, attn, block_size, tokens_per_step):
    dlm = adapt(make_model(arch, attn), make_tokenizer(), block_size=block_size, clean_attention="causal")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 6, 7, 8]])
    attention = (ids != 0).long()
    kwargs = dict(max_new_tokens=11, tokens_per_step=tokens_per_step)
    cached = dlm.generate(ids, attention, use_cache=True, **kwargs)
    recomputed = dlm.generate(ids, attention, use_cache=False, **kwargs)
    unfused = dlm.generate(ids, attention, use_cache=True, fuse_commit=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.sequences, unfused.sequences)
    assert cached.tokens_per_step == recomputed.tokens_per_step
    block = adapt(make_model(arch, attn), make_tokenizer(), block_size=block_size)
    assert block.config.clean_attention == "block" and dlm.config.causal_clean


def test_lossless_output_is_still_the_parents():
    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=4, clean_attention="causal",
                lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = lossless_generate(dlm, ids, max_new_tokens=14)
    assert torch.equal(out.sequences, dlm.ar_generate(ids, max_new_tokens=14))


def test_saved_and_reloaded_with_its_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    make_model("qwen3").save_pretrained(tmp_path / "base")
    make_tokenizer().save_pretrained(tmp_path / "base")
    dlm = adapt(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), make_tokenizer(), block_size=4,
                clean_attention="causal", lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = dlm.generate(ids, max_new_tokens=9, tokens_per_step=2).sequences
    dlm.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "diffusion_config.json").read_text())["clean_attention"] == "causal"
    again = load(tmp_path / "m")
    assert again.config.causal_clean
    assert torch.equal(again.generate(ids, max_new_tokens=9, tokens_per_step=2).sequences, before)


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="clean_attention must be one of block, causal, got 'casual'"):
        DiffusionConfig(clean_attention="casual")
    common = dict(output_dir="/tmp/unused", use_cpu=True, report_to="none", block_size=4)
    with pytest.raises(ValueError, match="unknown clean_attention 'casual'.*Did you mean 'causal'"):
        DiffusionSFTConfig(clean_attention="casual", **common)
    with pytest.raises(ValueError, match="ar_loss_weight needs clean_attention: causal"):
        DiffusionSFTConfig(ar_loss_weight=1.0, **common)
    with pytest.raises(ValueError, match="ar_loss_weight must be >= 0"):
        DiffusionSFTConfig(ar_loss_weight=-1.0, clean_attention="causal", **common)
    with pytest.raises(ValueError, match="ar_loss_weight needs shift: true"):
        DiffusionSFTConfig(ar_loss_weight=1.0, clean_attention="causal", shift=False, **common)
    # the AR twin of a recipe with the AR loss is that recipe at block size 1: its loss already is the AR loss
    twin = DiffusionSFTConfig(ar_loss_weight=1.0, clean_attention="causal", **{**common, "block_size": 1})
    assert twin.effective_ar_loss_weight == 0.0
    assert DiffusionSFTConfig(ar_loss_weight=0.5, clean_attention="causal", **common).effective_ar_loss_weight == 0.5


def test_recipe_trains_logs_the_ar_loss_and_continues_with_the_models_attention(tmp_path):
    root = tmp_path
    make_model("qwen2", layers=2).save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    problems = [{"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"}] * 8
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))

    def recipe(name, **overrides):
        fields = dict(model_name_or_path=str(root / "tiny"), dataset_name=str(root / "train.jsonl"), block_size=4,
                      output_dir=str(root / name), max_steps=4, per_device_train_batch_size=4, learning_rate=0.01,
                      logging_steps=2, save_steps=4, report_to="none", use_cpu=True, use_lora=False, seed=0,
                      clean_attention="causal", ar_loss_weight=1.0)
        fields.update(overrides)
        path = root / f"{name}.yaml"
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
        return str(path)

    assert main(["train", "--config", recipe("causal", decoding={"mode": "verified", "threshold": 0.7})]) == 0
    config = json.loads((root / "causal" / "diffusion_config.json").read_text())
    assert config["clean_attention"] == "causal"
    decoding = json.loads((root / "causal" / "decoding_config.json").read_text())
    assert decoding["mode"] == "verified" and decoding["threshold"] == 0.7
    history = json.loads((root / "causal" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all(entry["ar_loss"] > 0 for entry in history if "loss" in entry)
    # a recipe continuing the saved model (as self-training rounds do) keeps the model's attention
    from llm2diff.recipe import parse_recipe
    from llm2diff.training.arguments import train_dataclasses
    from llm2diff.training.run import continue_from

    model_args, _, train_args, *_ = parse_recipe(["--config", recipe("more", clean_attention="block",
                                                                      ar_loss_weight=0.0)], classes=train_dataclasses())
    dlm = continue_from(root / "causal", model_args, train_args)
    assert dlm.config.causal_clean and train_args.clean_attention == "causal"
    # verified decoding as the saved default needs the causal clean stream: refused before training starts
    assert main(["train", "--config", recipe("bad", clean_attention="block", ar_loss_weight=0.0,
                                             sampler_decoding="verified")]) == 2  # the deprecated key, still read
    assert not (root / "bad" / "checkpoint-4").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_causal_clean_models_ar_stream_judges_its_finished_blocks(arch):
    """Reopening on a causal-clean model reads the pass that appends a block as the AR stream reads it: its
    prediction of each token of the block (after the first) is the causal LM's, from the tokens before it only."""
    dlm = adapt(make_model(arch), make_tokenizer(), block_size=4, clean_attention="causal")
    causal = dlm.model(input_ids=torch.tensor([PROMPT + RESPONSE[:4]])).logits[0, len(PROMPT) : len(PROMPT) + 3]
    for use_cache, fuse in ((True, True), (True, False), (False, False)):
        ctx = BlockContext(dlm.model, torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long),
                           block_size=4, use_cache=use_cache, fuse=fuse, causal_clean=True)
        ctx.judge = True
        ctx.block_logits(torch.full((1, 4), dlm.config.mask_token_id))
        ctx.commit(torch.tensor([RESPONSE[:4]]))
        ctx.block_logits(torch.full((1, 4), dlm.config.mask_token_id))  # the pass that appends the block
        judged = ctx.judged[0]
        assert torch.isnan(judged[0]).all()  # nothing in the block predicts its first token
        assert torch.allclose(judged[1:], causal, atol=1e-4), (use_cache, fuse)


def causal_model_and_greedy(steps: int = 8):
    """A tiny causal-clean model (no end-of-sequence) and its AR stream's greedy choices after PROMPT, with what the
    sampler never writes suppressed."""
    from llm2diff.sampling.rules import suppress_ids

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, clean_attention="causal")
    dlm.model.generation_config.eos_token_id = None
    ids = list(PROMPT)
    for _ in range(steps):
        logits = dlm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        logits = suppress_ids(logits[None], dlm.config.mask_token_id, dlm.config.vocab_size)[0]
        ids.append(int(logits.argmax()))
    return dlm, ids[len(PROMPT):]


def test_reopening_on_a_causal_clean_model_puts_back_what_its_ar_stream_expects():
    """A token planted at the end of a finished block, where the AR stream wants another: reopening (budget 1,
    a threshold any prediction reaches) replaces it by the AR stream's choice; the block's other tokens, the AR
    stream's own greedy choices, stay; the run equals a recompute of every pass."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    dlm, greedy = causal_model_and_greedy()
    planted = greedy[4:8].copy()
    planted[3] = (planted[3] + 1) % dlm.config.mask_token_id
    prompt = torch.tensor([PROMPT])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 1,
                                                     "max_new_tokens": 8, "stop_strings": []})
    outs = [run_block_sampler(dlm, prompt, torch.ones_like(prompt), decoding.replace(use_cache=use_cache),
                              torch.tensor([greedy[:4]]), torch.tensor([planted])) for use_cache in (True, False)]
    for out in outs:
        assert out.reopened == 1
        assert out.sequences[0, len(PROMPT) + 4 : len(PROMPT) + 8].tolist() == greedy[4:8]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    plain = run_block_sampler(dlm, prompt, torch.ones_like(prompt), decoding.replace(reopen_threshold=None),
                              torch.tensor([greedy[:4]]), torch.tensor([planted]))
    assert plain.sequences[0, len(PROMPT) + 7] == planted[3] and plain.reopened == 0


def test_a_causal_judge_fixes_the_first_of_two_wrong_tokens_first_then_judges_again():
    """Two tokens of a finished block planted wrong (positions 1 and 3): with budget 1 reopening replaces the first
    (the AR stream's choice there) and leaves the second, whose judgement was made under the first error; with
    budget 2 it judges again after the first fix and puts back the whole block. Cache = recompute."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    dlm, greedy = causal_model_and_greedy()
    planted = greedy[4:8].copy()
    planted[1] = (planted[1] + 1) % dlm.config.mask_token_id
    planted[3] = (planted[3] + 1) % dlm.config.mask_token_id
    prompt = torch.tensor([PROMPT])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 1,
                                                     "max_new_tokens": 8, "stop_strings": []})
    for budget, expected, reopened in ((1, [greedy[4], greedy[5], planted[2], planted[3]], 1), (2, greedy[4:8], 2)):
        outs = [run_block_sampler(dlm, prompt, torch.ones_like(prompt),
                                  decoding.replace(use_cache=use_cache, reopen_budget=budget),
                                  torch.tensor([greedy[:4]]), torch.tensor([planted])) for use_cache in (True, False)]
        for out in outs:
            block = out.sequences[0, len(PROMPT) + 4 : len(PROMPT) + 8].tolist()
            assert out.reopened == reopened and block[:2] == expected[:2] and block[3] == expected[3], budget
        assert torch.equal(outs[0].sequences, outs[1].sequences)


def test_reopen_last_judges_the_final_block_up_to_where_the_row_stopped():
    """No later block's pass reads the last block: `reopen_last` runs one more pass so that reopening judges it too
    (a token planted there is put back; cache = recompute; one pass more than without, plus one per correction);
    tokens after the row's stop are never revised; reopen_last without reopen_threshold is refused."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    dlm, greedy = causal_model_and_greedy()
    planted = greedy[4:8].copy()
    planted[2] = (planted[2] + 1) % dlm.config.mask_token_id
    prompt = torch.tensor([PROMPT])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 2,
                                                     "max_new_tokens": 4, "stop_strings": []})  # the draft is last

    def run(block=planted, **changes):
        return run_block_sampler(dlm, prompt, torch.ones_like(prompt), decoding.replace(**changes),
                                 torch.tensor([greedy[:4]]), torch.tensor([block]))

    plain = run()  # the planted block is the last one: nothing judges it
    assert plain.reopened == 0 and plain.sequences[0, len(PROMPT) + 6] == planted[2]
    outs = [run(reopen_last=True, use_cache=use_cache) for use_cache in (True, False)]
    for out in outs:
        assert out.reopened >= 1 and out.sequences[0, len(PROMPT) + 4 : len(PROMPT) + 8].tolist()[:3] == greedy[4:7]
        cache = out is outs[0]
        clean = run(greedy[4:8], reopen_last=True, use_cache=cache)  # nothing to correct: judged only
        assert clean.reopened == 0 and int(clean.nfe) > int(run(greedy[4:8], use_cache=cache).nfe)
        assert int(out.nfe) == int(clean.nfe) + out.reopened  # one pass per correction
    assert torch.equal(outs[0].sequences, outs[1].sequences)

    dlm.model.generation_config.eos_token_id = planted[1]  # the row stops at the block's second token
    stopped = run(reopen_last=True)
    assert stopped.reopened == 0 and int(stopped.num_new_tokens[0]) == 2  # stopped at its end-of-sequence, which
    assert stopped.sequences[0, len(PROMPT) + 5] == planted[1]  # (a correction never ends a row) stays
    with pytest.raises(ValueError, match="reopen_last judges the last block .* set reopen_threshold"):
        DecodingConfig(reopen_last=True)


def test_reopen_last_below_judges_only_a_last_block_committed_unsurely():
    """`reopen_last_below` skips the judging pass where every token of the last block was committed with at least
    that probability: a floor no commit is below gives exactly the run without reopen_last (tokens and passes), a
    floor of 1 exactly reopen_last's run; a drafted token counts as unsure, so a planted draft is judged and put
    back under any floor. Without reopen_last it is refused."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    dlm, greedy = causal_model_and_greedy()
    dlm.tokenizer.eos_token = None  # the rows run to max_new_tokens: a last block of 4 tokens to judge
    prompt = torch.tensor([PROMPT])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 2, "threshold": 0.5,
                                                     "max_new_tokens": 8, "stop_strings": []})

    def run(prefix=None, draft=None, **changes):
        return run_block_sampler(dlm, prompt, torch.ones_like(prompt), decoding.replace(**changes),
                                 prefix, draft)

    plain, judged = run(), run(reopen_last=True)
    assert int(plain.num_new_tokens[0]) == 8 and int(judged.nfe) > int(plain.nfe)  # the tiny model's commits are all unsure: the last block is judged
    for below, same_as in ((1e-6, plain), (1.0, judged)):
        gated = run(reopen_last=True, reopen_last_below=below)
        assert torch.equal(gated.sequences, same_as.sequences) and int(gated.nfe) == int(same_as.nfe)
        assert gated.reopened == same_as.reopened

    planted = greedy[4:8].copy()
    planted[2] = (planted[2] + 1) % dlm.config.mask_token_id
    drafted = {"prefix": torch.tensor([greedy[:4]]), "draft": torch.tensor([planted]), "max_new_tokens": 4}
    out = run(**drafted, reopen_last=True, reopen_last_below=1e-6)
    assert out.reopened >= 1 and out.sequences[0, len(PROMPT) + 4 : len(PROMPT) + 7].tolist() == greedy[4:7]
    reference = run(**drafted, reopen_last=True)
    assert torch.equal(out.sequences, reference.sequences) and int(out.nfe) == int(reference.nfe)
    with pytest.raises(ValueError, match="reopen_last_below gates reopen_last's judging pass"):
        DecodingConfig(reopen_threshold=0.9, reopen_last_below=0.9)


def test_redenoising_a_reopened_blocks_tail_denoises_it_as_after_a_prefix():
    """`reopen_tail: redenoise`: the first confident dispute of a finished block is replaced and the block's tokens
    after it are denoised again, under the corrected token: exactly as the sampler denoises a block after a
    response prefix ending there (cache = recompute). Both where a later block's pass judges the block and where
    `reopen_last` judges the last one, whose row had stopped: re-denoising may end it elsewhere, never leaves a
    mask, and a redone block is not judged again beyond its budget."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    dlm, greedy = causal_model_and_greedy()
    planted = greedy[4:8].copy()
    planted[1] = (planted[1] + 1) % dlm.config.mask_token_id
    prompt = torch.tensor([PROMPT])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 1,
                                                     "max_new_tokens": 8, "stop_strings": [],
                                                     "reopen_tail": "redenoise"})

    def run(prefix, draft=None, **changes):
        return run_block_sampler(dlm, prompt, torch.ones_like(prompt), decoding.replace(**changes),
                                 torch.tensor([prefix]), None if draft is None else torch.tensor([draft]))

    corrected = greedy[:4] + greedy[4:6]  # the draft's wrong second token put back: the prefix the tail follows
    for eos, changes in ((None, {}), (planted[2], {"max_new_tokens": 4, "reopen_last": True})):
        dlm.model.generation_config.eos_token_id = eos  # the second case: the drafted last block stops at its third
        for use_cache, fuse in ((True, True), (True, False), (False, False)):
            out = run(greedy[:4], planted, use_cache=use_cache, fuse_commit=fuse, **changes)
            after = run(corrected, reopen_threshold=None, reopen_last=False, reopen_tail="keep", use_cache=use_cache,
                        fuse_commit=fuse, max_new_tokens=(changes.get("max_new_tokens", 8) - 2))
            assert out.reopened == 1 and out.sequences[0, len(PROMPT) + 4 : len(PROMPT) + 6].tolist() == greedy[4:6]
            assert torch.equal(out.sequences, after.sequences), (eos, use_cache)
            assert int(out.num_new_tokens[0]) == int(after.num_new_tokens[0]) + 2
            assert not bool((out.sequences == dlm.config.mask_token_id).any())
        kept = run(greedy[:4], planted, reopen_tail="keep", **changes)  # today's rule: the tail stays as it was
        assert kept.reopened == 1 and kept.sequences[0, len(PROMPT) + 6] == planted[2]
    with pytest.raises(ValueError, match="unknown reopen_tail 'redenoize'.*did you mean 'redenoise'"):
        DecodingConfig(reopen_threshold=0.9, reopen_tail="redenoize")
    with pytest.raises(ValueError, match="reopen_tail: redenoise .* set reopen_threshold"):
        DecodingConfig(reopen_tail="redenoise")


@pytest.mark.parametrize("tail", ["keep", "redenoise"])
def test_reopening_everything_the_ar_stream_disputes_gives_its_greedy_decoding(tail):
    """Reopening with a threshold every prediction reaches, a budget of a whole block and the last block judged:
    every token the causal judge disputes is fixed until the blocks read as the AR stream writes them, so the
    output is the AR stream's greedy decoding, for a batch of two prompts (left-padded), with and without a cache;
    redenoising the tail gets there as today's token-by-token rule does."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    from llm2diff.sampling.rules import suppress_ids

    dlm, greedy = causal_model_and_greedy(steps=12)
    dlm.tokenizer.eos_token = None  # the rows run to max_new_tokens
    other = [9, 8, 7, 6, 5]
    ids = list(other)
    for _ in range(12):
        logits = dlm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(suppress_ids(logits[None], dlm.config.mask_token_id, dlm.config.vocab_size)[0].argmax()))
    expected = [greedy, ids[len(other):]]
    pad = len(PROMPT) - len(other)
    prompts = torch.tensor([PROMPT, [0] * pad + other])
    mask = torch.tensor([[1] * len(PROMPT), [0] * pad + [1] * len(other)])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 3, "threshold": 0.5,
                                                     "reopen_last": True, "reopen_tail": tail,
                                                     "max_new_tokens": 12, "stop_strings": []})
    plain = run_block_sampler(dlm, prompts, mask, decoding.replace(reopen_threshold=None, reopen_last=False,
                                                                   reopen_tail="keep"))
    assert plain.sequences[:, len(PROMPT):].tolist() != expected  # the parallel commits alone differ from it
    outs = [run_block_sampler(dlm, prompts, mask, decoding.replace(use_cache=use_cache)) for use_cache in (True, False)]
    for out in outs:
        assert out.sequences[:, len(PROMPT):].tolist() == expected and out.reopened > 0
    assert torch.equal(outs[0].sequences, outs[1].sequences)


def test_redenoising_in_a_batch_whose_rows_stop_at_different_blocks_equals_each_row_alone():
    """`reopen_tail: redenoise` in a batch of two prompts (left-padded) where one row stops early and leaves the
    batch while the other's blocks are still reopened and redone: each row's output, count and stop are the ones
    it gets alone; cache = recompute; nothing masked."""
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    from llm2diff.sampling.rules import suppress_ids

    dlm, greedy = causal_model_and_greedy(steps=12)
    dlm.tokenizer.eos_token = None
    other = [9, 8, 7, 6, 5]
    ids = list(other)
    for _ in range(12):
        logits = dlm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(suppress_ids(logits[None], dlm.config.mask_token_id, dlm.config.vocab_size)[0].argmax()))
    # a token the first row's AR stream writes in its second block and the second row's never: the first row stops
    dlm.model.generation_config.eos_token_id = next(t for t in greedy[5:8] if t not in greedy[:5] + ids)
    pad = len(PROMPT) - len(other)
    prompts = torch.tensor([PROMPT, [0] * pad + other])
    mask = torch.tensor([[1] * len(PROMPT), [0] * pad + [1] * len(other)])
    decoding = DecodingConfig.resolve(dlm.decoding, {"reopen_threshold": 1e-6, "reopen_budget": 3, "threshold": 0.5,
                                                     "reopen_last": True, "reopen_tail": "redenoise",
                                                     "max_new_tokens": 12, "stop_strings": []})
    outs = [run_block_sampler(dlm, prompts, mask, decoding.replace(use_cache=use_cache)) for use_cache in (True, False)]
    assert torch.equal(outs[0].sequences, outs[1].sequences) and outs[0].reopened > 0
    counts = outs[0].num_new_tokens.tolist()
    assert counts[0] < 12 and counts[0] != counts[1]  # the rows stop in different blocks
    for row, (prompt, length) in enumerate(((PROMPT, len(PROMPT)), (other, len(other)))):
        alone = run_block_sampler(dlm, torch.tensor([prompt]), torch.ones(1, length, dtype=torch.long), decoding)
        assert int(alone.num_new_tokens[0]) == counts[row]
        assert outs[0].sequences[row, len(PROMPT) : len(PROMPT) + counts[row]].tolist() == \
            alone.sequences[0, length : length + counts[row]].tolist()
    assert not bool((outs[0].sequences == dlm.config.mask_token_id).any())
