"""ARC grids: as text (one digit per cell), their augmentations (the 8 symmetries of the square x colour
permutations, with exact inverses) and voting / grading of predicted grids. `llm2diff.tasks.arc_agi` builds the
ARC-AGI task on these (and re-exports them).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

Grid = list[list[int]]

SYMMETRIES = ("identity", "rot90", "rot180", "rot270", "flip_horizontal", "flip_vertical", "transpose",
              "anti_transpose")
IDENTITY_COLOURS = tuple(range(10))


# ---------------------------------------------------------------------------------------------- grids as text
def grid_problem(grid) -> str | None:
    """Why `grid` is not a valid ARC grid (non-empty, rectangular, ints 0-9), or None when it is."""
    if not isinstance(grid, list) or not grid:
        return "grid must be a non-empty list of rows"
    width = len(grid[0]) if isinstance(grid[0], list) else -1
    if width < 1:
        return "row 0 must be a non-empty list"
    for i, row in enumerate(grid):
        if not isinstance(row, list) or len(row) != width:
            size = len(row) if isinstance(row, list) else "?"
            return f"row {i} has length {size}, expected {width} (not rectangular)"
        for v in row:
            if type(v) is not int or not 0 <= v <= 9:
                return f"row {i} holds {v!r}; cells must be integers 0-9"
    return None


def grid_to_text(grid: Grid) -> str:
    """One digit per cell, rows joined by newlines, no trailing newline."""
    problem = grid_problem(grid)
    if problem:
        raise ValueError(f"invalid grid: {problem}")
    return "\n".join("".join(map(str, row)) for row in grid)


def text_to_grid(text: str) -> Grid | None:
    """The first grid in `text`: the first run of consecutive all-digit lines (surrounding text and whitespace are
    ignored). None when there is none or its rows differ in length."""
    rows: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and line.isascii() and line.isdigit():
            rows.append(line)
        elif rows:
            break
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        return None
    return [[int(c) for c in r] for r in rows]


def _render(train: list[dict], test_input: Grid) -> str:
    parts = [f"Input:\n{grid_to_text(p['input'])}\nOutput:\n{grid_to_text(p['output'])}\n\n" for p in train]
    return "".join(parts) + f"Input:\n{grid_to_text(test_input)}\nOutput:\n"


def render_task(task: dict, test_index: int = 0) -> str:
    """The training pairs as examples ("Input:\\n<grid>\\nOutput:\\n<grid>\\n\\n"...), then test input
    `test_index` and "Output:\\n"."""
    return _render(task["train"], task["test"][test_index]["input"])


# ---------------------------------------------------------------------------------------------- augmentations
def _transpose(g: Grid) -> Grid:
    return [list(r) for r in zip(*g)]


def _flip_h(g: Grid) -> Grid:  # mirror left-right
    return [r[::-1] for r in g]


def _flip_v(g: Grid) -> Grid:  # mirror top-bottom
    return [list(r) for r in g[::-1]]


_SYMMETRY_FNS = (
    lambda g: [list(r) for r in g],
    lambda g: _flip_v(_transpose(g)),  # rot90 counter-clockwise, as numpy.rot90
    lambda g: _flip_v(_flip_h(g)),
    lambda g: _flip_h(_transpose(g)),
    _flip_h,
    _flip_v,
    _transpose,
    lambda g: _flip_v(_flip_h(_transpose(g))),
)
_SYMMETRY_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def apply_symmetry(grid: Grid, index: int) -> Grid:
    """Element `index` of D4 (see SYMMETRIES) applied to `grid`; returns a new grid."""
    return _SYMMETRY_FNS[index](grid)


@lru_cache(maxsize=None)
def _compose_symmetry(first: int, second: int) -> int:
    probe = [[0, 1, 2], [3, 4, 5]]  # no symmetry: each D4 element gives a distinct image
    want = apply_symmetry(apply_symmetry(probe, first), second)
    return next(k for k in range(8) if apply_symmetry(probe, k) == want)


@dataclass(frozen=True)
class Transform:
    """A D4 symmetry (index into SYMMETRIES) and a colour map (`colours[c]` is the new colour of c; 0 stays 0)."""

    symmetry: int = 0
    colours: tuple[int, ...] = field(default=IDENTITY_COLOURS)

    def __post_init__(self):
        object.__setattr__(self, "colours", tuple(self.colours))
        if self.symmetry not in range(8):
            raise ValueError(f"symmetry must be 0-7 ({', '.join(SYMMETRIES)}), got {self.symmetry!r}")
        if sorted(self.colours) != list(IDENTITY_COLOURS) or self.colours[0] != 0:
            raise ValueError(f"colours must permute 0-9 keeping 0 fixed, got {self.colours!r}")

    def apply(self, grid: Grid) -> Grid:
        return apply_symmetry([[self.colours[v] for v in row] for row in grid], self.symmetry)

    def inverse(self) -> Transform:
        inv = [0] * 10
        for c, new in enumerate(self.colours):
            inv[new] = c
        return Transform(_SYMMETRY_INVERSE[self.symmetry], tuple(inv))

    def invert(self, grid: Grid) -> Grid:
        return self.inverse().apply(grid)

    def then(self, other: Transform) -> Transform:
        """The transform applying `self` first, then `other`."""
        return Transform(_compose_symmetry(self.symmetry, other.symmetry),
                         tuple(other.colours[c] for c in self.colours))

    def __str__(self) -> str:
        perm = "" if self.colours == IDENTITY_COLOURS else "+colours" + "".join(map(str, self.colours[1:]))
        return SYMMETRIES[self.symmetry] + perm


def all_transforms(num_colour_perms: int = 0, seed: int = 0) -> list[Transform]:
    """The 8 symmetries with identity colours (identity first), then the 8 symmetries for each of
    `num_colour_perms` distinct random non-identity permutations of 1..9: 8 * (1 + num_colour_perms) transforms."""
    if num_colour_perms < 0:
        raise ValueError(f"num_colour_perms must be >= 0, got {num_colour_perms}")
    rng, perms = random.Random(seed), [IDENTITY_COLOURS]
    while len(perms) < 1 + num_colour_perms:
        rest = list(range(1, 10))
        rng.shuffle(rest)
        if (perm := (0, *rest)) not in perms:
            perms.append(perm)
    return [Transform(s, p) for p in perms for s in range(8)]


def invert_grid(grid: Grid, transform: Transform) -> Grid:
    return transform.invert(grid)


def augment_task(task: dict, transform: Transform) -> dict:
    """A copy of `task` with `transform` applied to every grid: `train`/`test` pairs (task format) and
    `test_input`/`test_output` (row format); other keys are kept, a missing/None output stays so."""
    def pair(p: dict) -> dict:
        return {**p, **{k: transform.apply(p[k]) for k in ("input", "output") if p.get(k) is not None}}

    out = dict(task)
    for key in ("train", "test"):
        if key in task:
            out[key] = [pair(p) for p in task[key]]
    for key in ("test_input", "test_output"):
        if task.get(key) is not None:
            out[key] = transform.apply(task[key])
    return out


augment_row = augment_task


# ---------------------------------------------------------------------------------------------- voting, grading
def vote(predictions: list[Grid | None]) -> list[Grid]:
    """Distinct grids ranked by how often they were predicted (ties: first appearance first); None is ignored."""
    counts: Counter = Counter()
    first: dict = {}
    for grid in predictions:
        if grid is not None:
            key = tuple(map(tuple, grid))
            counts[key] += 1
            first.setdefault(key, grid)
    return [first[k] for k in sorted(first, key=lambda k: -counts[k])]  # sorted is stable: insertion order on ties


def two_attempts(predictions: list[Grid | None]) -> list[Grid]:
    """The top 2 voted grids (ARC Prize rule: solved if either attempt is exactly right)."""
    return vote(predictions)[:2]


def _same_shape(pred, gold) -> bool:
    return pred is not None and len(pred) == len(gold) and all(len(p) == len(g) for p, g in zip(pred, gold))


def exact_match(pred: Grid | None, gold: Grid) -> bool:
    return _same_shape(pred, gold) and all(list(p) == list(g) for p, g in zip(pred, gold))


def cell_accuracy(pred: Grid | None, gold: Grid) -> float:
    """Fraction of gold cells matched; 0.0 when pred is None or its dimensions differ."""
    if not _same_shape(pred, gold):
        return 0.0
    hits = sum(a == b for p, g in zip(pred, gold) for a, b in zip(p, g))
    return hits / sum(len(g) for g in gold)
