"""`benchmarks/parallel_parity.py`: the training command of every row (the latent rows decode the self-cond model and
train nothing, the AR twin is the recipe at block size 1), reuse and resume of runs, `--combined` and `--rows`
parsing, the table from hand-written evaluations (means, paired intervals against the baseline, the gap to the
twin, step time), and one evaluation on a tiny random model. No real training."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_benchmark, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart-fast.yaml")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("parallel_parity")


def make_args(bench, out: Path, **changes) -> Namespace:
    values = {"out": str(out), "recipe": RECIPE, "combined": bench.DEFAULT_COMBINED, "extra": [], "threads": 1,
              "problems": 40, "parent_problems": 10, "threshold": None, "max_new_tokens": 48}
    return Namespace(**{**values, **changes})


def test_every_row_trains_the_recipe_with_its_overrides_only(bench, tmp_path):
    args = make_args(bench, tmp_path)
    head = [sys.executable, "-m", "llm2diff", "train", "--config", RECIPE]

    def expected(row, *overrides):
        return head + ["--output_dir", str(tmp_path / row / "seed-2"), "--seed", "2", "--final_eval_samples", "0",
                       *overrides]

    assert bench.train_command(args, "baseline", 2) == expected("baseline")
    assert bench.train_command(args, "self-cond", 2) == expected("self-cond", "--self_conditioning",
                                                                 "expected_embedding")
    assert bench.train_command(args, "self-cond-hidden", 2) == expected("self-cond-hidden", "--self_conditioning",
                                                                        "hidden")
    assert bench.train_command(args, "curriculum", 2) == expected("curriculum", "--block_size_schedule",
                                                                  "2:0.25,4:0.5")
    assert bench.train_command(args, "semantic", 2) == expected("semantic", "--noise_order", "semantic",
                                                                "--semantic_scorer", "surprisal")
    assert bench.train_command(args, "combined", 2) == expected(
        "combined", "--self_conditioning", "expected_embedding", "--block_size_schedule", "2:0.25,4:0.5")
    assert bench.train_command(args, "ar-twin", 2) == expected("ar-twin", "--block_size", "1")
    assert bench.train_command(args, "causal-ar", 2) == expected("causal-ar", "--clean_attention", "causal",
                                                                 "--ar_loss_weight", "1.0")
    # reopening judged by the causal-ar model's own AR stream: a decoding of that model, no training of its own
    assert bench.train_command(args, "causal-ar-reopen", 2) == bench.train_command(args, "causal-ar", 2)
    assert bench.eval_layer(args, "causal-ar-reopen") == {"reopen_threshold": 0.9, "reopen_budget": 2}
    assert bench.eval_layer(args, "causal-ar-reopen-last") == {"reopen_threshold": 0.9, "reopen_budget": 2,
                                                               "reopen_last": True}
    assert bench.eval_layer(args, "causal-ar-reopen-unsure") == {**bench.eval_layer(args, "causal-ar-reopen-last"),
                                                                 "reopen_last_below": 0.9}
    assert bench.eval_layer(args, "causal-ar-redenoise") == {**bench.eval_layer(args, "causal-ar-reopen"),
                                                             "reopen_tail": "redenoise"}
    assert bench.eval_layer(args, "causal-ar-redenoise-last") == {**bench.eval_layer(args, "causal-ar-redenoise"),
                                                                  "reopen_last": True}
    assert bench.eval_layer(args, "causal-ar-redenoise-unsure") == {
        **bench.eval_layer(args, "causal-ar-redenoise-last"), "reopen_last_below": 0.9}
    assert bench.eval_layer(args, "causal-ar-redenoise-unsure-merged") == {
        **bench.eval_layer(args, "causal-ar-redenoise-unsure"), "merge_lora": True}
    assert bench.model_row("causal-ar-redenoise-unsure-merged") == "causal-ar"
    assert bench.train_command(args, "causal-ar3", 2) == expected("causal-ar3", "--clean_attention", "causal",
                                                                  "--ar_loss_weight", "3.0")
    assert bench.train_command(args, "causal-ar3-reopen", 2) == bench.train_command(args, "causal-ar3", 2)
    assert bench.eval_layer(args, "causal-ar3-reopen") == bench.eval_layer(args, "causal-ar-reopen")
    # the latent rows are the self-cond model decoded with latent steps: its training, no training of their own
    for row, steps in (("latent-1", 1), ("latent-2", 2)):
        assert bench.model_row(row) == "self-cond"
        assert bench.train_command(args, row, 2) == bench.train_command(args, "self-cond", 2)
        assert bench.eval_layer(args, row) == {"latent_steps": steps}
    assert bench.eval_layer(args, "baseline") == {}  # the saved decoding (threshold 0.7 with correction)
    args.threshold = 0.9
    assert bench.eval_layer(args, "latent-2") == {"latent_steps": 2, "threshold": 0.9}
    assert bench.eval_layer(args, "ar-twin") == {}  # the twin keeps its own decoding (one token per pass)
    args.combined, args.extra = "self_conditioning=hidden,t_max=0.999", ["--max_steps", "20"]
    assert bench.train_command(args, "combined", 0)[-6:] == ["--self_conditioning", "hidden", "--t_max", "0.999",
                                                             "--max_steps", "20"]
    assert bench.train_command(args, "baseline", 0, resume=True)[-4:] == ["--resume_from_checkpoint", "true",
                                                                         "--max_steps", "20"]
    assert bench.recipe_fields(args)["max_steps"] == 20 and bench.recipe_fields(args)["block_size"] == 8


def test_combined_parsing_keeps_commas_inside_values_and_refuses_malformed_entries(bench):
    assert bench.parse_combined(bench.DEFAULT_COMBINED) == {"self_conditioning": "expected_embedding",
                                                            "block_size_schedule": "2:0.25,4:0.5"}
    assert bench.parse_combined("block_size_schedule=2:0.25,4:0.5,noise_order=semantic") == {
        "block_size_schedule": "2:0.25,4:0.5", "noise_order": "semantic"}
    for bad in ("self_conditioning", "self_conditioning=expected_embedding,hidden", "=hidden", "a b=1",
                "noise_order=", "x=1,,y=2"):
        with pytest.raises(SystemExit, match="is not key=value"):
            bench.parse_combined(bad)
    with pytest.raises(SystemExit, match="sets noise_order twice"):
        bench.parse_combined("noise_order=semantic,noise_order=random")
    with pytest.raises(SystemExit, match="cannot set seed"):
        bench.parse_combined("seed=3")


def test_unknown_rows_are_refused_with_the_valid_ones(bench, tmp_path, monkeypatch):
    assert bench.parse_rows("baseline, latent-2,ar-twin") == ["baseline", "latent-2", "ar-twin"]
    with pytest.raises(SystemExit) as error:
        bench.parse_rows("baseline,latent-3")
    assert str(error.value) == ("unknown rows ['latent-3']: the rows are baseline, self-cond, self-cond-hidden, "
                                "latent-1, latent-2, curriculum, semantic, combined, causal-ar, causal-ar-reopen, "
                                "causal-ar-reopen-last, causal-ar-reopen-unsure, causal-ar-redenoise, "
                                "causal-ar-redenoise-last, causal-ar-redenoise-unsure, causal-ar-redenoise-unsure-merged, "
                                "causal-ar3, causal-ar3-reopen, "
                                "ar-twin")
    monkeypatch.setattr("sys.argv", ["parallel_parity.py", "--out", str(tmp_path), "--rows", "twin"])
    with pytest.raises(SystemExit, match="unknown rows"):
        bench.main()
    assert not any(tmp_path.iterdir())  # refused before anything ran


def write_checkpoint(directory: Path, step: int) -> None:
    """A checkpoint folder that llm2diff's resume takes as complete."""
    import torch
    from safetensors.torch import save_file

    checkpoint = directory / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.zeros(2)}, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "diffusion_config.json").write_text("{}")


class FakeTraining:
    """`subprocess.run` for `llm2diff train`: saves a model (diffusion_config.json) and prints a train_runtime."""

    def __init__(self, runtime: float | None = 300.0, message: str = ""):
        self.commands, self.runtime, self.message = [], runtime, message

    def __call__(self, command, check, stdout, stderr, env, cwd=None):
        self.commands.append(command)
        assert env["OMP_NUM_THREADS"] == "1"
        if self.message:
            stdout.write(self.message)
            return Namespace(returncode=1)
        directory = Path(command[command.index("--output_dir") + 1])
        directory.mkdir(parents=True, exist_ok=True)
        if self.runtime is not None:
            stdout.write(f"{{'train_runtime': '{self.runtime}', 'train_steps_per_second': '1.2'}}\n")
        (directory / "diffusion_config.json").write_text("{}")
        return Namespace(returncode=0)


def test_a_finished_run_is_reused_and_an_interrupted_one_resumes(bench, tmp_path, monkeypatch):
    args = make_args(bench, tmp_path)
    fake = FakeTraining(runtime=240.0)
    monkeypatch.setattr(subprocess, "run", fake)
    baseline = bench.run_dir(tmp_path, "baseline", 0)
    write_checkpoint(baseline, 120)
    write_checkpoint(baseline, 180)
    (baseline / "checkpoint-240").mkdir()  # cut short by a kill: not resumed from
    assert bench.train(args, "baseline", 0) is True
    (command,) = fake.commands
    assert command == bench.train_command(args, "baseline", 0) + ["--resume_from_checkpoint", "true"]
    record = json.loads((baseline / "parity_train.json").read_text())["segments"]
    assert [(s["from_step"], s["to_step"], s["train_runtime"]) for s in record] == [(180, 360, 240.0)]
    assert bench.seconds_per_step(baseline) == pytest.approx(240.0 / 180)
    assert bench.train(args, "baseline", 0) is True and len(fake.commands) == 1  # finished: reused, not run again
    assert bench.train(args, "ar-twin", 0) is True  # nothing to resume: a fresh start
    assert fake.commands[-1] == bench.train_command(args, "ar-twin", 0)
    fake.runtime = None  # no train_runtime printed: the process's wall time counts
    assert bench.train(args, "semantic", 0) is True
    segment = json.loads((bench.run_dir(tmp_path, "semantic", 0) / "parity_train.json").read_text())["segments"][0]
    assert segment["train_runtime"] is None and bench.seconds_per_step(bench.run_dir(tmp_path, "semantic", 0)) == \
        pytest.approx(segment["wall_seconds"] / 360)


def test_a_run_another_process_holds_is_skipped_and_a_failure_stops(bench, tmp_path, monkeypatch):
    args = make_args(bench, tmp_path)
    fake = FakeTraining(message="RunDirectoryError: x is in use by another llm2diff run (pid 7); two runs ...\n")
    monkeypatch.setattr(subprocess, "run", fake)
    assert bench.train(args, "curriculum", 1) is False
    fake.message = "ValueError: unknown recipe key self_conditioning\n"  # the earlier message does not count again
    with pytest.raises(SystemExit, match=r"\[curriculum/seed 1\] failed \(exit 1\); see .*seed-1.log"):
        bench.train(args, "curriculum", 1)
    assert not (bench.run_dir(tmp_path, "curriculum", 1) / "parity_train.json").exists()


def test_a_finished_run_with_other_settings_is_not_reused(bench, tmp_path, monkeypatch):
    args = make_args(bench, tmp_path)
    monkeypatch.setattr(subprocess, "run", FakeTraining())
    combined = bench.run_dir(tmp_path, "combined", 0)
    combined.mkdir(parents=True)
    (combined / "diffusion_config.json").write_text("{}")
    (combined / "llm2diff_run.json").write_text(json.dumps({"recipe": {
        "seed": 0, "self_conditioning": "expected_embedding", "block_size_schedule": "2:0.25,4:0.5"}}))
    assert bench.train(args, "combined", 0) is True
    args.combined = "self_conditioning=hidden"
    with pytest.raises(SystemExit, match="trained with self_conditioning='expected_embedding', not 'hidden'"):
        bench.train(args, "combined", 0)


def fake_eval(bench, out: Path, row: str, seed: int, correct: list[bool], tokens_per_second: float = 20.0,
              ratio: float = 2.0, passes_per_token: float = 0.25, trained_with: dict | None = None,
              **fields) -> None:
    directory = bench.run_dir(out, row, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / bench.EVAL_NAME).write_text(json.dumps({
        "row": row, "seed": seed, "problems": len(correct), "ids": [f"test-{i}" for i in range(len(correct))],
        "correct": correct, "accuracy": sum(correct) / len(correct), "passes_per_token": passes_per_token,
        "tokens_per_second": tokens_per_second, "ratio_to_parent": ratio, "decoding": {"threshold": 0.7},
        "trained_with": trained_with if trained_with is not None else bench.TRAINED.get(row, {}),
        "hardware": "test CPU", **fields}))


def fake_train_record(bench, out: Path, row: str, seed: int, segments: list[tuple[int, int, float | None]]) -> None:
    directory = bench.run_dir(out, row, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "parity_train.json").write_text(json.dumps({"segments": [
        {"from_step": a, "to_step": b, "train_runtime": seconds, "wall_seconds": (seconds or 0) + 30} for a, b, seconds
        in segments]}))


def test_table_pairs_rows_with_the_baseline_and_the_twin(bench, tmp_path):
    n = 40
    baseline = [i < 10 for i in range(n)]  # 25%
    for seed in (0, 1):
        fake_eval(bench, tmp_path, "baseline", seed, baseline, tokens_per_second=30.0, ratio=1.8,
                  passes_per_token=0.2)
        fake_eval(bench, tmp_path, "ar-twin", seed, [True] * n, tokens_per_second=12.0, ratio=0.8,
                  passes_per_token=1.0)
        fake_train_record(bench, tmp_path, "baseline", seed, [(0, 360, 360.0)])  # 1 s per step
    fake_eval(bench, tmp_path, "self-cond", 0, [i < 30 for i in range(n)], ratio=1.5)  # 75%: 20 gained, none lost
    fake_eval(bench, tmp_path, "self-cond", 1, [1 <= i <= 10 for i in range(n)], ratio=2.5)  # 25%: 1 gained, 1 lost
    fake_train_record(bench, tmp_path, "self-cond", 0, [(0, 60, 90.0), (60, 360, 450.0)])  # 1.5 s per step
    # a resume at the last checkpoint trains nothing (and reports no train_runtime): it does not count
    fake_train_record(bench, tmp_path, "self-cond", 1, [(0, 360, 540.0), (360, 360, None)])
    fake_eval(bench, tmp_path, "latent-1", 0, [i < 20 for i in range(n)], trained_with={})
    summary = bench.summarize(tmp_path, ["baseline", "self-cond", "latent-1", "latent-2", "ar-twin"], [0, 1])
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["baseline", "self-cond", "latent-1", "ar-twin"]  # latent-2 has no evaluation
    row = rows["self-cond"]
    assert row["seeds"] == [0, 1] and row["accuracy"]["mean"] == pytest.approx(0.5)
    assert (row["accuracy"]["low"], row["accuracy"]["high"]) == (0.25, 0.75)
    seed0, seed1 = row["vs_baseline"]
    assert (seed0["seed"], seed0["difference"], seed0["gained"], seed0["lost"]) == (0, 0.5, 20, 0)
    assert seed0["low"] > 0  # every difference favours self-cond: the interval excludes 0
    assert (seed1["difference"], seed1["gained"], seed1["lost"]) == (0.0, 1, 1)
    assert seed1["low"] < 0 < seed1["high"]  # one problem gained, one lost: the interval includes 0
    assert [g["difference"] for g in row["twin_minus_row"]] == [0.25, 0.75]
    assert row["ratio_to_parent"] == [1.5, 2.5] and row["seconds_per_step"] == pytest.approx(1.5)
    assert row["step_vs_baseline"] == pytest.approx(1.5)
    assert rows["latent-1"]["seconds_per_step"] == pytest.approx(1.5)  # the self-cond model's training
    assert rows["baseline"]["vs_baseline"] == [] and rows["ar-twin"]["twin_minus_row"] == []

    text = bench.table(summary, "parallel parity: test\nhardware: test CPU")
    lines = text.splitlines()
    assert lines[:2] == ["parallel parity: test", "hardware: test CPU"]
    (line,) = [line for line in lines if line.startswith("| self-cond |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["self-cond", "self_conditioning=expected_embedding", "50.0% (25.0-75.0, n=40, 2 seeds)"]
    assert cells[3].startswith("+25.0: [+") and cells[3].count("[") == 2
    assert cells[4] == "1/2 up, 0 down"
    assert cells[5].startswith("+50.0: [+")
    assert cells[6:] == ["0.250", "20.0", "2.00x (1.50-2.50)", "1.50x (1.5 s)"]
    assert "| baseline | the recipe | 25.0% (25.0-25.0, n=40, 2 seeds) | - | - | +75.0: [+" in text
    from llm2diff.evaluation.intervals import paired_difference

    d = paired_difference(baseline, [True] * n)  # the helper's interval, as the table prints it
    interval = f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
    assert d.low > 0 and text.endswith(
        f"| ar-twin | block_size=1 | 100.0% (100.0-100.0, n=40, 2 seeds) | +75.0: {interval}; {interval} "
        "| 2/2 up, 0 down | - | 1.000 | 12.0 | 0.80x (0.80-0.80) | - |")
    (latent,) = [line for line in lines if line.startswith("| latent-1 |")]
    assert latent.startswith("| latent-1 | self-cond model, latent_steps 1 | 50.0% (50.0-50.0, n=40, 1 seeds) "
                             "| +25.0: [+") and latent.endswith("| 1.50x (1.5 s) |")


def fake_training_and_grading(bench, monkeypatch) -> tuple[FakeTraining, list]:
    """Training by `FakeTraining` and grading that writes a two-problem evaluation; returns the fake training and
    the list of (row, seed, model) graded, in order."""
    fake = FakeTraining()
    monkeypatch.setattr(subprocess, "run", fake)
    graded = []

    def fake_grade(args, row, seed, model, path, wanted):
        graded.append((row, seed, model))
        fake_eval(bench, Path(args.out), row, seed, [True, False], trained_with=bench.overrides(args, row), **wanted)
        return json.loads(path.read_text())

    monkeypatch.setattr(bench, "grade", fake_grade)
    return fake, graded


def test_main_trains_self_cond_once_for_the_latent_rows_and_writes_the_table(bench, tmp_path, monkeypatch):
    fake, graded = fake_training_and_grading(bench, monkeypatch)
    archive = tmp_path / "archive"
    argv = ["parallel_parity.py", "--out", str(tmp_path), "--seeds", "0", "--rows", "latent-1,latent-2,ar-twin",
            "--problems", "2", "--archive", str(archive)]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    assert [c[c.index("--output_dir") + 1] for c in fake.commands] == [str(tmp_path / "self-cond" / "seed-0"),
                                                                      str(tmp_path / "ar-twin" / "seed-0")]
    self_cond = tmp_path / "self-cond" / "seed-0"
    twin = tmp_path / "ar-twin" / "seed-0"
    assert graded == [("latent-1", 0, self_cond), ("latent-2", 0, self_cond), ("ar-twin", 0, twin)]
    text = (tmp_path / "parallel_parity.md").read_text()
    assert "| latent-2 | self-cond model, latent_steps 2 | 50.0% (50.0-50.0, n=2, 1 seeds) |" in text
    written = json.loads((tmp_path / "parallel_parity.json").read_text())
    assert set(written["commands"]) == {"ar-twin/seed-0"} and written["hardware"] in text
    bench.main()  # again: everything is reused
    assert len(fake.commands) == 2 and len(graded) == 3
    # the records went to this setting's folder of the results archive: another machine (a fresh --out) with the
    # same archive trains and grades nothing, and its table is the same
    (folder,) = archive.iterdir()
    assert folder.name.startswith("quickstart-fast-")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "ar-twin/seed-0/parity_eval.json", "ar-twin/seed-0/parity_train.json", "latent-1/seed-0/parity_eval.json",
        "latent-2/seed-0/parity_eval.json", "self-cond/seed-0/parity_train.json"]
    fresh = tmp_path / "fresh"
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(fresh)])
    bench.main()
    assert len(fake.commands) == 2 and len(graded) == 3
    assert "| latent-2 | self-cond model, latent_steps 2 | 50.0% (50.0-50.0, n=2, 1 seeds) |" in \
        (fresh / "parallel_parity.md").read_text()
    # other settings are another folder: nothing archived stands for them
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(fresh), "--rows", "ar-twin", "--", "--max_steps", "20"])
    bench.main()
    assert len(fake.commands) == 3 and len(graded) == 4 and len(list(archive.iterdir())) == 2
    monkeypatch.setattr("sys.argv", [*argv, "--threshold", "0.9"])
    with pytest.raises(SystemExit, match="graded with other settings"):  # an evaluation is not silently reused
        bench.main()


def test_rows_decoded_from_one_model_are_graded_from_that_model(bench, tmp_path, monkeypatch):
    """An archived evaluation of the causal-ar row (another machine's training) does not stand for it when this run
    trains causal-ar for a decoded row: the model row is graded again from the model its decoded rows use."""
    fake, graded = fake_training_and_grading(bench, monkeypatch)
    archive, elsewhere, here = tmp_path / "archive", tmp_path / "elsewhere", tmp_path / "here"
    argv = ["parallel_parity.py", "--seeds", "0", "--problems", "2", "--archive", str(archive)]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(elsewhere), "--rows", "causal-ar"])
    bench.main()  # another machine trains and grades causal-ar only; its records go to the archive
    assert graded == [("causal-ar", 0, elsewhere / "causal-ar" / "seed-0")]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(here), "--rows", "causal-ar"])
    bench.main()  # here, the archived evaluation stands for the row: nothing trained or graded
    assert len(fake.commands) == 1 and len(graded) == 1
    record = archive.glob("*/causal-ar/seed-0/parity_eval.json")
    (archived_eval,) = record
    trained = here / "causal-ar" / "seed-0"
    trained.mkdir(parents=True)
    (trained / bench.TRAIN_RECORD).write_text("{}")  # a training here, not graded yet: the archived one stays
    assert bench.archive(here, archived_eval.parents[2]) == [] and archived_eval.is_file()
    (trained / bench.TRAIN_RECORD).unlink()
    trained.rmdir()
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(here), "--rows", "causal-ar,causal-ar-reopen"])
    bench.main()  # the reopen row needs the model here: causal-ar is graded again, from the same model
    model = here / "causal-ar" / "seed-0"
    assert [c[c.index("--output_dir") + 1] for c in fake.commands] == [str(elsewhere / "causal-ar" / "seed-0"),
                                                                      str(model)]
    assert graded[1:] == [("causal-ar", 0, model), ("causal-ar-reopen", 0, model)]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(here), "--rows", "causal-ar"])
    bench.main()  # its model is trained here now: the local evaluation is the row's, nothing graded again
    assert len(fake.commands) == 2 and len(graded) == 3


def test_an_evaluation_on_a_tiny_model_counts_passes_tokens_and_the_parent(bench):
    from llm2diff import adapt

    dlm = adapt(make_model("qwen3"), make_tokenizer(), block_size=4)
    task, rows, prompts = bench.arithmetic_held_out(dlm, 4)
    assert [row["id"] for row in rows] == ["test-0", "test-1", "test-2", "test-3"]
    result = bench.measure(dlm, task, rows, prompts, {"threshold": 0.9}, max_new_tokens=8, parent_every=2)
    assert result["ids"] == ["test-0", "test-1", "test-2", "test-3"] and len(result["correct"]) == 4
    assert all(0 < t <= 8 for t in result["tokens"]) and all(p >= 1 for p in result["passes"])
    assert result["passes_per_token"] == pytest.approx(sum(result["passes"]) / sum(result["tokens"]))
    assert result["decoding"]["threshold"] == 0.9 and result["decoding"]["max_new_tokens"] == 8
    assert result["parent"]["ids"] == ["test-0", "test-2"]
    assert result["ratio_to_parent"] == pytest.approx(result["tokens_per_second"] /
                                                      result["parent"]["tokens_per_second"])
    assert json.loads(json.dumps(result)) == result  # written as JSON as it is
