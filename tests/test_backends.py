"""Attention backends, gradient checkpointing and packing: the training forward computes the same thing either way.

- the flex_attention `mask_mod` is `block_diffusion_mask` exactly (full index grid, no compile);
- `auto` picks flex_attention on CUDA, the loaded sdpa/eager elsewhere; switching implementations restores;
- one training step with gradient checkpointing gives the same loss and gradients as without;
- a packed row never attends across examples, and packed logits and losses equal the unpacked ones.
Flex forwards compile (~30 s on CPU, and torch has no flex backward on CPU): `slow` here, the rest is `gpu`.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ARCHITECTURES, make_model, make_tokenizer
from peft import LoraConfig
from torch.nn.attention.flex_attention import create_mask

from llm2diff import adapt
from llm2diff.modeling.attention import (
    CLEAN,
    NOISY,
    PAD,
    PROMPT,
    block_diffusion_mask,
    block_diffusion_mask_mod,
    dense_mask_mod,
    resolve_attn_backend,
)
from llm2diff.noise.masking import NoiseSpec
from llm2diff.training.collator import BlockDiffusionCollator
from llm2diff.training.config import DiffusionSFTConfig
from llm2diff.training.layout import (
    Layout,
    build_layout,
    layout_length,
    pack_rows,
    pad_response_to_blocks,
)
from llm2diff.training.objective import (
    apply_noise,
    attention_implementation,
    attn_implementation,
    diffusion_loss,
    layout_attention_mask,
    layout_logits,
)

EOS = 2


def _random_batch(rng: random.Random, n: int, block_size: int, vocab: int = 60):
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [pad_response_to_blocks([rng.randrange(3, vocab) for _ in range(rng.randint(0, 9))], block_size, EOS)
                 for _ in range(n)]
    return prompts, responses


def _packed(prompts, responses, block_size, capacity, shift=True):
    lengths = [layout_length(len(p), len(r), block_size, shift) for p, r in zip(prompts, responses)]
    return build_layout(prompts, responses, block_size, pad_id=0, shift=shift, rows=pack_rows(lengths, capacity))


def _grid(mask_mod, batch, length):
    return create_mask(mask_mod, batch, 1, length, length, device="cpu")


# --- the flex mask_mod ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_mask_mod_reproduces_block_diffusion_mask_on_random_tensors(seed):
    """Any segment/block tensors at all (not only well-formed layouts), with and without documents."""
    g = torch.Generator().manual_seed(seed)
    batch, length = 3, 19
    segment = torch.randint(0, 4, (batch, length), generator=g)
    block = torch.randint(-1, 4, (batch, length), generator=g)
    document = torch.randint(-1, 3, (batch, length), generator=g)
    for doc in (None, document):
        expected = block_diffusion_mask(segment, block, doc)[:, None]
        got = _grid(block_diffusion_mask_mod(segment, block, doc), batch, length)
        assert got.dtype == torch.bool and torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(6))
def test_mask_mod_reproduces_block_diffusion_mask_on_random_layouts(seed):
    rng = random.Random(seed)
    block_size, shift = rng.choice([1, 2, 3, 4]), rng.choice([True, False])
    prompts, responses = _random_batch(rng, 5, block_size)
    for layout in (build_layout(prompts, responses, block_size, 0, shift),
                   _packed(prompts, responses, block_size, capacity=30, shift=shift)):
        rows, length = layout.segment.shape
        expected = block_diffusion_mask(layout.segment, layout.block, layout.document)[:, None]
        got = _grid(block_diffusion_mask_mod(layout.segment, layout.block, layout.document), rows, length)
        assert torch.equal(got, expected)


def test_dense_mask_mod_reads_the_mask_it_is_given():
    allowed = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(_grid(dense_mask_mod(allowed), 2, 7), allowed[:, None])


def test_layout_mask_follows_the_models_attention_implementation():
    layout = build_layout([[5, 6]], [[7, 8, 9, 2]], 2, pad_id=0)
    additive = layout_attention_mask(layout, "sdpa", torch.float32)
    assert additive.shape == (1, 1, 10, 10) and additive.dtype == torch.float32
    block_mask = layout_attention_mask(layout, "flex_attention", torch.float32)
    assert type(block_mask).__name__ == "BlockMask" and block_mask.shape == (1, 1, 10, 10)
    dense = block_mask.to_dense()  # tiles, not tokens: 10 tokens are one partial 128-tile
    assert dense.shape[-1] == 1 and bool(dense.all())


# --- choosing and switching the backend ----------------------------------------------------------------------------

def test_auto_backend_is_flex_on_cuda_and_the_loaded_one_on_cpu():
    assert resolve_attn_backend("auto", "cpu", "sdpa") == "sdpa"
    assert resolve_attn_backend("auto", "cpu", "eager") == "eager"
    assert resolve_attn_backend("auto", "cpu", "flash_attention_2") == "sdpa"  # flash cannot express the mask
    assert resolve_attn_backend("auto", torch.device("cuda"), "sdpa") == "flex_attention"  # no GPU needed to decide
    assert resolve_attn_backend("eager", "cuda", "sdpa") == "eager"
    assert resolve_attn_backend("flex", "cuda", "sdpa") == "flex_attention"
    with pytest.raises(ValueError, match="'flex' needs a CUDA device"):
        resolve_attn_backend("flex", "cpu", "sdpa")


def test_attn_backend_recipe_key_is_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown attn_backend 'flx'.*Did you mean 'flex'"):
        DiffusionSFTConfig(output_dir=str(tmp_path), attn_backend="flx", use_cpu=True)
    with pytest.raises(ValueError, match="padding_free needs FlashAttention"):
        DiffusionSFTConfig(output_dir=str(tmp_path), padding_free=True, use_cpu=True)
    assert DiffusionSFTConfig(output_dir=str(tmp_path), use_cpu=True).attn_backend == "auto"


def test_switching_attention_implementation_through_peft_restores_it():
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    layout = build_layout([[5, 6, 7]], [[20, 21, 22, 2]], 4, pad_id=0)
    with torch.no_grad():
        sdpa = layout_logits(dlm.model, layout, layout.input_ids, layout.response_valid)
        with attention_implementation(dlm.model, "eager"):
            assert attn_implementation(dlm.model) == "eager"
            eager = layout_logits(dlm.model, layout, layout.input_ids, layout.response_valid)
    assert attn_implementation(dlm.model) == "sdpa"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


# --- gradient checkpointing and packing through the trainer --------------------------------------------------------

def _one_step(tmp_path, gradient_checkpointing: bool, packing: bool):
    """Loss and LoRA parameter change of one SGD step (lr 1: the change is minus the gradient)."""
    from datasets import Dataset

    from llm2diff.training.trainer import DiffusionSFTTrainer

    tok = make_tokenizer()
    dlm = adapt(make_model("qwen2"), tok, block_size=4,
                lora=LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    rows = [{"prompt_ids": [5, 6, 7], "response_ids": [20, 21, 22, 23, 24]},
            {"prompt_ids": [8, 9], "response_ids": [25, 26]},
            {"prompt_ids": [10, 11, 12, 13], "response_ids": [27, 28, 29]},
            {"prompt_ids": [14], "response_ids": [30, 31, 32, 33, 34, 35, 36]}]
    args = DiffusionSFTConfig(
        output_dir=str(tmp_path / f"gc{int(gradient_checkpointing)}-pack{int(packing)}"), block_size=4, max_steps=1,
        per_device_train_batch_size=4, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        gradient_checkpointing=gradient_checkpointing, packing=packing, max_length=48, t_min=0.2,
        disable_tqdm=True,
    )
    trainer = DiffusionSFTTrainer(model=dlm.model, args=args, diffusion_config=dlm.config, processing_class=tok,
                                  train_dataset=Dataset.from_list(rows))
    assert trainer.attn_implementation == "sdpa"  # auto on a CPU
    before = {n: p.detach().clone() for n, p in dlm.model.named_parameters() if p.requires_grad}
    batch = trainer.data_collator(rows)
    result = trainer.train()
    after = dict(dlm.model.named_parameters())
    return result.metrics["train_loss"], {n: after[n].detach() - p for n, p in before.items()}, batch


def test_gradient_checkpointing_and_packing_leave_the_step_unchanged(tmp_path):
    loss, delta, batch = _one_step(tmp_path, gradient_checkpointing=False, packing=False)
    assert batch["input_ids"].shape[0] == 4 and any(d.abs().max() > 0 for d in delta.values())
    for gc, packing in ((True, False), (False, True), (True, True)):
        loss2, delta2, batch2 = _one_step(tmp_path, gc, packing)
        assert loss2 == pytest.approx(loss, rel=1e-5), (gc, packing)
        for name, d in delta.items():
            torch.testing.assert_close(delta2[name], d, atol=1e-6, rtol=1e-4, msg=f"{name} gc={gc} packing={packing}")
        if packing:
            assert batch2["input_ids"].shape[0] < 4 and batch2["input_ids"].shape[1] <= 48


# --- packing -------------------------------------------------------------------------------------------------------

def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([10, 30, 25, 5, 50, 20], capacity=40)
    load = {}
    for length, row in zip([10, 30, 25, 5, 50, 20], rows):
        load[row] = load.get(row, 0) + length
    assert rows[4] != rows[1] and load[rows[4]] == 50  # longer than capacity: a row to itself
    assert all(v <= 40 for r, v in load.items() if r != rows[4])
    assert len(load) == 4  # 50 | 30+10 | 25+5 | 20 ... (first fit, decreasing)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_packed_mask_forbids_every_cross_example_attention(seed, block_size):
    rng = random.Random(seed)
    prompts, responses = _random_batch(rng, 7, block_size)
    unpacked = build_layout(prompts, responses, block_size, pad_id=0)
    packed = _packed(prompts, responses, block_size, capacity=40)
    assert packed.input_ids.shape[0] < len(prompts)
    allowed = block_diffusion_mask(packed.segment, packed.block, packed.document)
    doc = packed.document
    assert not (allowed & (doc[:, :, None] != doc[:, None, :])).any()
    own = block_diffusion_mask(unpacked.segment, unpacked.block)
    for row in range(packed.input_ids.shape[0]):
        examples = (packed.example_row == row).nonzero().flatten().tolist()
        blocks = [set(packed.block[row][doc[row] == d].tolist()) - {-1} for d in range(len(examples))]
        assert sum(map(len, blocks)) == len(set().union(*blocks))  # block ids unique across the row
        for d, e in enumerate(examples):
            span = (doc[row] == d).nonzero().flatten()
            n = len(span)  # the example's own mask, its positions and tokens, shifted into the row
            assert torch.equal(allowed[row][span][:, span], own[e, :n, :n])
            assert torch.equal(packed.position_ids[row, span], unpacked.position_ids[e, :n])
            assert torch.equal(packed.input_ids[row, span], unpacked.input_ids[e, :n])
            assert (unpacked.segment[e, n:] == PAD).all()
    # per-example tensors keep one row per example, in order, pointing at the same tokens
    assert torch.equal(packed.target, unpacked.target) and torch.equal(packed.response_block, unpacked.response_block)
    rows_, cols = packed.response_valid.nonzero(as_tuple=True)
    assert torch.equal(packed.input_ids[packed.rows[rows_], packed.noisy_index[rows_, cols]], packed.target[rows_, cols])
    assert torch.equal(packed.prompt_lengths, torch.tensor([len(p) for p in prompts]))


def test_collator_packs_into_rows_of_max_length():
    features = [{"prompt_ids": [5] * p, "response_ids": [6] * r} for p, r in [(3, 2), (4, 5), (2, 1), (6, 3), (1, 1)]]
    plain = BlockDiffusionCollator(block_size=2, eos_token_id=EOS, pad_token_id=0)(features)
    packed = BlockDiffusionCollator(block_size=2, eos_token_id=EOS, pad_token_id=0, packing=True,
                                    max_length=24)(features)
    assert next(iter(packed)) == "target"  # the Trainer reads the batch size (examples) off the first tensor
    assert plain["input_ids"].shape[0] == 5 and packed["input_ids"].shape[0] < 5
    assert packed["input_ids"].shape[1] <= 24 and torch.equal(packed["target"], plain["target"])
    layout = Layout(**packed)
    assert set(layout.example_row.tolist()) == set(range(packed["input_ids"].shape[0]))


def _noised_pair(block_size, seed, capacity=40):
    rng = random.Random(seed)
    prompts, responses = _random_batch(rng, 6, block_size)
    unpacked = build_layout(prompts, responses, block_size, pad_id=0)
    packed = _packed(prompts, responses, block_size, capacity)
    return unpacked, packed


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("block_size", [1, 4])
def test_packed_logits_equal_each_example_run_alone(arch, block_size):
    dlm = adapt(make_model(arch), make_tokenizer(), block_size=block_size)
    unpacked, packed = _noised_pair(block_size, seed=1)
    spec = NoiseSpec(t_min=0.5, t_max=0.5)
    _, ids_u, noise = apply_noise(unpacked, dlm.config.mask_token_id, spec, torch.Generator().manual_seed(0))
    _, ids_p, noise_p = apply_noise(packed, dlm.config.mask_token_id, spec, torch.Generator().manual_seed(0))
    assert torch.equal(noise.masked, noise_p.masked)
    select = unpacked.response_valid
    with torch.no_grad():
        alone = layout_logits(dlm.model, unpacked, ids_u, select)
        together = layout_logits(dlm.model, packed, ids_p, select)
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)


SPECS = {
    "elbo": NoiseSpec(),
    "mean": NoiseSpec(weighting="mean"),
    "complementary-cart": NoiseSpec(complementary=True, weighting="cart", t_max=0.999),
    "sequence-normalised-stratified": NoiseSpec(normalization="sequence", t_sampling="stratified", unit="sequence"),
    "position": NoiseSpec(position_strength=1.0),
}


@pytest.mark.parametrize("name", SPECS)
def test_packed_loss_equals_unpacked_loss(name):
    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    unpacked, packed = _noised_pair(4, seed=2)
    losses = []
    for layout in (unpacked, packed):
        loss, stats = diffusion_loss(dlm.model, layout, dlm.config.mask_token_id, spec=SPECS[name],
                                     generator=torch.Generator().manual_seed(3))
        losses.append((loss, stats.num_masked))
    (loss_u, masked_u), (loss_p, masked_p) = losses
    assert masked_u == masked_p > 0
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)


def test_packed_ar_twin_loss_equals_unpacked():
    dlm = adapt(make_model("llama"), make_tokenizer(), block_size=1)
    unpacked, packed = _noised_pair(1, seed=4)
    assert not packed.noisy_copy and packed.input_ids.shape[0] < unpacked.input_ids.shape[0]
    loss_u, _ = diffusion_loss(dlm.model, unpacked, dlm.config.mask_token_id)
    loss_p, _ = diffusion_loss(dlm.model, packed, dlm.config.mask_token_id)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)


def test_segments_of_a_packed_row_repeat_per_example():
    packed = _packed([[5, 6], [7]], [[8, 2], [9, 2]], block_size=2, capacity=40)
    assert packed.input_ids.shape == (1, 11)
    assert packed.segment[0].tolist() == [PROMPT] * 2 + [CLEAN] * 2 + [NOISY] * 2 + [PROMPT] + [CLEAN] * 2 + [NOISY] * 2
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 2, 1, 2]
    assert packed.block[0].tolist() == [-1, -1, 0, 0, 0, 0, -1, 1, 1, 1, 1]
    assert packed.document[0].tolist() == [0] * 6 + [1] * 5


# --- flex_attention forwards (compile) -----------------------------------------------------------------------------

def _flex_model(arch: str):
    """Like conftest's tiny models, with head_dim 16 (what GPU flex kernels are sure to take) instead of 8."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[arch](
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False, head_dim=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _flex_vs_sdpa(device: str, dtype: torch.dtype, arch: str, tol: float):
    dlm = adapt(_flex_model(arch).to(device, dtype), make_tokenizer(), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear"))
    unpacked, packed = _noised_pair(4, seed=5)
    spec = NoiseSpec(t_min=0.5, t_max=0.5)
    for layout in (unpacked, packed):
        layout = type(layout)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(layout).items()})
        _, ids, _ = apply_noise(layout, dlm.config.mask_token_id, spec, None)
        with torch.no_grad():
            sdpa = layout_logits(dlm.model, layout, ids, layout.response_valid).float()
            with attention_implementation(dlm.model, "flex_attention"):
                assert attn_implementation(dlm.model) == "flex_attention"
                flex = layout_logits(dlm.model, layout, ids, layout.response_valid).float()
        assert (flex - sdpa).abs().max().item() < tol
    assert attn_implementation(dlm.model) == "sdpa"


@pytest.mark.slow
def test_flex_block_mask_logits_equal_sdpa_on_cpu():
    """Forward only: torch has no flex backward on CPU. The first flex compile takes ~30 s."""
    _flex_vs_sdpa("cpu", torch.float32, "qwen3", tol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flex_block_mask_logits_equal_sdpa_on_cuda_bf16(arch):
    _flex_vs_sdpa("cuda", torch.bfloat16, arch, tol=0.1)  # bf16 rounding only


@pytest.mark.gpu
@cuda
def test_auto_trains_with_flex_on_cuda_with_checkpointing_and_packing(tmp_path):
    from datasets import Dataset

    from llm2diff.training.trainer import DiffusionSFTTrainer

    tok = make_tokenizer()
    losses = {}
    for backend in ("sdpa", "auto"):
        dlm = adapt(_flex_model("qwen3").cuda(), tok, block_size=4,
                    lora=LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
        rows = [{"prompt_ids": [5, 6, 7], "response_ids": [20, 21, 22, 23, 24]},
                {"prompt_ids": [8, 9], "response_ids": [25, 26]}] * 2
        args = DiffusionSFTConfig(
            output_dir=str(tmp_path / backend), block_size=4, max_steps=1, per_device_train_batch_size=4,
            report_to="none", save_strategy="no", seed=0, bf16=False, gradient_checkpointing=True, packing=True,
            max_length=64, attn_backend=backend, disable_tqdm=True,
        )
        trainer = DiffusionSFTTrainer(model=dlm.model, args=args, diffusion_config=dlm.config, processing_class=tok,
                                      train_dataset=Dataset.from_list(rows))
        assert trainer.attn_implementation == ("sdpa" if backend == "sdpa" else "flex_attention")
        losses[backend] = trainer.train().metrics["train_loss"]
        assert attn_implementation(dlm.model) == "sdpa"  # restored for sampling
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=1e-3)
