"""`llm2diff rl` end to end on a tiny LoRA policy: outcome rewards, PRM process rewards, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.cli import main

PROBLEMS = [
    {"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "ana has 9 pears . she eats 2 . how many ?", "answer": "9 - 2 = 7\n#### 7"},
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    base = root / "tiny"
    make_model("qwen2", layers=2).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    fields = dict(model_name_or_path=str(base), dataset_name=str(data), block_size=4, output_dir=str(root / "policy"),
                  max_steps=30, per_device_train_batch_size=2, learning_rate=0.01, lr_scheduler_type="constant",
                  logging_steps=100, save_steps=1000, report_to="none", use_cpu=True, use_lora=True, lora_r=4,
                  t_min=0.3, loss_weighting="mean", seed=0)
    (root / "policy.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    assert main(["train", "--config", str(root / "policy.yaml")]) == 0
    from llm2diff.modeling.loading import load_tokenizer
    from llm2diff.prm.model import build_prm

    # the PRM reads the policy's tokenizer (which holds the mask token the policy added)
    policy_tokenizer = load_tokenizer(root / "policy")
    build_prm(str(base), policy_tokenizer, lora_r=4, step_segmentation="blocks").save_pretrained(root / "prm")
    return root


def _recipe(root, name, **overrides):
    data = str(root / "problems.jsonl")
    fields = dict(rl_policy=str(root / "policy"), rl_task="arithmetic", rl_source=data, rl_eval_split="test",
                  rl_num_problems=2, rl_eval_problems=2, rl_eval_batch_size=2, output_dir=str(root / name),
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=0.01,
                  max_steps=2, bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                  beta=0.04, seed=0)
    fields.update(overrides)
    path = root / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def test_outcome_rewards_train_save_and_grade(root):
    assert main(["rl", "--config", _recipe(root, "outcome")]) == 0
    out = root / "outcome"
    report = json.loads((out / "rl_report.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and report["recipe"]["max_steps"] == 2
    assert report["rewards"] and all("reward" in r for r in report["rewards"])
    from llm2diff import load

    trained = load(out / "model")
    assert trained.has_adapter and trained.config.training["stage"] == "rl"
    assert not (out / "model" / "ref").exists()  # only the policy adapter is saved, not TRL's reference copy
    assert (out / "eval" / "summary.json").is_file()


def test_process_rewards_from_a_prm(root):
    recipe = _recipe(root, "process", rl_prm=str(root / "prm"), process_weight=0.5, diffusion_estimator="coupled",
                     rl_eval_problems=0)
    assert main(["rl", "--config", recipe]) == 0
    assert (root / "process" / "model" / "diffusion_config.json").is_file()


def test_process_reward_spans_cover_each_step():
    from types import SimpleNamespace

    from llm2diff.rl.pipeline import prm_process_reward

    tok = make_tokenizer()
    fingerprint = __import__("llm2diff.prm.model", fromlist=["tokenizer_fingerprint"]).tokenizer_fingerprint(tok)
    calls = []

    def step_scores(prompts, responses, ends):
        calls.append(ends)
        return [[0.5] * len(e) for e in ends]

    prm = SimpleNamespace(config=SimpleNamespace(tokenizer_fingerprint=fingerprint), tokenizer=tok,
                          step_scores=step_scores)
    reward = prm_process_reward(prm, tok, "blocks", 4, (tok.eos_token_id,))
    spans, scores = reward(["tom has"], ["x"], [[5, 6, 7, 8, 9, 10, tok.eos_token_id]])
    assert spans == [[(0, 3), (4, 5)]] and scores == [[0.5, 0.5]] and calls == [[[3, 5]]]


@pytest.mark.parametrize("overrides,message", [
    ({"rl_policy": None}, "rl_policy is required"),
    ({"process_weight": 0.5}, "process_weight > 0 needs rl_prm"),
    ({"rl_task": "arithmatic"}, "unknown rl_task 'arithmatic'"),
])
def test_bad_rl_recipes_fail_clearly(root, capsys, overrides, message):
    assert main(["rl", "--config", _recipe(root, "bad", **overrides)]) == 2
    assert message in capsys.readouterr().err


def test_a_prm_with_another_tokenizer_is_refused(root, capsys):
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    from llm2diff.prm.model import build_prm

    build_prm(str(root / "tiny"), other, lora_r=4).save_pretrained(root / "prm-other")
    recipe = _recipe(root, "mismatch", rl_prm=str(root / "prm-other"), process_weight=0.5)
    assert main(["rl", "--config", recipe]) == 2
    assert "the PRM was trained with a different tokenizer" in capsys.readouterr().err


def test_one_round_of_star_prm_and_rl_runs_end_to_end_and_resumes(root):
    data = str(root / "problems.jsonl")
    fields = dict(model_name_or_path=str(root / "tiny"), dataset_name=data, block_size=4, output_dir=str(root / "rounds"),
                  max_steps=30, per_device_train_batch_size=2, learning_rate=0.01, lr_scheduler_type="constant",
                  logging_steps=100, save_steps=1000, report_to="none", use_cpu=True, use_lora=True, lora_r=4,
                  t_min=0.3, loss_weighting="mean", seed=0,
                  star_task="arithmetic", star_source=data, star_eval_split="test", star_num_problems=2,
                  star_eval_problems=2, star_samples_per_problem=2, star_temperature=1.0, star_max_new_tokens=8,
                  star_batch_size=4, star_train_steps=2, star_mix_sft=2, star_eval_batch_size=2,
                  prm_samples_per_problem=1, prm_num_rollouts=2, prm_steps="blocks", prm_lora_r=4, prm_batch_size=4,
                  rounds=1, rounds_prm_max_steps=2, rounds_prm_batch_size=2, rounds_rl_max_steps=1,
                  rounds_rl_num_generations=2, rounds_rl_batch_size=2, rounds_rl_num_problems=2,
                  rounds_rl_process_weight=0.5)
    path = root / "rounds.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    assert main(["rounds", "--config", str(path)]) == 0
    out = root / "rounds"
    record = json.loads((out / "round-1" / "round.json").read_text())
    assert record["policy"].endswith("round-1/rl/model")
    for stage in ("star/model", "prm/prm", "rl/model"):
        assert (out / "round-1" / stage).is_dir(), stage
    assert record["star_accuracy"] is not None and record["rl_accuracy"] is not None
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1] and report["recipe"]["rounds"] == 1
    # one row per stage, each graded stage paired with round 0 over the same held-out problems
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    stages = report["stages"]
    assert [(s["round"], s["stage"]) for s in stages] == [(0, "round 0"), (1, "STaR"), (1, "PRM"), (1, "RL")]
    base = read_correct(out / "round-0" / "eval")
    assert stages[1]["vs_round_0"] == paired_difference(base, read_correct(out / "round-1" / "star" / "eval")).to_dict()
    assert stages[3]["vs_round_0"] == paired_difference(base, read_correct(out / "round-1" / "rl" / "eval")).to_dict()
    assert stages[2]["vs_round_0"] is None and stages[2]["prm_auroc"] is not None
    assert "| 1 | RL | " in (out / "report.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "round-1" / "round.json").stat().st_mtime_ns
    assert main(["rounds", "--config", str(path)]) == 0  # finished: nothing is redone
    assert (out / "round-1" / "round.json").stat().st_mtime_ns == before


def test_rl_under_accelerate_with_two_processes(root):
    """GRPO on a diffusion policy under a 2-process accelerate launch (DDP over gloo on CPU)."""
    import os
    import subprocess
    import sys

    recipe = _recipe(root, "accel", per_device_train_batch_size=4, num_generations=4, max_steps=2,
                     rl_eval_problems=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--cpu` would start one process; `--multi_gpu` starts torchrun, and use_cpu makes the job gloo over CPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm2diff", "rl", "--config", recipe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "accel" / "rl_report.json").read_text())
    assert report["num_processes"] == 2
    assert report["train"]["train_runtime"] > 0 and len(report["rewards"]) == 2  # one logged step each
    assert 0.0 <= report["accuracy"] <= 1.0
    from llm2diff import load

    trained = load(root / "accel" / "model")
    assert trained.has_adapter and trained.config.training["stage"] == "rl"
