"""The AR parent a diffusion model was adapted from: loaded from its recorded base when no adapter carries it, and
the ids it never emits.

    parent = load_parent(dlm.config, dtype=torch.bfloat16)       # a model without an adapter (merged, fully tuned)
    suppressed = parent_suppressed_ids(dlm)                       # the mask token and spare embedding rows
"""

from __future__ import annotations

from llm2diff.modeling.lora import embedding_weight, stored_weight


def parent_suppressed_ids(dlm) -> list[int]:
    """Ids the parent never emits here: the mask token and embedding rows beyond the tokenizer (spare rows)."""
    head = dlm.model.get_output_embeddings()
    rows = (stored_weight(head) if head is not None else embedding_weight(dlm.model)).shape[0]
    first_spare = dlm.config.vocab_size if dlm.config.vocab_size is not None else rows
    return sorted({dlm.config.mask_token_id, *range(first_spare, rows)})


def load_parent(config, dtype=None, device=None, trust_remote_code: bool = False):
    """The AR parent of a model without an adapter, loaded from its recorded base (`config.base_model_name_or_path`).

    `config` is a `DiffusionConfig` (e.g. `dlm.config`). Returns the stock causal LM (built-in aliases resolve to
    their local copy; embeddings resized to the saved row count when adapting added the mask token).
    """
    from transformers import AutoModelForCausalLM

    from llm2diff.models.builtin import resolve_model_path

    base = config.base_model_name_or_path
    if not base:
        raise ValueError("this model records no base model (base_model_name_or_path is empty in "
                         "diffusion_config.json), so its AR parent cannot be found: load the parent yourself")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=dtype,
                                                 trust_remote_code=trust_remote_code, use_safetensors=True)
    rows = (config.base_model_source or {}).get("embedding_rows")
    if rows and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)
    if device is not None:
        model.to(device)
    return model.eval()
