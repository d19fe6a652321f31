"""Tiny offline tokenizers for tests (no Hub access, built in well under a second).

Usage (pytest puts ``tests/`` on ``sys.path``)::

    from helpers_tokenizer import make_chat_tokenizer
    tok = make_chat_tokenizer()                    # byte-level BPE + ChatML template, eos <|im_end|>
    tok = make_chat_tokenizer(chat_template=False) # same vocab, no template
    tok = make_chat_tokenizer(add_bos=True)        # prepends <s> like Llama tokenizers
"""

from __future__ import annotations

from functools import lru_cache

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]

_CORPUS = [
    "Question: Tom has 12 apples. He buys 5 more apples. How many apples does Tom have now?",
    "Answer: Tom starts with 12 apples.\n12 + 5 = 17\n#### 17",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "user assistant system the a of to and is in it that for with on as",
    "0123456789 + - * / = #### ? ! . , : ; ' \" ( )",
]


@lru_cache(maxsize=None)
def _backend_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 3, trainer=trainer)
    return tokenizer.to_str()


def make_chat_tokenizer(chat_template: bool = True, add_bos: bool = False):
    """A ``PreTrainedTokenizerFast`` with ChatML specials; eos = pad = ``<|im_end|>``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend_json())
    if add_bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        bos_token="<s>" if add_bos else None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE if chat_template else None
    return tokenizer
