"""Export a LoRA-adapted llm2diff model as a standalone model: the adapter merged into the base weights.

    llm2diff export outputs/quickstart --merge --out outputs/quickstart-merged
    from llm2diff.export import merge_model; merge_model("outputs/quickstart", "outputs/quickstart-merged")

The result is a full model directory (`config.json` + `model.safetensors`, the tokenizer, `diffusion_config.json`,
the significance table and `final_eval.json` when the source has them) that `llm2diff.load` reads without PEFT and
that gives the same logits. PEFT's `merge_and_unload` folds the LoRA deltas into the linear layers and writes the
trained mask-token row into the embedding matrix (and into the LM head when the two are tied).

A merged model carries no free AR parent: `dlm.ar_parent()` (and with it `ar_generate`, lossless decoding, AR-parent
comparisons and the parent-based noise scorers) loads the parent separately from the recorded base
(`llm2diff.modeling.parent.load_parent`), a second copy of the weights. An adapter trained on a quantized base
(QLoRA) is merged into the full-precision base; `diffusion_config.json` records that under
`base_model_source.merged_from`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llm2diff.atomic import atomic_directory

FINAL_EVAL_FILE = "final_eval.json"


def merge_model(source: str | os.PathLike, out: str | os.PathLike, dtype=None, overwrite: bool = False,
                revision: str | None = None) -> Path:
    """Merge the adapter of the saved model at `source` (a directory or a Hub id) and save the full model to `out`.

    Args:
        source: a model saved by llm2diff with a LoRA adapter.
        out: the directory to write; it must not exist unless `overwrite` (then it is replaced whole, atomically).
        dtype: weights dtype to load (and save) the merged model in; None: the base checkpoint's.
        revision: the Hub revision when `source` is a Hub id.
    Returns the output directory.
    """
    from importlib import metadata

    from llm2diff.modeling.config import DiffusionConfig
    from llm2diff.modeling.loading import load, saved_model_directory
    from llm2diff.modeling.significance import save_significance

    out = Path(out).expanduser()
    if Path(source).expanduser().resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source directory: write the merged model somewhere else")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    from llm2diff.rundir import check_writable

    check_writable(out.parent, "--out location")
    local = saved_model_directory(source, revision=revision)
    # a QLoRA adapter is merged into the full-precision base: quantized weights cannot hold the merged deltas
    trained_on = DiffusionConfig.load(local).base_model_source
    dlm = load(local, dtype=dtype, quantize=False)
    if not dlm.has_adapter:
        raise ValueError(f"{source} is already a full model (no LoRA adapter): there is nothing to merge")
    config = dlm.config
    model = dlm.model.merge_and_unload()  # LoRA deltas and the trained token rows, folded into the base weights
    merged_from = {"adapter": str(source), "peft": metadata.version("peft")}
    quantization = (trained_on or {}).get("quantization")
    if quantization:
        merged_from["adapter_trained_on_quantized_base"] = quantization
    config.base_model_source = {**(config.base_model_source or {}), "merged_from": merged_from}
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors
        dlm.tokenizer.save_pretrained(tmp)
        config.save(tmp)
        dlm.decoding.save_pretrained(tmp)
        if dlm.significance is not None:
            save_significance(tmp, dlm.significance)
        if (local / FINAL_EVAL_FILE).is_file():
            shutil.copyfile(local / FINAL_EVAL_FILE, tmp / FINAL_EVAL_FILE)
    return out
