"""`benchmarks/self_improvement.py`: the commands it runs (variants share the plain run's round 0, the AR twin is the
recipe at block size 1) and its table from finished runs (mean and spread over seeds, paired intervals per seed,
the twin-minus-diffusion gap), on hand-written run directories."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("self_improvement", ROOT / "benchmarks" / "self_improvement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(bench, out: Path, model: str, seed: int, correct_by_round: list[list[bool]]) -> None:
    root = bench.run_dir(out, model, "plain", seed)
    rounds = []
    for r, correct in enumerate(correct_by_round):
        (root / f"round-{r}" / "eval").mkdir(parents=True)
        (root / f"round-{r}" / "eval" / "results.jsonl").write_text(
            "".join(json.dumps({"id": f"test-{i}", "correct": c}) + "\n" for i, c in enumerate(correct)))
        rounds.append({"round": r, "accuracy": sum(correct) / len(correct), "eval_examples": len(correct),
                       "pass_at_k": None if r == 0 else 0.5, "kept": None if r == 0 else 10,
                       "rationalized": None if r == 0 else 4, "wrong_steps": None if r == 0 else 2,
                       "sampling": None if r == 0 else {"tokens_per_second": 20.0, "nfe_per_token": 0.5}})
    (root / "report.json").write_text(json.dumps({"rounds": rounds}))


def test_commands_share_round_zero_and_make_the_twin(bench, tmp_path):
    args = Namespace(out=str(tmp_path), rounds=2, recipe="recipes/star-headroom.yaml", extra=["--star_num_problems", "5"])
    plain = bench.star_command(args, "diffusion", "plain", 1)
    assert "--star_init_model" not in plain and plain[-2:] == ["--star_num_problems", "5"]
    steps = bench.star_command(args, "ar-twin", "steps", 1)
    at = steps.index("--star_init_model")
    assert steps[at + 1] == str(tmp_path / "ar-twin" / "plain" / "seed-1" / "round-0" / "model")
    assert steps[steps.index("--block_size") + 1] == "1" and steps[steps.index("--star_filter") + 1] == "steps"
    assert steps[steps.index("--seed") + 1] == "1"


def test_table_over_seeds_with_paired_intervals_and_the_gap(bench, tmp_path):
    n = 40
    before = [i < 10 for i in range(n)]  # 25%
    after = [i < 30 for i in range(n)]  # 75%: 20 gained, none lost
    fake_run(bench, tmp_path, "diffusion", 0, [before, after])
    fake_run(bench, tmp_path, "diffusion", 1, [before, before])  # no change
    fake_run(bench, tmp_path, "ar-twin", 0, [after, after])
    summary = bench.summarize(tmp_path, ["diffusion", "ar-twin"], ["plain"], [0, 1])
    rows = {(r["model"], r["round"]): r for r in summary["rows"]}
    one = rows[("diffusion", 1)]
    assert one["seeds"] == [0, 1]
    assert one["accuracy"]["mean"] == pytest.approx(0.5) and (one["accuracy"]["low"], one["accuracy"]["high"]) == \
        (0.25, 0.75)
    assert [c["difference"] for c in one["vs_round_0"]] == [0.5, 0.0]
    assert one["vs_round_0"][0]["low"] > 0 and one["vs_round_0"][1]["low"] == 0.0
    assert (one["kept"], one["rationalized"], one["wrong_steps"], one["nfe_per_token"]) == (10, 4, 2, 0.5)
    assert rows[("diffusion", 0)]["vs_round_0"] == []
    assert rows[("ar-twin", 0)]["seeds"] == [0]
    gaps = {(g["seed"], g["round"]): g for g in summary["gaps"]}
    assert set(gaps) == {(0, 0), (0, 1)}  # seed 1 has no twin
    assert gaps[(0, 0)]["difference"] == 0.5 and gaps[(0, 1)]["difference"] == 0.0
    text = bench.table(summary)
    assert "| diffusion | plain | 1 | 50.0% (25.0-75.0, n=40, 2 seeds) | +25.0: [+" in text
    assert "| 1/2 up, 0 down |" in text
    assert "| plain | 0 | seed 0: +50.0 [" in text


def test_a_run_another_process_holds_is_skipped_and_a_failure_stops(bench, tmp_path, monkeypatch):
    args = Namespace(out=str(tmp_path), rounds=1, recipe="r.yaml", extra=[], threads=1)
    message = {"text": ""}

    def fake_run(command, check, stdout, stderr, env):
        stdout.write(message["text"])
        stdout.flush()
        return Namespace(returncode=1)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    message["text"] = "RunDirectoryError: outputs/x is in use by another llm2diff run (pid 7); two runs ...\n"
    assert bench.run(args, "diffusion", "plain", 0) is False
    message["text"] = "ValueError: something else\n"  # the earlier message in the log does not count again
    with pytest.raises(SystemExit, match="failed"):
        bench.run(args, "diffusion", "plain", 0)
