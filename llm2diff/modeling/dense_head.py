"""A CPU speed hook: the LM head gets its input with the strides of a freshly made tensor (`dense_head_inputs`).

`DiffusionLM` applies it to its model and to an AR parent it loads separately. The values, and so the logits, are
unchanged.
"""

from __future__ import annotations


def _restride_head_input(module, args):
    x = args[0]
    if x.dim() != 3 or x.stride() == (x.shape[1] * x.shape[2], x.shape[2], 1):
        return None
    return (x.reshape(-1, x.shape[-1]).view(x.shape),) + tuple(args[1:])


def dense_head_inputs(model):
    """Give the LM head its input with the strides of a freshly made tensor; returns `model`.

    `logits_to_keep` slices the last positions off the hidden states, a view whose batch stride still spans the
    whole sequence. On a CPU `linear` over such a view takes a slow path for the 49k-row head of SmolLM2 (one
    thread): one row of 9 positions in bfloat16 160 ms instead of 6 (the view counts as contiguous; re-striding it
    is free), 8 rows 2 s instead of 17 ms in bfloat16 and 380 ms instead of 72 in float32 (a copy, small next to
    the product). Fresh strides leave the values, and so the logits, unchanged.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_llm2diff_dense_input", False):
        head.register_forward_pre_hook(_restride_head_input)
        head._llm2diff_dense_input = True
    return model
