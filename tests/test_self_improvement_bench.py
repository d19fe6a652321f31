"""`benchmarks/self_improvement.py`: the commands it runs (variants share the plain run's round 0, the AR twin is the
recipe at block size 1) and its table from finished runs (mean and spread over seeds, paired intervals per seed,
the twin-minus-diffusion gap), on hand-written run directories."""

from __future__ import annotations

import json
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("self_improvement")


def fake_run(bench, out: Path, model: str, seed: int, correct_by_round: list[list[bool]], variant: str = "plain",
             started: str | None = None) -> None:
    root = bench.run_dir(out, model, variant, seed)
    rounds = []
    for r, correct in enumerate(correct_by_round):
        (root / f"round-{r}" / "eval").mkdir(parents=True)
        lines = [{"id": f"test-{i}", "prompt": "Q?", "correct": c} for i, c in enumerate(correct)]  # the archive
        (root / f"round-{r}" / "eval" / "results.jsonl").write_text(  # drops the prompt
            "".join(json.dumps(line) + "\n" for line in lines))
        rounds.append({"round": r, "accuracy": sum(correct) / len(correct), "eval_examples": len(correct),
                       "pass_at_k": None if r == 0 else 0.5, "kept": None if r == 0 else 10,
                       "rationalized": None if r == 0 else 4, "wrong_steps": None if r == 0 else 2,
                       "sampling": None if r == 0 else {"tokens_per_second": 20.0, "nfe_per_token": 0.5}})
    (root / "report.json").write_text(json.dumps({"rounds": rounds, **({"started": started} if started else {})}))


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
    assert "| diffusion | plain | 1 | 50.0% (25.0-75.0, n=40, 2 seeds) | +25.0: seed 0: [+" in text
    groups = {f"test-{i}": "2 steps" if i < 20 else "3 steps" for i in range(n)}  # 10 and 0 right before, 20/10 after
    grouped = bench.summarize(tmp_path, ["diffusion"], ["plain"], [0, 1], groups=groups)["rows"]
    assert grouped[1]["by_difficulty"] == {"2 steps": pytest.approx((1.0 + 0.5) / 2), "3 steps": pytest.approx(0.25)}
    assert "| 2 steps 75% · 3 steps 25% |" in bench.table({"rows": grouped, "gaps": []})
    assert "| 1/2 up, 0 down |" in text
    assert "| plain | 0 | seed 0: +50.0 [" in text


def test_each_variant_against_plain_and_the_variant_it_varies_paired_per_seed(bench, tmp_path):
    n = 40
    base, better, best = ([i < k for i in range(n)] for k in (10, 20, 30))
    for seed in (0, 1):
        fake_run(bench, tmp_path, "diffusion", seed, [base, base, base])
        fake_run(bench, tmp_path, "diffusion", seed, [base, better, better], variant="steps-balanced")
    fake_run(bench, tmp_path, "diffusion", 0, [base, best], variant="steps-balanced-hot")  # seed 0, round 1 only
    fake_run(bench, tmp_path, "diffusion", 0, [base, better], variant="balanced-hot")  # no step filter
    under_way = bench.run_dir(tmp_path, "diffusion", "steps-balanced-hot", 1) / "round-1" / "eval"
    under_way.mkdir(parents=True)  # seed 1 is grading round 1: its first results are no comparison yet
    (under_way / "results.jsonl").write_text(json.dumps({"id": "test-0", "correct": False}) + "\n")
    versus = bench.summarize(tmp_path, ["diffusion"], ["plain", "steps-balanced", "steps-balanced-hot",
                                                       "balanced-hot"], [0, 1])["versus"]
    got = {(v["variant"], v["against"], v["round"]): [(d["seed"], d["difference"]) for d in v["per_seed"]]
           for v in versus}
    assert got == {("steps-balanced", "plain", 1): [(0, 0.25), (1, 0.25)],
                   ("steps-balanced", "plain", 2): [(0, 0.25), (1, 0.25)],
                   ("steps-balanced-hot", "plain", 1): [(0, 0.5)],
                   ("steps-balanced-hot", "steps-balanced", 1): [(0, 0.25)],
                   ("steps-balanced-hot", "balanced-hot", 1): [(0, 0.25)],  # what the step filter adds
                   ("balanced-hot", "plain", 1): [(0, 0.25)]}
    text = bench.table({"rows": [], "gaps": [], "versus": versus})
    assert "| diffusion | steps-balanced-hot | steps-balanced | 1 | +25.0: seed 0: +25.0 [+" in text
    assert "| diffusion | steps-balanced | plain | 2 | +25.0: seed 0: +25.0 [" in text and "| 2/2 up, 0 down |" in text
    assert "other round-0" not in text and all(d["same_start"] for v in versus for d in v["per_seed"])
    # balanced-hot's seed 0 begun again from another round-0 model (another machine): the cell says so
    import shutil

    shutil.rmtree(bench.run_dir(tmp_path, "diffusion", "balanced-hot", 0))
    fake_run(bench, tmp_path, "diffusion", 0, [better, better], variant="balanced-hot")
    versus = bench.summarize(tmp_path, ["diffusion"], ["steps-balanced-hot", "balanced-hot"], [0])["versus"]
    (cell,) = [v["per_seed"][0] for v in versus if (v["variant"], v["against"]) == ("steps-balanced-hot",
                                                                                   "balanced-hot")]
    assert (cell["difference"], cell["same_start"], cell["round_0"]) == (0.25, False, [0.5, 0.25])
    assert ("| diffusion | steps-balanced-hot | balanced-hot | 1 | +25.0: seed 0: +25.0 ["
            in bench.table({"rows": [], "gaps": [], "versus": versus}))
    assert "] (other round-0 models: 50.0% and 25.0%) |" in bench.table({"rows": [], "gaps": [], "versus": versus})


def test_a_run_another_process_holds_is_skipped_and_a_failure_stops(bench, tmp_path, monkeypatch):
    args = Namespace(out=str(tmp_path), rounds=1, recipe="r.yaml", extra=[], threads=1)
    message = {"text": ""}

    def fake_run(command, check, stdout, stderr, env, cwd=None):
        stdout.write(message["text"])
        stdout.flush()
        return Namespace(returncode=1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    message["text"] = "RunDirectoryError: outputs/x is in use by another llm2diff run (pid 7); two runs ...\n"
    assert bench.run(args, "diffusion", "plain", 0) is False
    message["text"] = "ValueError: something else\n"  # the earlier message in the log does not count again
    with pytest.raises(SystemExit, match="failed"):
        bench.run(args, "diffusion", "plain", 0)


def test_the_prm_variant_and_the_stages_after_star_start_from_the_shipped_star_variant(bench, tmp_path):
    args = Namespace(out=str(tmp_path), rounds=3, recipe=str(ROOT / "recipes" / "star-headroom.yaml"), extra=[],
                     prm_recipe="p.yaml", rl_recipe="r.yaml", selection_k=4, threads=1, after_from="steps-balanced-hot")
    plain = tmp_path / "diffusion" / "plain" / "seed-2"
    shipped = tmp_path / "diffusion" / "steps-balanced-hot" / "seed-2"
    prm = bench.prm_command(args, "diffusion", 2)
    assert prm[3:6] == ["prm", "--config", "p.yaml"]
    assert prm[prm.index("--prm_policy") + 1] == str(plain / "round-0" / "model")
    assert prm[prm.index("--output_dir") + 1] == str(tmp_path / "diffusion" / "reward-model" / "seed-2")
    star = bench.star_command(args, "diffusion", "prm", 2)
    assert star[star.index("--star_filter") + 1] == "prm"
    assert star[star.index("--star_prm") + 1] == str(tmp_path / "diffusion" / "reward-model" / "seed-2" / "prm")
    outcome = bench.after_command(args, "diffusion", "rl-outcome", 2)
    process = bench.after_command(args, "diffusion", "rl-process", 2)
    for command in (outcome, process):
        assert command[3:6] == ["rl", "--config", "r.yaml"]
        assert command[command.index("--rl_policy") + 1] == str(shipped / "round-3" / "model")
    assert outcome[outcome.index("--process_weight") + 1] == "0.0" and "--process_weight" not in process
    assert outcome[outcome.index("--output_dir") + 1] == str(
        tmp_path / "diffusion" / "rl-outcome-after-steps-balanced-hot" / "seed-2")  # one folder per starting run
    args.after_from = "plain"
    outcome = bench.after_command(args, "diffusion", "rl-outcome", 2)
    assert outcome[outcome.index("--rl_policy") + 1] == str(plain / "round-3" / "model")
    assert outcome[outcome.index("--output_dir") + 1] == str(tmp_path / "diffusion" / "rl-outcome-after-plain" / "seed-2")
    args.after_from = "steps-balanced-hot"
    selection = bench.after_command(args, "diffusion", "selection", 2)
    assert selection[1].endswith("prm_selection.py")
    assert selection[selection.index("--model") + 1] == str(shipped / "round-3" / "model")
    assert selection[selection.index("--problems") + 1] == "300" and selection[selection.index("--k") + 1] == "4"
    assert "--step-search" in selection
    assert json.loads(selection[selection.index("--task-options") + 1])["max_steps"] == 3  # the held-out kind
    args.extra = ["--star_eval_problems", "50"]  # the STaR runs' overrides hold for the selection stage too
    assert bench._recipe_fields(args.recipe, args.extra)["star_eval_problems"] == 50
    assert set(bench.difficulty_groups(bench._recipe_fields(args.recipe, args.extra)).values()) == {"2 steps", "3 steps"}
    selection = bench.after_command(args, "diffusion", "selection", 2)
    assert selection[selection.index("--problems") + 1] == "50"


def test_the_table_after_star_pairs_rl_with_its_star_model(bench, tmp_path):
    n = 40
    fake_run(bench, tmp_path, "diffusion", 0, [[i < 10 for i in range(n)], [i < 20 for i in range(n)]],
             variant="steps-balanced-hot")
    fake_run(bench, tmp_path, "diffusion", 0, [[i < 10 for i in range(n)], [i < 5 for i in range(n)]])  # plain
    rl = bench.after_dir(tmp_path, "diffusion", "rl-process", 0)
    (rl / "eval").mkdir(parents=True)
    (rl / "eval" / "results.jsonl").write_text(
        "".join(json.dumps({"id": f"test-{i}", "correct": i < 30}) + "\n" for i in range(n)))
    (rl / "rl_report.json").write_text(json.dumps({"accuracy": 0.75, "train_seconds": 600.0, "rewards": [
        {"reward": 0.5, "frac_reward_zero_std": 0.5}, {"reward": 0.7, "frac_reward_zero_std": 0.75}]}))
    reward = tmp_path / "diffusion" / "reward-model" / "seed-0"
    reward.mkdir(parents=True)
    (reward / "prm_report.json").write_text(json.dumps({"eval_steps": 90, "rollout_auroc": 0.81, "exact_auroc": 0.7,
                                                        "rollout_vs_exact": {"agreement": 0.85}}))
    selection = bench.after_dir(tmp_path, "diffusion", "selection", 0)
    selection.mkdir(parents=True)
    (selection / "selection.json").write_text(json.dumps({
        "k": 4, "problems": n, "accuracy": {"single": 0.5, "majority": 0.6, "prm-min": 0.65, "prm-last": 0.55,
                                            "oracle": 0.8},
        "passes_per_problem": {"single": 10.0}, "vs_single": {
            "majority": {"difference": 0.1, "low": 0.0, "high": 0.2},
            "prm-min": {"difference": 0.15, "low": 0.05, "high": 0.25}}}))
    summary = bench.summarize(tmp_path, ["diffusion"], ["plain"], [0], last_round=1)
    (row,) = [r for r in summary["after"] if r["stage"] == "rl-process"]
    # paired with the run it starts from (steps-balanced-hot's round 1: 20 right), not the plain run's (5 right)
    assert row["from"] == "steps-balanced-hot" and row["from_round"] == 1
    assert row["vs_star"]["difference"] == 0.25 and row["vs_round_0"]["difference"] == 0.5
    assert summary["reward_models"][0]["rollout_auroc"] == 0.81
    text = bench.table(summary)
    assert "| diffusion | 0 | 0.81 | 0.70 | 90 | 85% |" in text
    assert row["no_signal"] == 0.625  # the mean share of groups whose completions all got one reward
    assert "| diffusion | steps-balanced-hot, 1 | rl-process | 0 | 75.0% | +25.0 [+" in text and "| 62% | 10 |" in text
    assert "| diffusion | 0 | 4 | 50.0% | 60.0% | 65.0% | 55.0% | 80.0% | prm-min: +15.0 [+5.0, +25.0] " \
           "| +10.0 [+0.0, +20.0] |" in text


def test_variants_start_from_round_zero_while_another_process_runs_the_plain_rounds(bench, tmp_path, monkeypatch):
    calls = []

    def fake_run(args, model, variant, seed):
        calls.append((variant, seed))
        # the plain runs are held by another process, and so is seed 0's steps-balanced-hot run
        return variant != "plain" and (variant, seed) != ("steps-balanced-hot", 0)

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "run_after", lambda args, model, stage, seed: calls.append((stage, seed)))
    for seed in (0, 2):  # seeds 0 and 2 have their round 0, seed 1 not yet
        (bench.star_model(tmp_path, "diffusion", seed, 0)).mkdir(parents=True)
        (bench.star_model(tmp_path, "diffusion", seed, 0) / "adapter_config.json").write_text("{}")
    argv = ["self_improvement.py", "--out", str(tmp_path), "--seeds", "0,1,2", "--models", "diffusion", "--variants",
            "steps", "--after", "rl-outcome", "--archive", ""]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    # the variants run from round 0; the stage after STaR waits for the run it starts from (steps-balanced-hot, which
    # --after adds): seed 0's is held elsewhere, seed 2's has finished; seed 1: nothing starts without a round 0
    assert calls == [("plain", 0), ("steps", 0), ("steps-balanced-hot", 0), ("plain", 1),
                     ("plain", 2), ("steps", 2), ("steps-balanced-hot", 2), ("rl-outcome", 2)]
    calls.clear()
    monkeypatch.setattr("sys.argv", [*argv, "--seeds", "2", "--after-from", "plain"])
    bench.main()
    assert calls == [("plain", 2), ("steps", 2)]  # from the plain run, which another process holds


def test_plain_rounds_zero_trains_only_the_round_zero_the_variants_start_from(bench, tmp_path, monkeypatch):
    args = Namespace(out=str(tmp_path), rounds=3, plain_rounds=0, recipe="r.yaml", extra=[], threads=1)
    assert bench.star_command(args, "diffusion", "plain", 1)[bench.star_command(args, "diffusion", "plain", 1)
                                                             .index("--star_rounds") + 1] == "0"
    steps = bench.star_command(args, "diffusion", "steps-balanced", 1)
    assert steps[steps.index("--star_rounds") + 1] == "3"
    report = bench.run_dir(tmp_path, "diffusion", "plain", 1) / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"rounds": [{"round": 0}, {"round": 1}]}))  # rounds 2-3 are left for later
    assert bench.run(args, "diffusion", "plain", 1) is True  # round 0 is there: nothing to run now
    started = []
    monkeypatch.setattr(bench, "run_logged", lambda name, command, directory, threads: started.append(command) or True)
    args.plain_rounds = None
    assert bench.run(args, "diffusion", "plain", 1) is True  # without the option the plain run continues
    assert started and started[0][started[0].index("--star_rounds") + 1] == "3"


def test_the_hot_variant_samples_at_temperature_1_3_over_the_recipes_commit_rule(bench, tmp_path):
    from llm2diff.recipe import parse_recipe
    from llm2diff.star.config import star_dataclasses

    args = Namespace(out=str(tmp_path), rounds=3, plain_rounds=None, recipe=str(ROOT / "recipes" / "star-headroom.yaml"),
                     extra=[], threads=1)
    command = bench.star_command(args, "diffusion", "steps-balanced-hot", 2)
    *_, star, recipe = parse_recipe(command[command.index("--config"):], classes=star_dataclasses())
    assert star.star_decoding == {"temperature": 1.3, "threshold": 0.9}
    assert (star.star_filter, star.star_balance) == ("steps", "pass_rate")
    assert command[command.index("--star_init_model") + 1].endswith("plain/seed-2/round-0/model")


def test_the_archive_keeps_graded_rounds_and_the_table_reads_it_beside_the_outputs(bench, tmp_path, monkeypatch):
    import shutil

    n = 40
    out, archive = tmp_path / "out", tmp_path / "archive"
    base, better = [i < 10 for i in range(n)], [i < 20 for i in range(n)]
    fake_run(bench, out, "diffusion", 0, [base, better])
    run = bench.run_dir(out, "diffusion", "plain", 0)
    (run / "round-2" / "eval").mkdir(parents=True)  # round 2 being graded: not a record yet
    (run / "round-2" / "eval" / "results.jsonl").write_text(json.dumps({"id": "test-0", "correct": True}) + "\n")
    (run / "round-1" / "model").mkdir()
    (run / "round-1" / "model" / "adapter_model.safetensors").write_bytes(b"weights")  # models are not records
    assert bench.archive(out, archive) == [Path("diffusion/plain/seed-0")]
    kept = bench.run_dir(archive, "diffusion", "plain", 0)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "report.json", "round-0/eval/results.jsonl", "round-1/eval/results.jsonl"]
    graded = [json.loads(line) for line in (kept / "round-1" / "eval" / "results.jsonl").read_text().splitlines()]
    assert graded == [{"id": f"test-{i}", "correct": c} for i, c in enumerate(better)]
    # another machine begins the run again: its round 0 does not replace the archived run of two rounds, and the
    # table reads the archived one
    shutil.rmtree(out)
    fake_run(bench, out, "diffusion", 0, [better])
    assert bench.archive(out, archive) == []
    rows = {r["round"]: r for r in bench.summarize([out, archive], ["diffusion"], ["plain"], [0])["rows"]}
    assert rows[0]["accuracy"]["mean"] == 0.25 and rows[1]["vs_round_0"][0]["difference"] == 0.25
    # once the new run is further along, it replaces the archived copy whole
    shutil.rmtree(out)
    fake_run(bench, out, "diffusion", 0, [better, base, base], started="2026-12-07T20:00:00+0000")
    assert bench.archive(out, archive) == [Path("diffusion/plain/seed-0")]
    rows = {r["round"]: r for r in bench.summarize([out, archive], ["diffusion"], ["plain"], [0])["rows"]}
    assert rows[0]["accuracy"]["mean"] == 0.5 and rows[1]["vs_round_0"][0]["difference"] == -0.25
    # a third machine's run of the same seed, as far along: it does not replace the measured one; the same run
    # (its start time) refreshing its records does
    shutil.rmtree(out)
    fake_run(bench, out, "diffusion", 0, [base, base, base], started="2026-12-08T09:00:00+0000")
    assert bench.archive(out, archive) == []
    assert json.loads((kept / "report.json").read_text())["started"] == "2026-12-07T20:00:00+0000"
    shutil.rmtree(out)
    fake_run(bench, out, "diffusion", 0, [better, base, better], started="2026-12-07T20:00:00+0000")
    assert bench.archive(out, archive) == [Path("diffusion/plain/seed-0")]
    assert json.loads((kept / "report.json").read_text())["rounds"][2]["accuracy"] == 0.5
    # main archives into the folder of the recipe's setting; other overrides are another folder
    argv = ["self_improvement.py", "--out", str(out), "--seeds", "0", "--models", "diffusion", "--variants", "plain",
            "--table-only", "--archive", str(tmp_path / "results")]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    monkeypatch.setattr("sys.argv", [*argv, "--", "--star_num_problems", "5"])
    bench.main()
    folders = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(folders) == 2 and all(f.startswith("star-headroom-") for f in folders)
    for folder in folders:
        assert (tmp_path / "results" / folder / "diffusion" / "plain" / "seed-0" / "report.json").is_file()
