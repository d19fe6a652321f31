"""Self-verified decoding (`clean_attention: causal`): the output is the adapted model's own greedy causal decoding
token for token, whatever the denoiser proposes; oracle drafts are all kept and cost the passes the block sampler
would make; stops and limits as `generate`; clear errors. Tiny random models with a LoRA nudged off zero."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer
from peft import LoraConfig

from llm2diff import adapt
from llm2diff.sampling import verified
from llm2diff.sampling.lossless import parent_suppressed_ids
from llm2diff.sampling.verified import verified_generate

PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]])
MASK = (PROMPTS != 0).long()


def make_dlm(arch="llama", block_size=4, clean_attention="causal", attn="sdpa"):
    dlm = adapt(make_model(arch, attn), make_tokenizer(), block_size=block_size, clean_attention=clean_attention,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return dlm


def greedy(dlm, prompts, mask, new, **kwargs):
    """The adapted model's own greedy causal decoding (adapter on), as `generate` does it."""
    return dlm.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              suppress_tokens=parent_suppressed_ids(dlm), pad_token_id=dlm.tokenizer.pad_token_id,
                              **kwargs)


def no_eos(dlm):
    dlm.tokenizer.eos_token = None
    dlm.model.generation_config.eos_token_id = None


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_output_is_the_models_own_greedy_decoding(arch, block_size, threshold):
    dlm = make_dlm(arch, block_size)
    no_eos(dlm)
    out = verified_generate(dlm, PROMPTS, MASK, max_new_tokens=13, threshold=threshold)
    assert torch.equal(out.sequences, greedy(dlm, PROMPTS, MASK, 13))
    assert out.num_new_tokens.tolist() == [13, 13]
    assert 0 <= sum(out.accepted_lengths) <= sum(out.drafted_lengths)


def test_random_drafts_are_partly_rejected_and_eager_attention_agrees():
    dlm = make_dlm("qwen3", 4)
    no_eos(dlm)
    out = verified_generate(dlm, PROMPTS[:1], max_new_tokens=16, threshold=0.5)
    assert 0 < out.acceptance_rate < 1  # both the keep and the crop paths ran
    eager = make_dlm("qwen3", 4, attn="eager")
    no_eos(eager)
    assert torch.equal(verified_generate(eager, PROMPTS[:1], max_new_tokens=16, threshold=0.5).sequences,
                       out.sequences)


def _oracle(reference: list[int]):
    """Drafts that are the greedy tokens themselves, with confidence 1: the block whose canvas was last run."""
    run, last = verified._Stream.run, {}

    def recording_run(self, clean, canvas=None, canvas_block=0):
        if canvas is not None:
            last["block"] = canvas_block
        return run(self, clean, canvas, canvas_block)

    def propose(self, canvas_logits):
        start = last["block"] * self.block_size
        tokens = torch.tensor((reference + [0] * self.block_size * 2)[start : start + self.block_size])
        return torch.ones(self.block_size), tokens

    return recording_run, propose


@pytest.mark.parametrize("block_size,new,expected_nfe", [(4, 12, 5), (4, 13, 5), (3, 12, 6), (4, 14, 6)])
def test_right_drafts_are_all_kept_at_the_block_samplers_cost(monkeypatch, block_size, new, expected_nfe):
    """Prefill, one denoising pass for the first block, then one verify pass per block that also denoises the next
    block (all its positions sure), and a last verify pass: the passes of the fused block sampler."""
    dlm = make_dlm("llama", block_size)
    no_eos(dlm)
    reference = greedy(dlm, PROMPTS[:1], MASK[:1], new)[0, PROMPTS.shape[1]:].tolist()
    recording_run, propose = _oracle(reference)
    monkeypatch.setattr(verified._Stream, "run", recording_run)
    monkeypatch.setattr(verified._Stream, "draft_tokens", propose)
    out = verified_generate(dlm, PROMPTS[:1], max_new_tokens=new, threshold=1.0)
    assert out.sequences[0, PROMPTS.shape[1]:].tolist() == reference
    assert out.accepted_lengths == out.drafted_lengths
    assert out.acceptance_rate == 1.0
    assert out.nfe == expected_nfe


def test_stops_as_generate():
    dlm = make_dlm("qwen3", 4)
    no_eos(dlm)
    free = greedy(dlm, PROMPTS[:1], MASK[:1], 13)[0, PROMPTS.shape[1]:].tolist()
    at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(free[at])
    dlm.model.generation_config.eos_token_id = free[at]
    out = verified_generate(dlm, PROMPTS, MASK, max_new_tokens=13, threshold=0.5)
    assert torch.equal(out.sequences, greedy(dlm, PROMPTS, MASK, 13))
    assert int(out.num_new_tokens[0]) == at + 1
    # a stop string (the word-level test tokenizer: the row stops where the decoded new tokens first contain it)
    no_eos(dlm)
    target = dlm.tokenizer.decode(free[4:6])
    stop = next(n for n in range(1, 14) if target in dlm.tokenizer.decode(free[:n]))
    out = verified_generate(dlm, PROMPTS[:1], max_new_tokens=13, threshold=0.5, stop_strings=[target])
    assert out.sequences[0, PROMPTS.shape[1]:].tolist() == free[:stop]


def test_generate_verified_flag_is_this_function():
    dlm = make_dlm("qwen2", 4)
    no_eos(dlm)
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=13, mode="verified", threshold=0.6)
    expected = verified_generate(dlm, PROMPTS, MASK, max_new_tokens=13, threshold=0.6)
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    merged = dlm.generate(PROMPTS, MASK, max_new_tokens=13, mode="verified", threshold=0.6, merge_lora=True)
    assert torch.equal(merged.sequences, expected.sequences)
    with pytest.raises(ValueError, match="unknown decoding mode 'verify'; available: block, verified, lossless"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=13, mode="verify")


def test_errors_say_what_to_do():
    block = make_dlm("qwen2", 4, clean_attention="block")
    with pytest.raises(ValueError, match="needs a model trained with clean_attention: causal"):
        verified_generate(block, PROMPTS, MASK, max_new_tokens=4)
    dlm = make_dlm("qwen2", 4)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        verified_generate(dlm, PROMPTS, MASK, max_new_tokens=4, threshold=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        verified_generate(dlm, PROMPTS, MASK, max_new_tokens=0)


def test_cli_verified_prints_the_models_greedy_answer(tmp_path, capsys):
    from conftest import adapted_with_saved_base

    from llm2diff import load
    from llm2diff.cli import main

    adapted_with_saved_base(tmp_path, "llama", clean_attention="causal",
                            lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
                            ).save_pretrained(tmp_path / "dlm")
    dlm = load(tmp_path / "dlm")
    argv = ["generate", "--model", str(tmp_path / "dlm"), "--prompt", "tom has 5 apples", "--max-new-tokens", "12"]
    assert main(argv + ["--verified", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    text = dlm.tokenizer.apply_chat_template([{"role": "user", "content": "tom has 5 apples"}],
                                             add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([dlm.tokenizer(text, add_special_tokens=False).input_ids])
    expected = verified_generate(dlm, ids, max_new_tokens=12, threshold=0.5)
    assert torch.equal(expected.sequences, greedy(dlm, ids, torch.ones_like(ids), 12))
    answer = dlm.tokenizer.decode(expected.sequences[0, ids.shape[1]:ids.shape[1] + int(expected.num_new_tokens[0])],
                                  skip_special_tokens=True).strip()
    printed = (f"### prompt 0: tom has 5 apples\n{answer}\n\n[{int(expected.num_new_tokens[0])} new tokens in 1 "
               f"rows, verified: {expected.nfe} forward passes, {expected.acceptance_rate:.0%} of denoised tokens "
               "kept, block size 4]\n")
    assert out == printed
    assert main(argv + ["--verified", "--tokens-per-step", "2"]) == 2
    assert "--verified denoises with the threshold rule and verifies every token, so --tokens-per-step does not " \
           "apply: leave it out" in capsys.readouterr().err
    assert main(argv + ["--verified", "--show-steps"]) == 2
    assert "cannot be combined with --lossless, --show-steps" in capsys.readouterr().err
    # streamed: the same answer, printed as each verify pass adds tokens
    assert main(argv + ["--verified", "--threshold", "0.5", "--stream"]) == 0
    assert capsys.readouterr().out.startswith(f"### prompt 0: tom has 5 apples\n{answer}\n\n[")
    # in bfloat16 (--dtype): the bfloat16 model's own greedy decoding
    assert main(argv + ["--verified", "--threshold", "0.5", "--dtype", "bfloat16"]) == 0
    half = load(tmp_path / "dlm", dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    out16 = verified_generate(half, ids, max_new_tokens=12, threshold=0.5)
    text16 = half.tokenizer.decode(out16.sequences[0, ids.shape[1]:ids.shape[1] + int(out16.num_new_tokens[0])],
                                   skip_special_tokens=True).strip()
    assert capsys.readouterr().out.startswith(f"### prompt 0: tom has 5 apples\n{text16}\n\n[")
    # saved as the model's decoding: the same output without the flag; a block-sampler flag needs --mode block
    dlm.decoding = dlm.decoding.replace(mode="verified", threshold=0.5)
    dlm.save_pretrained(tmp_path / "dlm")
    assert main(argv) == 0
    assert capsys.readouterr().out == printed
    assert main(argv + ["--tokens-per-step", "2"]) == 2
    assert "tokens_per_step does not apply to verified decoding (only to block)" in capsys.readouterr().err
    assert main(argv + ["--mode", "block", "--tokens-per-step", "2"]) == 0
    block = dlm.generate(ids, max_new_tokens=12, mode="block", tokens_per_step=2)
    assert f"{block.nfe} forward passes of the batch" in capsys.readouterr().out


def test_graded_like_the_other_samplers():
    """`evaluate_answers` (the benchmark and final evaluation) counts its passes per row, not one per token."""
    from llm2diff.evaluation.exact_match import evaluate_answers
    from llm2diff.training.arguments import DataArguments

    dlm = make_dlm("llama", 4)
    problems = [{"question": "tom has 3 apples", "answer": "#### 7"}, {"question": "ana has 9 pears", "answer": "#### 2"}]
    result = evaluate_answers(dlm, problems, DataArguments(), max_new_tokens=10, batch_size=2, threshold=0.5,
                              mode="verified")
    out = verified_generate(dlm, *_rendered(dlm, problems), max_new_tokens=10, threshold=0.5)
    assert result.nfe == out.nfe and result.row_forwards == int(out.nfe_per_row.sum())
    assert out.nfe_per_row.tolist() != [0, 0]


def _rendered(dlm, problems):
    from llm2diff.evaluation.completions import left_pad
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import render_example

    prompts = [render_example({"question": p["question"], "answer": ""}, dlm.tokenizer, DataArguments())[0]
               for p in problems]
    return left_pad(prompts, dlm.tokenizer.pad_token_id)


def test_chat_replies_with_verified_decoding():
    import io

    from llm2diff.chat import run_chat

    dlm = make_dlm("llama", 4)
    output = io.StringIO()
    assert run_chat(dlm, io.StringIO("tom has 5 apples\n/exit\n"), output, max_new_tokens=8,
                    sampling={"mode": "verified", "threshold": 0.5}) == 0
    text = dlm.tokenizer.apply_chat_template([{"role": "user", "content": "tom has 5 apples"}],
                                             add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([dlm.tokenizer(text, add_special_tokens=False).input_ids])
    out = greedy(dlm, ids, torch.ones_like(ids), 8)
    new = out[0, ids.shape[1]:].tolist()
    eos = dlm.tokenizer.eos_token_id
    reply = dlm.tokenizer.decode(new[: new.index(eos) + 1] if eos in new else new, skip_special_tokens=True).strip()
    assert f"bot> {reply}\n" in output.getvalue()  # streamed as each verify pass adds tokens
    whole = io.StringIO()
    assert run_chat(dlm, io.StringIO("tom has 5 apples\n/exit\n"), whole, max_new_tokens=8,
                    sampling={"mode": "verified", "threshold": 0.5}, stream=False) == 0
    assert whole.getvalue() == output.getvalue()


class Recorder:
    """A streamer (transformers' `BaseStreamer` protocol) that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(torch.as_tensor(value).reshape(-1).tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("stop", [None, "eos", "limit"])
def test_streamer_gets_the_prompt_then_each_verify_pass_tokens(stop):
    dlm = make_dlm("qwen3", 4)
    no_eos(dlm)
    prompt, limit = PROMPTS[:1], 13
    free = greedy(dlm, prompt, MASK[:1], limit)[0, prompt.shape[1]:].tolist()
    if stop == "eos":  # a row that stops inside a verify pass's tokens
        at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
        dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(free[at])
        dlm.model.generation_config.eos_token_id = free[at]
    elif stop == "limit":
        limit = 10
    recorder = Recorder()
    out = verified_generate(dlm, prompt, max_new_tokens=limit, threshold=0.5, streamer=recorder)
    new = out.sequences[0, prompt.shape[1]: prompt.shape[1] + int(out.num_new_tokens[0])].tolist()
    assert recorder.puts[0] == prompt[0].tolist() and recorder.ended == 1
    assert sum(recorder.puts[1:], []) == new
    assert len(recorder.puts) - 1 == 1 + len(out.accepted_lengths)  # the first token, then one put per verify pass
    assert all(recorder.puts[1:])
    with pytest.raises(ValueError, match="a streamer follows one response: give one prompt"):
        verified_generate(dlm, PROMPTS, MASK, max_new_tokens=4, streamer=Recorder())


def test_the_saved_mode_decodes_until_a_call_names_another(tmp_path, monkeypatch):
    from conftest import adapted_with_saved_base

    from llm2diff import load

    dlm = adapted_with_saved_base(tmp_path, "llama", clean_attention="causal",
                                  lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    no_eos(dlm)
    expected = verified_generate(dlm, PROMPTS, MASK, max_new_tokens=11, threshold=0.9)
    assert dlm.generate(PROMPTS, MASK, max_new_tokens=11).mode == "block"  # the library's default mode
    dlm.decoding = dlm.decoding.replace(mode="verified")
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=11)  # no saved threshold: 0.9
    assert out.mode == "verified" and out.decoding.mode == "verified"
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    dlm.decoding = dlm.decoding.replace(threshold=0.5)
    assert dlm.generate(PROMPTS, MASK, max_new_tokens=11).nfe == \
        verified_generate(dlm, PROMPTS, MASK, max_new_tokens=11, threshold=0.5).nfe
    # the mode is never inferred from the settings a call names: a block-sampler setting is refused, not obeyed
    for option in ({"tokens_per_step": 2}, {"temperature": 0.7}, {"commit_rule": "threshold"}, {"seed": 3},
                   {"use_cache": False}, {"record_trajectory": True}):
        with pytest.raises(ValueError, match="does not apply to verified decoding .only to block.*set mode to 'block'"):
            dlm.generate(PROMPTS, MASK, max_new_tokens=11, **option)
        assert dlm.generate(PROMPTS, MASK, max_new_tokens=11, mode="block", **option).mode == "block", option
    assert dlm.generate(PROMPTS, MASK, max_new_tokens=11, tokens_per_step=1).mode == "verified"  # a default: no-op
    with pytest.warns(FutureWarning, match="`verified` is deprecated in DiffusionLM.generate: use mode="):
        assert dlm.generate(PROMPTS, MASK, max_new_tokens=11, verified=False).mode == "block"
    with pytest.warns(FutureWarning, match="`use_saved_defaults` is deprecated"):
        assert dlm.generate(PROMPTS, MASK, max_new_tokens=11, use_saved_defaults=False).mode == "block"
    with monkeypatch.context() as m:  # FlashAttention ignores the 4D masks verified decoding passes
        m.setattr("llm2diff.sampling.verified.uses_flash_attention", lambda model: True)
        with pytest.raises(ValueError, match="passes 4D masks, which FlashAttention ignores"):
            dlm.generate(PROMPTS, MASK, max_new_tokens=11)
    dlm.save_pretrained(tmp_path / "m")
    again = load(tmp_path / "m")
    no_eos(again)
    assert again.decoding == dlm.decoding and (tmp_path / "m" / "decoding_config.json").is_file()
    assert torch.equal(again.generate(PROMPTS, MASK, max_new_tokens=11).sequences,
                       verified_generate(again, PROMPTS, MASK, max_new_tokens=11, threshold=0.5).sequences)


def test_saved_decoding_errors():
    from llm2diff.recipe import RecipeError
    from llm2diff.training.arguments import FinalEvalArguments
    from llm2diff.sampling.config import DecodingConfig

    with pytest.raises(ValueError, match=r"unknown decoding mode 'fast'; available: block, verified, lossless"):
        DecodingConfig(mode="fast")
    block = make_dlm("qwen2", 4, clean_attention="block")
    with pytest.raises(ValueError, match="verified decoding checks every block with the model's causal clean "
                                         "stream.*train with clean_attention: causal"):
        block.generate(PROMPTS, MASK, max_new_tokens=4, mode="verified")
    with pytest.raises(RecipeError, match="unknown sampler_decoding 'verifed'; available: block, verified, "
                                          "lossless. Did you mean 'verified'"):
        FinalEvalArguments(sampler_decoding="verifed")


def test_the_final_evaluation_grades_a_model_as_it_decodes_first():
    from llm2diff.evaluation.exact_match import compare_with_parent
    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.training.arguments import DataArguments

    dlm = make_dlm("llama", 4)
    problems = [{"question": "tom has 3 apples", "answer": "#### 7"}, {"question": "ana has 9 pears", "answer": "#### 2"}]
    dlm.decoding = DecodingConfig(mode="verified", threshold=0.7)
    results = compare_with_parent(dlm, problems, DataArguments(), max_new_tokens=6, batch_size=2)
    assert [r.name for r in results] == ["diffusion (block 4, as saved: verified, threshold 0.7)",
                                         "diffusion (block 4, 1/step)", "AR parent (greedy generate)"]
    verified = verified_generate(dlm, *_rendered(dlm, problems), max_new_tokens=6, threshold=0.7)
    assert results[0].nfe == verified.nfe  # graded by verified decoding itself
    dlm.decoding = DecodingConfig()  # the plain rule: graded once
    assert [r.name for r in compare_with_parent(dlm, problems, DataArguments(), max_new_tokens=6, batch_size=2,
                                                compare_parent=False)] == ["diffusion (block 4, 1/step)"]
