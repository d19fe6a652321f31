"""Recording how the block sampler denoised a response: which token appeared at which step.

The sampler fills a `Trajectory` as it goes, one `record` per denoising step; afterwards it can be inspected or saved,
and shown by `llm2diff.sampling.trajectory_render` (terminal, .html, .gif, .png):

    trajectory = Trajectory(block_size=B, mask_token_id=mask_id, prompt_width=W)     # before the block loop
    trajectory.record(block=k, canvas=canvas, confidence=conf, committed=commit, remasked=remask)  # every step

    trajectory.history(row=0)                          # per generated position: token, step, confidence, remasks
    trajectory.save_json("out/trajectory.json")        # every row; Trajectory.load_json reads it back

Steps are numbered from 0 over the whole run and shared by all rows of the batch (a row that has nothing left to
do in a step just rides along). Block k covers response positions [k*B, (k+1)*B); the "generated positions" of a
row are those committed in some recorded step, so tokens of a given response prefix are not among them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2diff.atomic import write_json_atomic

FORMAT = "llm2diff.trajectory"
FORMAT_VERSION = 1


@dataclass
class TrajectoryStep:
    """One denoising step of one block, for every row of the batch (nested lists `(rows, B)`).

    canvas: the block's tokens after the step (the mask id where still masked).
    confidence: the probability of the proposed token at each position, rounded to 4 decimals (None if not finite).
    committed: positions newly committed this step.
    remasked: positions committed before and retracted this step; None when nothing was.
    """

    block: int
    canvas: list[list[int]]
    confidence: list[list[float | None]]
    committed: list[list[bool]]
    remasked: list[list[bool]] | None = None


@dataclass
class Trajectory:
    """Every denoising step of one `generate` call. `num_rows` is taken from the first `record`."""

    block_size: int
    mask_token_id: int
    prompt_width: int = 0
    num_rows: int | None = None
    steps: list[TrajectoryStep] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def record(self, block: int, canvas: torch.Tensor, confidence: torch.Tensor, committed: torch.Tensor,
               remasked: torch.Tensor | None = None) -> None:
        """Append one step: `(batch, B)` tensors on any device (copied to the CPU as lists)."""
        tensors = {"canvas": canvas, "confidence": confidence, "committed": committed}
        if remasked is not None:
            tensors["remasked"] = remasked
        tensors = {name: torch.as_tensor(t).detach().cpu() for name, t in tensors.items()}
        if self.num_rows is None:
            if tensors["canvas"].dim() != 2:
                raise ValueError(f"Trajectory.record: canvas has shape {tuple(tensors['canvas'].shape)}, "
                                 f"expected (rows, block_size)")
            self.num_rows = tensors["canvas"].shape[0]
        for name, t in tensors.items():
            if tuple(t.shape) != (self.num_rows, self.block_size):
                raise ValueError(f"Trajectory.record: {name} has shape {tuple(t.shape)}, expected "
                                 f"(rows, block_size) = ({self.num_rows}, {self.block_size})")
        retracted = tensors.get("remasked")
        self.steps.append(TrajectoryStep(
            block=int(block),
            canvas=tensors["canvas"].long().tolist(),
            confidence=[[_round(c) for c in row] for row in tensors["confidence"].double().tolist()],
            committed=tensors["committed"].bool().tolist(),
            remasked=retracted.bool().tolist() if retracted is not None and bool(retracted.any()) else None,
        ))

    def history(self, row: int = 0) -> list[dict]:
        """Per generated position of `row`, in response order: a dict with `position` (in the response), `token`
        (the final one), `step` (global index of the step that last committed it), `confidence` (at that commit)
        and `remasks` (how many times it was retracted)."""
        self._check_row(row)
        entries: dict[int, dict] = {}
        for index, step in enumerate(self.steps):
            for i in range(self.block_size):
                position = step.block * self.block_size + i
                entry = entries.get(position)
                if entry is not None and step.remasked is not None and step.remasked[row][i]:
                    entry.update(step=None, confidence=None, remasks=entry["remasks"] + 1)
                if step.committed[row][i]:
                    entry = entries.setdefault(position, {"position": position, "remasks": 0})
                    entry.update(step=index, confidence=step.confidence[row][i])
                if entry is not None:
                    entry["token"] = step.canvas[row][i]
        return [{key: entries[p][key] for key in ("position", "token", "step", "confidence", "remasks")}
                for p in sorted(entries)]

    def _check_row(self, row: int) -> None:
        if self.num_rows is not None and not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} is out of range: the trajectory has {self.num_rows} rows")

    # -- saving ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "block_size": self.block_size,
                "mask_token_id": self.mask_token_id, "prompt_width": self.prompt_width, "num_rows": self.num_rows,
                "steps": [vars(step) for step in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} version {FORMAT_VERSION} record (format={data.get('format')!r}, "
                             f"version={data.get('version')!r})")
        return cls(block_size=data["block_size"], mask_token_id=data["mask_token_id"],
                   prompt_width=data["prompt_width"], num_rows=data["num_rows"],
                   steps=[TrajectoryStep(**step) for step in data["steps"]])

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the whole trajectory (all rows) as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> Trajectory:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _round(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
