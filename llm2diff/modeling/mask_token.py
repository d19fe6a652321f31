"""Choosing the absorbing-noise mask token, without resizing embeddings whenever the checkpoint allows it.

Order: the recipe's `mask_token`; the tokenizer's own mask token; a known special token the family never uses in
chat (e.g. SmolLM2's `<filename>`, Llama 3's first reserved token); a new token placed in a spare embedding row
(Qwen checkpoints have rows beyond the tokenizer); only then a new token with resized embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

NEW_MASK_TOKEN = "<|mask|>"
# Special tokens present in some families' tokenizers but never emitted by their chat templates.
KNOWN_UNUSED_TOKENS = ("<|mask|>", "<filename>", "<|reserved_special_token_0|>")


@dataclass
class MaskTokenChoice:
    token: str
    token_id: int
    how: str  # "recipe", "tokenizer", "unused-special", "spare-row", "resized"
    resized: bool = False


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(token_id)


def choose_mask_token(tokenizer, model, requested: str | None = None) -> MaskTokenChoice:
    """Pick (and if needed add) the mask token. May add a token to `tokenizer` and resize `model`'s embeddings."""
    rows = model.get_input_embeddings().weight.shape[0]
    if requested:
        token_id = _token_id(tokenizer, requested)
        if token_id is not None:
            return MaskTokenChoice(requested, token_id, "recipe")
        return _add_token(tokenizer, model, requested, rows)
    if tokenizer.mask_token is not None:
        return MaskTokenChoice(tokenizer.mask_token, int(tokenizer.mask_token_id), "tokenizer")
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for token in KNOWN_UNUSED_TOKENS:
        token_id = _token_id(tokenizer, token)
        if token in special and token_id is not None and token_id < rows:
            return MaskTokenChoice(token, token_id, "unused-special")
    return _add_token(tokenizer, model, NEW_MASK_TOKEN, rows)


def _add_token(tokenizer, model, token: str, rows: int) -> MaskTokenChoice:
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    if token_id < rows:
        return MaskTokenChoice(token, token_id, "spare-row")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return MaskTokenChoice(token, token_id, "resized", resized=True)
