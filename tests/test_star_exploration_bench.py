"""`benchmarks/star_exploration.py`: its counts over sampled rationales (exact values), and a tiny model's run at
two temperatures (greedy sampling gives one distinct rationale per problem)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark, make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.tasks.base import get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("star_exploration")


def test_counts_per_difficulty_with_sound_rationales(bench):
    task = get_task("arithmetic", max_operand=10, operations="+-", min_steps=1, max_steps=2, num_problems=50)
    rows = task.load_rows(None, "train", 50)
    one = next(r for r in rows if task.difficulty(r) == "1 steps")
    two = next(r for r in rows if task.difficulty(r) == "2 steps")
    right_one, right_two = task.target(one), task.target(two)
    lucky = f"0 + 0 = 0\n#### {task.final_answer(two)}"  # the right answer after a wrong step
    records = [
        {"id": "a", "samples": [{"text": right_one, "correct": True}, {"text": right_one, "correct": True}]},
        {"id": "b", "samples": [{"text": lucky, "correct": True}, {"text": "#### 999", "correct": False}]},
        {"id": "c", "samples": [{"text": right_two, "correct": True}, {"text": lucky, "correct": True}]},
    ]
    got = bench.exploration(records, {"a": one, "b": two, "c": two}, task, k=2)
    assert list(got) == ["all", "1 steps", "2 steps"]
    assert got["all"] == {"problems": 3, "distinct_per_problem": 5 / 3, "pass_at_k": 1.0, "right_share": 5 / 6,
                          "sound_problems": 2, "sound": 3, "k": 2}
    assert got["2 steps"]["sound_problems"] == 1 and got["2 steps"]["sound"] == 1
    assert got["1 steps"]["distinct_per_problem"] == 1.0
    text = bench.table([{"temperature": 1.3, "groups": got, "passes_per_token": 0.5, "seconds": 12.0}])
    assert "| 1.3 | all | 3 | 1.67 of 2 | 100% | 83.3% | 2 | 3 | 0.50 | 12 |" in text


def test_a_tiny_model_at_two_temperatures(bench, tmp_path, monkeypatch):
    model = tmp_path / "model"
    adapt(make_model("qwen2", layers=2), make_tokenizer(), block_size=4).save_pretrained(model)
    recipe = tmp_path / "star.yaml"
    recipe.write_text("model_name_or_path: unused\ndataset_name: builtin:arithmetic\nblock_size: 4\n"
                      "star_task: arithmetic\nstar_num_problems: 6\nstar_samples_per_problem: 3\n"
                      "star_max_new_tokens: 8\nstar_batch_size: 6\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["star_exploration.py", "--model", str(model), "--recipe", str(recipe),
                                      "--temperatures", "0,1.5", "--out", str(out)])
    bench.main()
    rows = json.loads((out / "exploration.json").read_text())["rows"]
    assert [r["temperature"] for r in rows] == [0.0, 1.5]
    greedy = rows[0]["groups"]["all"]
    assert greedy["problems"] == 6 and greedy["k"] == 3
    assert greedy["distinct_per_problem"] == 1.0  # greedy: the k samples of a problem are one rationale
    assert rows[0]["decoding"]["temperature"] == 0.0 and rows[1]["decoding"]["temperature"] == 1.5
    assert sum(1 for _ in (out / "samples-t1.5.jsonl").open()) == 6
    assert "| 1.5 | all | 6 |" in (out / "exploration.md").read_text()
