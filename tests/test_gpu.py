"""GPU checks (CUDA, bf16 and sdpa kernels). Marked `gpu`: run with `python -m pytest -m gpu` on a CUDA machine."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.sampling.block_cache import BlockContext
from llm2diff.training.layout import build_layout
from llm2diff.training.objective import layout_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_training_forward_matches_cached_inference_on_cuda(arch):
    dlm = adapt(make_model(arch).to("cuda", torch.bfloat16), make_tokenizer(), block_size=4)
    prompt, response = [5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25, 26, 2]
    layout = build_layout([prompt], [response], 4, pad_id=0)
    layout = type(layout)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(layout).items()})
    noisy = layout.input_ids.clone()
    noisy[0, layout.noisy_index[0, [1, 2, 5, 6]]] = dlm.config.mask_token_id
    train = layout_logits(dlm.model, layout, noisy, layout.response_valid).float()
    ctx = BlockContext(dlm.model, torch.tensor([prompt], device="cuda"), torch.ones(1, 5, dtype=torch.long, device="cuda"),
                       block_size=4)
    noisy_response = noisy[0, layout.noisy_index[0]]
    for b in range(2):
        block = slice(4 * b, 4 * b + 4)
        infer = ctx.block_logits(noisy_response[None, block])[0].float()
        assert (infer - train[block]).abs().max().item() < 0.1  # bf16 rounding only
        ctx.commit(torch.tensor([response[block]], device="cuda"))


def test_bf16_cache_equals_recompute_on_cuda():
    dlm = adapt(make_model("qwen3").to("cuda", torch.bfloat16), make_tokenizer(), block_size=4)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device="cuda")
    a = dlm.generate(ids, max_new_tokens=8, threshold=0.0)
    b = dlm.generate(ids, max_new_tokens=8, threshold=0.0, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _flash_available(), reason="needs flash-attn")
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("clean_attention", ["block", "causal"])
def test_flash_attention_block_steps_match_sdpa(arch, clean_attention):
    """On flash-attn the block passes use no mask (is_causal=False over cache + block; a causal clean block's
    commit is_causal=True): same tokens as sdpa."""
    from llm2diff.sampling.block_cache import uses_flash_attention

    sdpa = adapt(make_model(arch).to("cuda", torch.bfloat16), make_tokenizer(), block_size=4,
                 clean_attention=clean_attention)
    flash = adapt(make_model(arch, attn="flash_attention_2").to("cuda", torch.bfloat16), make_tokenizer(),
                  block_size=4, clean_attention=clean_attention)
    assert uses_flash_attention(flash.model) and not uses_flash_attention(sdpa.model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device="cuda")
    for kwargs in ({"threshold": 0.0}, {"tokens_per_step": 1}):
        a = sdpa.generate(ids, max_new_tokens=12, **kwargs)
        b = flash.generate(ids, max_new_tokens=12, **kwargs)
        assert torch.equal(a.sequences, b.sequences), kwargs


@pytest.mark.parametrize("clean_attention", ["block", "causal"])
def test_static_cache_with_torch_compile_matches_eager_on_cuda(clean_attention):
    dlm = adapt(make_model("qwen3").to("cuda", torch.bfloat16), make_tokenizer(), block_size=4,
                clean_attention=clean_attention)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device="cuda")
    eager = dlm.generate(ids, max_new_tokens=12, threshold=0.5)
    compiled = dlm.generate(ids, max_new_tokens=12, threshold=0.5, static_cache=True, compile=True)
    assert torch.equal(eager.sequences, compiled.sequences)
