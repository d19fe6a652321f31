"""The token significance table saved beside a model (`SIGNIFICANCE_NAME`, safetensors): `(vocab,)` weights in
[0, 1] for the coarse-to-fine commit rule. Written by `DiffusionLM.save_pretrained`, the trainer's checkpoints and
`llm2diff export`; read by `load`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llm2diff.modeling.config import SIGNIFICANCE_NAME


def save_significance(directory: str | os.PathLike, table: torch.Tensor) -> Path:
    """Write the `(vocab,)` token significance table beside a saved model (safetensors)."""
    from safetensors.torch import save_file

    path = Path(directory) / SIGNIFICANCE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"significance": table.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_significance(directory: str | os.PathLike) -> torch.Tensor | None:
    """The token significance table saved beside a model, or None."""
    path = Path(directory) / SIGNIFICANCE_NAME
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["significance"]
