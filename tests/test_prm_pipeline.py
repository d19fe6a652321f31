"""`llm2diff prm` end to end on a tiny policy: sampled solutions, rollout step labels, a trained PRM, a report."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.cli import main

PROBLEMS = [
    {"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "tom has 3 .\n3 + 4 = 7\n#### 7"},
    {"question": "ana has 9 pears . she eats 2 . how many ?", "answer": "ana has 9 .\n9 - 2 = 7\n#### 7"},
    {"question": "sam has 5 books . he finds 3 more . how many ?", "answer": "sam has 5 .\n5 + 3 = 8\n#### 8"},
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm")
    model_dir = root / "tiny"
    make_model("qwen2", layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    fields = dict(model_name_or_path=str(model_dir), dataset_name=str(data), block_size=4,
                  output_dir=str(root / "policy"), max_steps=60, per_device_train_batch_size=3, learning_rate=0.01,
                  lr_scheduler_type="constant", logging_steps=100, save_steps=1000, report_to="none", use_cpu=True,
                  use_lora=False, t_min=0.3, loss_weighting="mean", seed=0)
    recipe = root / "policy.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    assert main(["train", "--config", str(recipe)]) == 0
    return root


def _recipe(root, name, **overrides):
    data = str(root / "problems.jsonl")
    fields = dict(prm_policy=str(root / "policy"), prm_task="arithmetic", prm_source=data, prm_eval_split="test",
                  prm_num_problems=3, prm_eval_problems=3, prm_samples_per_problem=2, prm_num_rollouts=2,
                  prm_max_new_tokens=12, prm_batch_size=6, prm_steps="blocks", prm_lora_r=4,
                  output_dir=str(root / name), max_steps=5, per_device_train_batch_size=2, learning_rate=0.01,
                  report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    fields.update(overrides)
    path = root / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def test_prm_command_labels_trains_and_reports(policy, capsys):
    recipe = _recipe(policy, "run")
    assert main(["prm", "--config", recipe]) == 0
    out = policy / "run"
    labels = [json.loads(line) for line in (out / "labels-train.jsonl").read_text().splitlines()]
    assert len(labels) == 6  # 3 problems x 2 solutions
    for record in labels:
        ends = record["step_ends"]
        assert ends == sorted(ends) and ends[-1] < len(record["response_ids"])
        assert len(record["soft_labels"]) == len(record["hard_labels"]) == len(ends)
        assert all(s in (0.0, 0.5, 1.0) for s in record["soft_labels"])
        assert record["hard_labels"] == [int(s > 0) for s in record["soft_labels"]]
    report = json.loads((out / "prm_report.json").read_text())
    assert report["eval_steps"] == sum(len(json.loads(line)["step_ends"])
                                       for line in (out / "labels-eval.jsonl").read_text().splitlines())
    assert "rollout_accuracy" in report and report["train"]["global_step"] == 5
    from llm2diff.prm.model import load_prm

    prm = load_prm(out / "prm")
    assert prm.config.label_type == "soft" and prm.config.step_segmentation == "blocks"
    # a second run reuses every finished stage: labels are not recomputed
    before = (out / "labels-train.jsonl").stat().st_mtime_ns
    assert main(["prm", "--config", recipe]) == 0
    assert (out / "labels-train.jsonl").stat().st_mtime_ns == before


def test_labelling_resumed_after_an_interruption_labels_as_an_uninterrupted_run(policy):
    import shutil

    assert main(["prm", "--config", _recipe(policy, "whole", prm_rollout_temperature=1.0)]) == 0
    whole = (policy / "whole" / "labels-train.jsonl").read_text()
    out = policy / "resumed"
    shutil.copytree(policy / "whole", out, ignore=shutil.ignore_patterns("prm", "prm_report.json", "labels-eval*"))
    lines = whole.splitlines()
    (out / "labels-train.jsonl").write_text(lines[0] + "\n" + lines[1][:40])  # killed while writing record 2
    assert main(["prm", "--config", _recipe(policy, "resumed", prm_rollout_temperature=1.0)]) == 0
    assert (out / "labels-train.jsonl").read_text() == whole
    report = json.loads((out / "prm_report.json").read_text())
    assert report["train"]["global_step"] == 5


@pytest.mark.parametrize("overrides,message", [
    ({"prm_policy": None}, "prm_policy is required"),
    ({"prm_policy": "./nowhere"}, "is not a directory written by llm2diff train"),
    ({"prm_steps": "sentences"}, "prm_steps must be one of lines, blocks"),
    ({"prm_num_rollouts": 0}, "prm_num_rollouts must be >= 1"),
])
def test_bad_prm_recipes_fail_clearly(policy, capsys, overrides, message):
    assert main(["prm", "--config", _recipe(policy, "bad", **overrides)]) == 2
    assert message in capsys.readouterr().err
