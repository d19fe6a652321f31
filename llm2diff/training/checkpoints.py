"""Which trainer checkpoint a resume starts from: the newest *complete* one, checked file by file.

    checkpoint = newest_complete_checkpoint("outputs/run")   # "outputs/run/checkpoint-40", or None

A kill while the trainer writes `checkpoint-N/` leaves a folder without some of its files (or with a file cut
short). The trainer writes `trainer_state.json` last, after the weights, optimizer, scheduler and RNG states, so
a checkpoint counts as complete when that file parses with `global_step == N`, its weights (adapter or full model)
are whole safetensors files, and its `diffusion_config.json` parses. Incomplete folders are skipped with a
warning naming what is missing; `--resume_from_checkpoint true` and STaR's automatic resume both use this.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from llm2diff.integrity import safetensors_problem
from llm2diff.modeling.config import CONFIG_NAME

logger = logging.getLogger("llm2diff")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes the checkpoint folder `path` unusable for a resume, or None when it is complete."""
    path = Path(path)
    match = CHECKPOINT.match(path.name)
    if not path.is_dir() or match is None:
        return f"{path} is not a checkpoint-N folder"
    state = path / TRAINER_STATE
    try:
        step = json.loads(state.read_text())["global_step"]
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the save was cut short)"
    except (ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is damaged"
    if step != int(match.group(1)):
        return f"{TRAINER_STATE} says step {step}, the folder says {match.group(1)}"
    weights = [path / name for name in WEIGHTS if (path / name).is_file()]
    if not weights:
        return f"no weights ({' or '.join(WEIGHTS[:2])})"
    for file in weights:
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        else:  # a sharded model's index: every shard it names must be whole
            try:
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                return f"{file.name} is damaged"
            problem = next((p for p in (safetensors_problem(path / s) for s in shards) if p), None)
        if problem:
            return problem
    try:
        json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        return f"no {CONFIG_NAME}"
    except ValueError:
        return f"{CONFIG_NAME} is damaged"
    return None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint of `output_dir` (a path), or None; incomplete newer ones are logged."""
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping %s for the resume: %s", path, problem)
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a complete checkpoint was saved at."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["global_step"])
