"""Shared fixtures: tiny random Qwen2 / Qwen3 / Llama models built from configs and a tiny offline tokenizer."""

from __future__ import annotations

import os

import helpers_deprecations
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
helpers_deprecations.install()

ARCHITECTURES = ("qwen2", "qwen3", "llama")
WORDS = ("the a an is was has have had buys gives eats finds loses more now then how many he she it they "
         "tom ana max lea sam apples pears cookies books cards answer question starts with total + - * = #### . ? ,")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_VOCAB = 96  # more embedding rows than tokenizer entries: the mask token goes to a spare row


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_deprecated_calls_from_llm2diff():
    """Fail a test in which llm2diff's own code used something its dependencies deprecate (see helpers_deprecations)."""
    yield
    seen = list(helpers_deprecations.SEEN)  # this test's, or a fixture's it used
    helpers_deprecations.SEEN.clear()
    assert not seen, "llm2diff used deprecated API:\n" + "\n".join(seen)


def pytest_terminal_summary(terminalreporter):
    """Name the library versions the suite ran with (CI runs it on the pinned ones and on the newest allowed)."""
    from importlib.metadata import PackageNotFoundError, version

    def known(name):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} (not installed)"

    names = ("torch", "transformers", "accelerate", "trl", "peft", "datasets", "pytest")
    terminalreporter.write_line("versions: " + ", ".join(known(name) for name in names))


def make_tokenizer():
    """A word-level tokenizer (digits are single tokens) with a ChatML template and <|im_end|> as eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ("<unk>",) + tuple(str(d) for d in range(10)) + tuple(WORDS.split()))}
    vocab["\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    assert len(tok) < MODEL_VOCAB
    return tok


def make_model(arch: str, attn: str = "sdpa", seed: int = 0, vocab_size: int = MODEL_VOCAB, layers: int = 2):
    """A tiny randomly initialised causal LM of the given family."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                  pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    config = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[arch](**common)
    if arch == "qwen3":
        config.head_dim = 8
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    # Random init gives near-uniform logits; widen them so greedy choices are well separated from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def adapted_with_saved_base(root, arch: str = "qwen3", block_size: int = 4, **adapt_kwargs):
    """A LoRA-adapted tiny model whose base is saved under `root / "base"` (as a recipe names it), not yet saved."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from llm2diff import adapt

    make_model(arch).save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    lora = adapt_kwargs.pop("lora", None) or LoraConfig(r=4, target_modules="all-linear")
    return adapt(AutoModelForCausalLM.from_pretrained(root / "base"), make_tokenizer(), block_size=block_size,
                 lora=lora, base_model_name_or_path=str(root / "base"), **adapt_kwargs)


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package), for testing its functions."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
