"""Lossless (self-speculative) decoding: the output is the AR parent's greedy output token for token, whatever the
draft; acceptance is counted right (oracle drafts, a zeroed adapter); forward passes are accounted; no adapter, no
lossless mode. Tiny random Qwen2 / Qwen3 / Llama models with a LoRA nudged off zero, so that drafts are partly right
and partly wrong and both the accept and the reject paths (cache cropping) run."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, MODEL_VOCAB, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.compat import cache_kwargs
from llm2diff.sampling import lossless
from llm2diff.modeling.parent import parent_suppressed_ids
from llm2diff.sampling.lossless import lossless_generate

PROMPTS = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]])
MASK = (PROMPTS != 0).long()
NEW = 13  # not a multiple of any block size tested


def make_dlm(arch: str = "qwen2", block_size: int = 4, scale: float = 0.02, vocab_size: int = 60, tokenizer=None):
    """A LoRA-adapted tiny model; `scale` moves the LoRA B matrices off zero (0 = the adapter does nothing).

    `vocab_size=60` (the tokenizer's length) makes `adapt` add the mask token by resizing, so the only spare rows
    are the resize's mean-initialised ones, which the parent never picks: `dlm.ar_generate` (which suppresses the
    mask token only) is then exactly the reference. The spare-row case has its own test.
    """
    from peft import LoraConfig

    dlm = adapt(make_model(arch, vocab_size=vocab_size), tokenizer or make_tokenizer(), block_size=block_size,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    return dlm


def set_eos(dlm, token_id: int | None) -> None:
    """Make `token_id` the only end-of-sequence token (None: none), for the parent's generate and for lossless."""
    dlm.tokenizer.eos_token = None if token_id is None else dlm.tokenizer.convert_ids_to_tokens(token_id)
    dlm.model.generation_config.eos_token_id = token_id


def plant_eos(dlm, free: torch.Tensor, row: int = 0) -> int:
    """Make a token the parent emits in `row` (first seen at response position >= 4) the end-of-sequence token.
    Returns its position."""
    new = free[row, PROMPTS.shape[1]:].tolist()
    at = next((i for i in range(4, len(new)) if new[i] not in new[:i]), None)
    assert at is not None, "the parent's output repeats itself; pick another prompt"
    set_eos(dlm, new[at])
    return at


def check_accounting(out) -> None:
    # one parent pass per verification round, one per token the parent decoded alone (parent_tail), and on a CPU
    # (stepwise verification) one per row over its prompt alone
    assert out.prompt_passes == out.sequences.shape[0]
    assert out.nfe_verify == len(out.accepted_lengths) + out.parent_steps + out.prompt_passes
    assert out.nfe == out.nfe_draft + out.nfe_verify
    # a round yields its accepted draft tokens plus the parent's token, unless the row stops inside it
    assert sum(out.accepted_lengths) <= int(out.num_new_tokens.sum()) <= sum(out.accepted_lengths) + out.nfe_verify


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("draft_steps", [1, 2])
def test_output_is_the_parents_greedy_output(arch, block_size, draft_steps):
    dlm = make_dlm(arch, block_size)
    set_eos(dlm, None)
    free = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, draft_steps=draft_steps)
    assert torch.equal(out.sequences, free)
    assert out.num_new_tokens.tolist() == [NEW, NEW]
    check_accounting(out)

    at = plant_eos(dlm, free)
    reference = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, draft_steps=draft_steps)
    assert torch.equal(out.sequences, reference)
    assert out.num_new_tokens[0] == at + 1  # stopped after the planted end-of-sequence, the rest padded
    assert (out.sequences[0, PROMPTS.shape[1] + at + 1:] == dlm.tokenizer.pad_token_id).all()
    check_accounting(out)


def test_drafts_are_partly_accepted_and_partly_rejected():
    """The nudged adapter gives both paths: a test suite where every draft is rejected would not test cropping."""
    accepted = []
    for arch in ARCHITECTURES:
        out = lossless_generate(make_dlm(arch, 4), PROMPTS, MASK, max_new_tokens=NEW)
        accepted += out.accepted_lengths
    assert 0 in accepted and max(accepted) >= 1


def _oracle(reference: torch.Tensor, wrong_at: set[int]):
    """A `BlockDrafter.draft` that proposes the parent's own tokens, except a wrong one at `wrong_at` positions."""
    def draft(self, length):
        start = self.accepted
        tokens = reference[start : start + length].clone()
        for position in wrong_at:
            if start <= position < start + length:
                tokens[position - start] = 5 if tokens[position - start] != 5 else 6
        return tokens
    return draft


@pytest.mark.parametrize("block_size,wrong_at,expected", [
    (4, set(), [4, 3, 3]),          # 5 tokens (4 drafted + bonus), then 4 per round from mid-block
    (8, set(), [8, 4]),             # 9 tokens, then the last 4 (the bonus past max_new_tokens is dropped)
    (4, {2}, [2, 1, 3, 3]),         # reject at 2: the parent's token replaces it, the next draft starts at 3
    (4, {0, 5}, [0, 3, 0, 2, 3]),
])
def test_acceptance_counts_with_oracle_drafts(monkeypatch, block_size, wrong_at, expected):
    dlm = make_dlm("qwen3", block_size)
    set_eos(dlm, None)
    prompt = PROMPTS[:1]
    reference = dlm.ar_generate(prompt, max_new_tokens=NEW)
    monkeypatch.setattr(lossless.BlockDrafter, "draft", _oracle(reference[0, prompt.shape[1]:], wrong_at))
    out = lossless_generate(dlm, prompt, max_new_tokens=NEW)
    assert torch.equal(out.sequences, reference)  # wrong drafts are cropped off the parent's cache
    assert out.accepted_lengths == expected
    assert out.nfe_verify == len(expected) + 1  # and the prompt's own pass (stepwise verification, a CPU)
    assert out.mean_accepted_length == pytest.approx(sum(expected) / len(expected))


@pytest.mark.parametrize("block_size,wrong_at,parent_tail,expected,parent_steps", [
    (4, {2}, 1, [2, 4, 3], 1),          # 3 tokens, the last position alone, then 5 and the last 4 by drafts
    (4, {2}, 2, [2, 4, 3], 1),
    (4, {1}, 2, [1, 4, 3], 2),          # 2 tokens, 2 alone, then 5, then 3 open: drafted (3 > 2)
    (8, {6}, 2, [6, 5], 1),             # 7 tokens, the 8th alone, then the last 5 drafted (max_new_tokens)
    (4, set(), 2, [4, 3, 3], 0),        # every round ends mid-block with 3 open: drafted, never alone
])
def test_parent_decodes_the_tail_of_a_block_alone(monkeypatch, block_size, wrong_at, parent_tail, expected,
                                                   parent_steps):
    dlm = make_dlm("qwen3", block_size)
    set_eos(dlm, None)
    prompt = PROMPTS[:1]
    reference = dlm.ar_generate(prompt, max_new_tokens=NEW)
    monkeypatch.setattr(lossless.BlockDrafter, "draft", _oracle(reference[0, prompt.shape[1]:], wrong_at))
    out = lossless_generate(dlm, prompt, max_new_tokens=NEW, parent_tail=parent_tail)
    assert torch.equal(out.sequences, reference)
    assert out.accepted_lengths == expected
    assert out.parent_steps == parent_steps
    check_accounting(out)


@pytest.mark.parametrize("block_size,parent_tail", [(4, 1), (4, 3), (8, 2)])
def test_parent_tail_keeps_the_parents_greedy_output(block_size, parent_tail):
    dlm = make_dlm("llama", block_size)
    set_eos(dlm, None)
    free = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, parent_tail=parent_tail)
    assert torch.equal(out.sequences, free)
    assert out.parent_steps > 0
    check_accounting(out)
    with pytest.raises(ValueError, match=r"parent_tail must be in \[0, block size\) = \[0, 4\), got 4"):
        lossless_generate(make_dlm("qwen3", 4), PROMPTS, MASK, max_new_tokens=NEW, parent_tail=4)


def test_accepted_tokens_after_a_stop_are_not_counted(monkeypatch):
    """The oracle's draft runs past the end-of-sequence token, and the parent agrees with all of it; only the
    tokens up to the stop are kept, and counted."""
    dlm = make_dlm("qwen3", 8)
    set_eos(dlm, None)
    prompt = PROMPTS[:1]
    free = dlm.ar_generate(prompt, max_new_tokens=NEW)
    at = plant_eos(dlm, free)
    assert at < 7  # inside the first draft
    monkeypatch.setattr(lossless.BlockDrafter, "draft", _oracle(free[0, prompt.shape[1]:], set()))
    out = lossless_generate(dlm, prompt, max_new_tokens=NEW)
    assert torch.equal(out.sequences, dlm.ar_generate(prompt, max_new_tokens=NEW))
    assert out.accepted_lengths == [at + 1]


def test_zeroed_adapter_with_block_size_one_drafts_exactly_the_parent():
    """LoRA B = 0 and blocks of one token: the draft is the parent's own next token, so every draft is accepted and
    each parent pass yields two tokens."""
    dlm = make_dlm("llama", block_size=1, scale=0.0)
    set_eos(dlm, None)
    reference = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW)
    assert torch.equal(out.sequences, reference)
    assert out.num_new_tokens.tolist() == [NEW, NEW]
    assert out.accepted_lengths == [1] * 14  # 7 rounds per row: 6 x (draft + bonus), then one draft token
    assert out.mean_accepted_length == 1.0
    assert out.nfe_verify == 14 + 2  # and each prompt's own pass (stepwise verification, a CPU)


def test_spare_embedding_rows_and_mask_token_never_emitted():
    """With embedding rows beyond the tokenizer (as Qwen checkpoints have), the parent's argmax skips them and the
    mask token, exactly as `generate` with those ids suppressed."""
    dlm = make_dlm("qwen2", 4, vocab_size=MODEL_VOCAB)
    suppressed = parent_suppressed_ids(dlm)
    assert suppressed == [dlm.config.mask_token_id, *range(dlm.config.vocab_size, MODEL_VOCAB)]
    with dlm.ar_parent() as parent:
        kwargs = {"input_ids": PROMPTS, "attention_mask": MASK, "max_new_tokens": NEW, "do_sample": False,
                  "pad_token_id": dlm.tokenizer.pad_token_id}
        unsuppressed = parent.generate(**kwargs)
        reference = parent.generate(suppress_tokens=suppressed, **kwargs)
    assert (unsuppressed[:, PROMPTS.shape[1]:] >= dlm.config.vocab_size).any()  # the case is not vacuous
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW)
    assert torch.equal(out.sequences, reference)


def byte_level_tokenizer():
    """The test vocabulary (newline as byte-level "Ċ") with a byte-level decoder, which transformers' stop-string
    matching needs: it maps every vocabulary entry to bytes, and fails on the plain word-level test tokenizer."""
    from conftest import SPECIALS, WORDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ("<unk>",) + tuple(str(d) for d in range(10)) + tuple(WORDS.split()) + ("Ċ",)
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


def test_stop_strings_as_generate():
    tok = byte_level_tokenizer()
    dlm = make_dlm("qwen3", 4, tokenizer=tok)
    set_eos(dlm, None)
    free = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    # generate pads a row stopped by a stop string only when it has an end-of-sequence token: give it one that
    # the parent does not emit here
    set_eos(dlm, min(set(range(4, len(tok) - 1)) - set(free.flatten().tolist())))
    target = tok.decode(free[0, PROMPTS.shape[1] + 4 : PROMPTS.shape[1] + 6])
    reference = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW, stop_strings=[target], tokenizer=tok)
    assert (reference[0, PROMPTS.shape[1] + 6:] == tok.pad_token_id).all()  # the stop string stopped row 0
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, stop_strings=target)
    assert torch.equal(out.sequences, reference)
    assert out.num_new_tokens[0] <= 6


def test_stop_strings_fall_back_on_decoding_for_other_tokenizers():
    """The word-level test tokenizer defeats transformers' stop-string matcher (and `generate` with it): the row
    then stops at the first token where the decoded new tokens contain the stop string."""
    dlm = make_dlm("qwen3", 4)
    set_eos(dlm, None)
    tok = dlm.tokenizer
    free = dlm.ar_generate(PROMPTS[:1], max_new_tokens=NEW)[0, PROMPTS.shape[1]:]
    target = tok.decode(free[4:6])
    stop = next(n for n in range(1, NEW + 1) if target in tok.decode(free[:n]))
    out = lossless_generate(dlm, PROMPTS[:1], max_new_tokens=NEW, stop_strings=[target])
    assert out.num_new_tokens.tolist() == [stop]
    assert torch.equal(out.sequences[0], free[:stop].new_tensor(PROMPTS[0].tolist() + free[:stop].tolist()))


def test_repetition_penalty_of_the_parent_is_applied():
    dlm = make_dlm("qwen2", 4)
    plain = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    dlm.model.generation_config.repetition_penalty = 3.0
    reference = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    assert not torch.equal(plain, reference)  # the penalty changes the greedy output here
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW)
    assert torch.equal(out.sequences, reference)


def test_generation_options_it_cannot_replay_are_refused():
    dlm = make_dlm("qwen2", 4)
    dlm.model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(ValueError, match="generation_config sets no_repeat_ngram_size"):
        lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=4)


def test_without_adapter_the_parent_is_the_weights_before_training_else_the_recorded_base():
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)  # full fine-tuning, not trained yet
    set_eos(dlm, None)
    with dlm.ar_parent() as parent:
        assert parent is dlm.model
    out = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW)
    assert torch.equal(out.sequences, dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW))
    dlm.weights_are_parent = False  # as after training; this model records no base to load its parent from
    with pytest.raises(RuntimeError, match="its AR parent must be loaded from the recorded base None"):
        lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=4)


def test_train_mode_restored_and_bad_arguments():
    dlm = make_dlm("qwen2", 4)
    dlm.model.train()
    lossless_generate(dlm, PROMPTS[1], MASK[1], max_new_tokens=3)
    assert dlm.model.training
    with pytest.raises(ValueError, match="draft_steps must be >= 1"):
        lossless_generate(dlm, PROMPTS, MASK, draft_steps=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=0)


def test_generate_lossless_flag_is_this_function():
    dlm = make_dlm("qwen3", 4)
    reference = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    out = dlm.generate(PROMPTS, MASK, max_new_tokens=NEW, mode="lossless")
    assert torch.equal(out.sequences, reference)
    assert out.nfe_verify == len(out.accepted_lengths) + out.prompt_passes
    tail = dlm.generate(PROMPTS, MASK, max_new_tokens=NEW, mode="lossless", parent_tail=2)
    expected = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, parent_tail=2)
    assert torch.equal(tail.sequences, reference)
    assert (tail.accepted_lengths, tail.parent_steps) == (expected.accepted_lengths, expected.parent_steps)
    with pytest.raises(ValueError, match=r"parent_tail does not apply to block decoding \(only to lossless\)"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=NEW, parent_tail=2)
    with pytest.raises(ValueError, match=r"parent_tail must be >= 0, got -1"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=NEW, mode="lossless", parent_tail=-1)
    with pytest.raises(ValueError, match=r"parent_tail must be in \[0, block size\) = \[0, 4\), got 4"):
        dlm.generate(PROMPTS, MASK, max_new_tokens=NEW, mode="lossless", parent_tail=4)


# -- self-distillation: training responses from the AR parent itself ---------------------------------------------
QUESTIONS = ["tom has 3 apples . he buys 4 more . how many ?", "ana has 9 pears . she eats 2 .",
             "how many cards ?", "sam finds 5 books"]


def _distill_data(tokenizer):
    from datasets import Dataset

    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import tokenize_dataset

    rows = Dataset.from_list([{"question": q, "answer": "3 + 4 = 7"} for q in QUESTIONS])
    return tokenize_dataset(rows, tokenizer, DataArguments(system_prompt="answer ."))


def test_self_distilled_answers_are_the_parents_greedy_outputs_and_cached(tmp_path, monkeypatch):
    from llm2diff.training.self_distill import self_distill_dataset

    dlm = make_dlm("qwen2", 4)
    eos = dlm.tokenizer.eos_token_id
    data = _distill_data(dlm.tokenizer)
    distilled = self_distill_dataset(dlm, data, max_new_tokens=6, batch_size=3, cache_dir=tmp_path,
                                     show_progress=False)
    assert list(distilled["prompt_ids"]) == list(data["prompt_ids"])
    ended = 0
    for prompt, response in zip(data["prompt_ids"], distilled["response_ids"]):
        new = dlm.ar_generate(torch.tensor([prompt]), max_new_tokens=6)[0, len(prompt):].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert response == new[:stop]  # exactly the parent's greedy decode, up to and including end-of-sequence
        ended += response[-1] == eos
    assert 0 < ended < len(QUESTIONS)  # both cases: answers that end, and answers cut at max_new_tokens
    assert len(list(tmp_path.glob("self_distill/*/responses.npz"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the cached responses should have been reused")

    monkeypatch.setattr(dlm, "ar_generate", no_model)
    again = self_distill_dataset(dlm, data, max_new_tokens=6, batch_size=2, cache_dir=tmp_path, show_progress=False)
    assert list(again["response_ids"]) == list(distilled["response_ids"])
    with pytest.raises(AssertionError, match="should have been reused"):  # other settings, another entry
        self_distill_dataset(dlm, data, max_new_tokens=5, cache_dir=tmp_path, show_progress=False)


def test_self_distill_before_full_fine_tuning_distils_the_weights_themselves(tmp_path):
    from llm2diff.training.self_distill import self_distill_dataset

    full = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    data = _distill_data(full.tokenizer)
    distilled = self_distill_dataset(full, data, max_new_tokens=6, cache_dir=tmp_path, show_progress=False)
    for prompt, response in zip(data["prompt_ids"], distilled["response_ids"]):
        new = full.ar_generate(torch.tensor([prompt]), max_new_tokens=6)[0, len(prompt):].tolist()
        assert response == new[: len(response)] and len(response) >= 1


def test_train_with_self_distill(tmp_path, monkeypatch, capsys):
    """`llm2diff train` with `self_distill: true` distils the training set before training (and caches it)."""
    import json

    from llm2diff.cli import main

    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny"
    make_model("qwen2").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "7"}) + "\n" for q in QUESTIONS))
    recipe = {"model_name_or_path": str(model_dir), "dataset_name": str(data), "block_size": 4, "lora_r": 4,
              "self_distill": True, "self_distill_max_new_tokens": 8, "self_distill_batch_size": 2,
              "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
              "report_to": "none", "use_cpu": True, "save_steps": 1000, "gradient_checkpointing": False,
              "disable_tqdm": True}
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items()))
    assert main(["train", "--config", str(path)]) == 0
    assert "self-distillation: 4 responses from the AR parent" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "self_distill").glob("*/meta.json"))) == 1



@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_drafting_with_the_lora_merged_keeps_the_output_and_the_parent_exact(arch):
    dlm = make_dlm(arch, 4)
    set_eos(dlm, None)
    before = {n: p.detach().clone() for n, p in dlm.model.named_parameters()}
    plain = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW)
    merged = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, merge_lora=True)
    assert torch.equal(merged.sequences, dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW))
    assert torch.equal(merged.sequences, plain.sequences)
    assert merged.accepted_lengths == plain.accepted_lengths  # the same drafts, up to float rounding
    for name, param in dlm.model.named_parameters():
        assert torch.equal(param, before[name]), name


# --- the parent's passes with generate's own attention arithmetic (stepwise attention) ----------------------------

def _bf16_matmul_is_batch_invariant() -> bool:
    """Whether this CPU multiplies a row in bfloat16 the same way alone and among others (AMX CPUs do)."""
    gen = torch.Generator().manual_seed(0)
    for n_in, n_out in [(32, 64), (64, 32), (32, 96)]:
        weight = torch.randn(n_out, n_in, generator=gen).bfloat16()
        x = torch.randn(9, n_in, generator=gen).bfloat16()
        rows = torch.cat([torch.nn.functional.linear(x[i : i + 1], weight) for i in range(9)])
        if not torch.equal(torch.nn.functional.linear(x, weight), rows):
            return False
    return True


needs_batch_invariant_bf16 = pytest.mark.skipif(
    not _bf16_matmul_is_batch_invariant(),
    reason="this CPU's bfloat16 matmuls change with the number of rows: no attention can make a many-token pass "
           "equal generate's one-token steps")


@needs_batch_invariant_bf16
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stepwise_passes_reproduce_generates_logits_bit_for_bit(arch):
    from transformers import DynamicCache

    from llm2diff.modeling.attention import stepwise_attention

    model = make_model(arch).to(torch.bfloat16).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    p = prompt.shape[1]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        reference = torch.cat(out.logits)  # generate's logits: the prefill's last position, then one-token steps
        seq = out.sequences

        def two_passes():  # the prompt with 5 new tokens (a first verify pass), then the other new tokens
            cache = DynamicCache(config=model.config)
            first = model(seq[:, : p + 5], **cache_kwargs(cache)).logits[0, p - 1 :]
            return torch.cat([first, model(seq[:, p + 5 : -1], **cache_kwargs(cache)).logits[0]])

        with stepwise_attention(model, prefill=p):
            stepwise = two_passes()
        assert model.config._attn_implementation == "sdpa"  # restored
        batched = two_passes()
    assert torch.equal(stepwise, reference)
    # the same passes with SDPA over all queries at once agree only up to rounding
    assert torch.allclose(batched.float(), reference.float(), atol=0.05)


@needs_batch_invariant_bf16
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lossless_in_bfloat16_is_generate_bit_for_bit(arch):
    # measured here with the parent's passes batched (stepwise_verify=False): 10 of these 12 rows equal for qwen3,
    # 11 for llama (bfloat16 near-ties flip); stepwise, all of them
    dlm = make_dlm(arch, 4, scale=0.05)
    dlm.model.to(torch.bfloat16)
    set_eos(dlm, None)
    for seed in range(12):
        ids = torch.randint(3, 60, (1, 5 + seed % 4), generator=torch.Generator().manual_seed(seed))
        out = lossless_generate(dlm, ids, max_new_tokens=24)
        assert torch.equal(out.sequences, dlm.ar_generate(ids, torch.ones_like(ids), max_new_tokens=24)), seed


def test_stepwise_verification_can_be_turned_off_and_needs_sdpa():
    from llm2diff.modeling.attention import stepwise_attention, stepwise_sdpa

    dlm = make_dlm("qwen2", 4)
    set_eos(dlm, None)
    free = dlm.ar_generate(PROMPTS, MASK, max_new_tokens=NEW)
    off = lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, stepwise_verify=False)
    assert torch.equal(off.sequences, free)
    assert off.prompt_passes == 0 and off.nfe_verify == len(off.accepted_lengths)  # the prompt rides the 1st pass
    dlm.model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="stepwise_verify needs SDPA attention; this model runs 'eager'"):
        lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW, stepwise_verify=True)
    with pytest.raises(ValueError, match="replaces SDPA; this model runs 'eager'"):
        with stepwise_attention(dlm.model):
            pass
    # by default an eager parent verifies with its own attention: still the parent's output
    assert torch.equal(lossless_generate(dlm, PROMPTS, MASK, max_new_tokens=NEW).sequences, free)
    with pytest.raises(ValueError, match="plain causal passes only"):
        stepwise_sdpa(None, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4),
                      torch.zeros(1, 1, 3, 3))
