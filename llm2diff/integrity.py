"""Is a saved file whole? Checks that tell a file cut short (a kill, a full disk, a broken copy) from a good one
before a loader fails on it with a cryptic message.

    problem = safetensors_problem("outputs/run/adapter_model.safetensors")   # None, or why the file is not whole
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file at `path` is not whole (missing, header unreadable, data cut short), or None."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length <= 0 or 8 + length > size:
                return f"{path.name} is cut short ({size} bytes)"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return f"no {path.name}"
    except (OSError, ValueError):
        return f"{path.name} is damaged (its header does not parse)"
    if not isinstance(header, dict):
        return f"{path.name} is damaged (its header is not a table of tensors)"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        return f"{path.name} is damaged (its header does not list tensor offsets)"
    if 8 + length + end > size:
        return f"{path.name} is cut short ({size} bytes, its header describes {8 + length + end})"
    return None


def check_safetensors(directory: str | os.PathLike, names: tuple[str, ...] | list[str]) -> None:
    """Raise a ValueError naming the first of `names` (files in `directory`, absent ones skipped) that is not whole."""
    directory = Path(directory)
    for name in names:
        if (directory / name).is_file():
            problem = safetensors_problem(directory / name)
            if problem:
                raise ValueError(f"{directory / name} cannot be loaded: {problem}. The save was interrupted or the "
                                 "file was damaged in a copy: save (or download) the model again")
