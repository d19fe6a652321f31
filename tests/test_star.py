"""STaR rounds end to end on a tiny model: artifacts, report, resume after an interruption, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.cli import main
from llm2diff.star.config import StarArguments
from llm2diff.star.rounds import build_round_data

PROBLEMS = [
    {"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "ana has 9 pears . she eats 2 . how many ?", "answer": "9 - 2 = 7\n#### 7"},
    {"question": "sam has 5 books . he finds 3 more . how many ?", "answer": "5 + 3 = 8\n#### 8"},
    {"question": "lea has 8 cards . she loses 6 . how many ?", "answer": "8 - 6 = 2\n#### 2"},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("star")
    model_dir = root / "tiny-qwen2"
    make_model("qwen2", layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return root


def _recipe(workdir, name, **overrides):
    data = str(workdir / "problems.jsonl")
    fields = dict(
        model_name_or_path=str(workdir / "tiny-qwen2"), dataset_name=data, block_size=4, output_dir=str(workdir / name),
        max_steps=120, per_device_train_batch_size=4, learning_rate=0.01, lr_scheduler_type="constant",
        logging_steps=100, save_steps=1000, report_to="none", use_cpu=True, gradient_checkpointing=False,
        use_lora=False, t_min=0.3, loss_weighting="mean", seed=0,
        star_task="arithmetic", star_source=data, star_eval_split="test", star_num_problems=4, star_eval_problems=4,
        star_rounds=2, star_samples_per_problem=2, star_temperature=1.0, star_max_new_tokens=12, star_batch_size=4,
        star_train_steps=5, star_mix_sft=2, star_eval_batch_size=4,
    )
    fields.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def test_two_rounds_write_every_artifact_and_resume_without_redoing_work(workdir, capsys):
    recipe = _recipe(workdir, "run")
    assert main(["star", "--config", recipe]) == 0
    out = workdir / "run"
    printed = capsys.readouterr().out
    assert "| round | held-out accuracy | vs round 0 (95% interval) | by difficulty | pass@k (train)" in printed
    for r in (0, 1, 2):
        assert (out / f"round-{r}" / "round.json").is_file()
        assert (out / f"round-{r}" / "eval" / "summary.json").is_file()
    assert (out / "round-0" / "model" / "diffusion_config.json").is_file()
    full_report = json.loads((out / "report.json").read_text())
    report = full_report["rounds"]
    assert [r["round"] for r in report] == [0, 1, 2]
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    # each later round's change against round 0, paired over the held-out problems
    assert "vs_round_0" not in report[0]
    for r in (1, 2):
        expected = paired_difference(read_correct(out / "round-0" / "eval"), read_correct(out / f"round-{r}" / "eval"))
        assert report[r]["vs_round_0"] == expected.to_dict()
        assert report[r]["vs_round_0"]["n"] == report[r]["eval_examples"]
    assert full_report["recipe"]["seed"] == 0 and "torch" in full_report["versions"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy by round](accuracy.png)" in (out / "report.md").read_text()

    import datasets

    from llm2diff.tasks.base import get_task

    task = get_task("arithmetic")
    for r in (1, 2):
        lines = (out / f"round-{r}" / "samples.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 4 and all(len(rec["samples"]) == 2 for rec in records)
        data = datasets.load_from_disk(str(out / f"round-{r}" / "data"))
        by_question = {p["question"]: p for p in PROBLEMS}
        sampled = [row for row in data if row["origin"] != "sft"]
        # every kept rationale is graded correct for its own problem, and is stored without any hint
        assert all(task.grade(row["answer"], by_question[row["question"]]).correct for row in sampled)
        assert all("Hint" not in row["question"] for row in data)
        assert sum(row["origin"] == "sft" for row in data) == 2
        rec = report[r]
        assert rec["kept"] + rec["rationalized"] == len(sampled)
        assert rec["pass_at_k"] == sum(x["num_correct"] > 0 for x in records) / 4
        assert rec["sampling"]["new_tokens"] > 0 and rec["seconds"]["train"] > 0
    config = json.loads((out / "round-2" / "model" / "diffusion_config.json").read_text())
    assert config["training"]["recipe"]["star_rounds"] == 2

    # interrupt round 2 in the middle of sampling: half its records, then a line cut short
    r2 = out / "round-2"
    full = (r2 / "samples.jsonl").read_text()
    keep = full.splitlines()[:2]
    for name in ("round.json", "train.json", "rationalized.jsonl"):
        (r2 / name).unlink(missing_ok=True)
    for name in ("model", "eval", "data"):
        shutil.rmtree(r2 / name, ignore_errors=True)
    (r2 / "samples.jsonl").write_text("\n".join(keep) + "\n" + '{"id": "trunc')
    round1 = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    assert main(["star", "--config", recipe]) == 0
    # round 1 untouched; round 2 resumed at the first missing problem and drew what an uninterrupted run drew
    assert {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()} == round1
    assert (r2 / "samples.jsonl").read_text() == full
    assert (r2 / "round.json").is_file() and (r2 / "model" / "diffusion_config.json").is_file()
    # the sampling cost counts the batches drawn before the interruption too (kept beside the records)
    drawn = sum(len(json.loads(line)["samples"]) for line in full.splitlines())
    assert json.loads((r2 / "round.json").read_text())["sampling"]["sequences"] == drawn

    # raising star_rounds continues the finished run with round 3
    assert main(["star", "--config", recipe, "--star_rounds", "3"]) == 0
    assert [r["round"] for r in json.loads((out / "report.json").read_text())["rounds"]] == [0, 1, 2, 3]
    # round.json is the round's own record; the report adds the change against round 0
    assert json.loads((out / "round-1" / "round.json").read_text()) == \
        {k: v for k, v in report[1].items() if k != "vs_round_0"}


def test_unsolved_problems_are_rationalized_with_the_answer_as_a_hint(workdir):
    # the STaR problems carry other answers than the ones round 0 learned: every sample is graded wrong
    other = workdir / "other-answers.jsonl"
    other.write_text("".join(json.dumps({**p, "answer": "9 + 9 = 9\n#### 9"}) + "\n" for p in PROBLEMS))
    recipe = _recipe(workdir, "hint", star_source=str(other), star_rounds=1)
    assert main(["star", "--config", recipe]) == 0
    r1 = workdir / "hint" / "round-1"
    samples = [json.loads(line) for line in (r1 / "samples.jsonl").read_text().splitlines()]
    assert all(rec["num_correct"] == 0 for rec in samples)
    hinted = [json.loads(line) for line in (r1 / "rationalized.jsonl").read_text().splitlines()]
    assert len(hinted) == 4
    for rec in hinted:
        assert rec["prompt_question"] == f"{rec['question']}\nHint: the final answer is 9."
        assert "Hint" not in rec["question"]
    report = json.loads((r1 / "round.json").read_text())
    kept = sum(any(s["correct"] for s in rec["samples"]) for rec in hinted)  # one per solved problem
    assert report["pass_at_k"] == 0.0 and report["rationalized"] == kept and report["kept"] == 0


def test_continue_from_previous_round(workdir):
    assert main(["star", "--config", _recipe(workdir, "prev", star_restart="previous", star_rounds=1,
                                             star_rationalize=False, star_mix_sft=0)]) == 0
    train = json.loads((workdir / "prev" / "round-1" / "train.json").read_text())
    assert train["init_model"].endswith("round-0/model")


def test_a_different_recipe_in_the_same_output_dir_is_refused(workdir, capsys):
    recipe = _recipe(workdir, "guarded", star_rounds=1, max_steps=5, star_rationalize=False)
    assert main(["star", "--config", recipe]) == 0
    capsys.readouterr()
    assert main(["star", "--config", recipe, "--star_samples_per_problem", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a STaR run of a different recipe" in err and "star_samples_per_problem" in err


def test_zero_rounds_trains_round_zero_only_and_a_later_call_continues(workdir):
    recipe = _recipe(workdir, "zero", star_rounds=0, max_steps=5, star_rationalize=False)
    assert main(["star", "--config", recipe]) == 0
    report = json.loads((workdir / "zero" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0] and not (workdir / "zero" / "round-1").exists()
    weights = (workdir / "zero" / "round-0" / "model" / "model.safetensors").read_bytes()
    assert main(["star", "--config", recipe, "--star_rounds", "1"]) == 0
    report = json.loads((workdir / "zero" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert (workdir / "zero" / "round-0" / "model" / "model.safetensors").read_bytes() == weights


def test_a_run_from_another_runs_round_zero_reuses_its_grading_when_the_settings_match(workdir, monkeypatch):
    import llm2diff.evaluation.runner as runner

    source = _recipe(workdir, "init-source", star_rounds=0, max_steps=5, star_rationalize=False)
    assert main(["star", "--config", source]) == 0
    init = workdir / "init-source" / "round-0"
    graded = []
    real = runner.run_eval
    monkeypatch.setattr(runner, "run_eval", lambda cfg, *a, **k: graded.append(cfg.output_dir) or real(cfg, *a, **k))
    variant = _recipe(workdir, "init-variant", star_rounds=0, star_rationalize=False,
                      star_init_model=str(init / "model"))
    assert main(["star", "--config", variant]) == 0
    eval0 = workdir / "init-variant" / "round-0" / "eval"
    assert graded == []  # the same model, problems, decoding and seed: copied, not graded again
    summary = json.loads((eval0 / "summary.json").read_text())
    assert summary["reused_from"] == str(init / "eval")
    assert (eval0 / "results.jsonl").read_bytes() == (init / "eval" / "results.jsonl").read_bytes()
    other = _recipe(workdir, "init-other", star_rounds=0, star_rationalize=False, star_eval_problems=3,
                    star_init_model=str(init / "model"))
    assert main(["star", "--config", other]) == 0  # other held-out problems: graded
    assert graded == [str(workdir / "init-other" / "round-0" / "eval")]
    assert "reused_from" not in json.loads((workdir / "init-other" / "round-0" / "eval" / "summary.json").read_text())


@pytest.mark.parametrize("overrides,message", [
    ({"star_samples_per_problem": 0}, "star_samples_per_problem must be >= 1"),
    ({"star_task": "arithmetik"}, "unknown star_task 'arithmetik'"),
    ({"star_restart": "base"}, "star_restart must be one of initial, previous"),
    ({"star_hint_template": "{question} only"}, "must contain {question} and {answer}"),
    ({"star_rounds_": 2}, "did you mean 'star_rounds'"),
    ({"star_rounds": -1}, "star_rounds must be >= 0"),
])
def test_bad_star_recipes_fail_clearly(workdir, capsys, overrides, message):
    assert main(["star", "--config", _recipe(workdir, "bad", **overrides)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "bad").exists()


def test_task_without_a_grader_is_refused(monkeypatch):
    from llm2diff.recipe import RecipeError
    from llm2diff.star.rounds import check_task
    from llm2diff.tasks import base

    class Ungraded(base.EvalTask):
        name = "ungraded"

    monkeypatch.setitem(base.TASKS, "ungraded", f"{__name__}:Ungraded")
    monkeypatch.setattr(base.importlib, "import_module", lambda name: type("M", (), {"Ungraded": Ungraded}))
    with pytest.raises(RecipeError, match="task 'ungraded' has no grader"):
        check_task(StarArguments(star_task="ungraded"))


def test_round_data_dedupes_caps_and_prefers_own_rationales():
    samples = {
        "a": {"question": "qa", "samples": [{"text": "x", "correct": True}, {"text": "x", "correct": True},
                                            {"text": "y", "correct": True}]},
        "b": {"question": "qb", "samples": [{"text": "z", "correct": False}]},
        "c": {"question": "qc", "samples": [{"text": "w", "correct": False}]},
    }
    rationalized = {"b": {"samples": [{"text": "rb", "correct": True}]},
                    "c": {"samples": [{"text": "rc", "correct": False}]}}
    star = StarArguments(star_max_per_problem=2, star_mix_sft=1)
    rows, counts = build_round_data(samples, rationalized, star, [{"question": "s", "answer": "t"}], seed=0)
    assert [(r["question"], r["answer"], r["origin"]) for r in rows] == [
        ("qa", "x", "sampled"), ("qa", "y", "sampled"), ("qb", "rb", "rationalized"), ("s", "t", "sft")]
    assert counts == {"kept": 2, "rationalized": 1, "problems_solved": 2, "sft": 1, "wrong_steps": None}
    rows, _ = build_round_data(samples, rationalized, StarArguments(star_max_per_problem=1), [], seed=0)
    assert [r["answer"] for r in rows] == ["x", "rb"]


def test_pass_rate_balance_repeats_rarely_solved_problems():
    right = {"text": "r", "correct": True}
    samples = {  # k = 4: solved by 4, 3, 1 and 0 of the samples
        "easy": {"question": "qe", "samples": [right, right, right, right]},
        "mid": {"question": "qm", "samples": [right, {"text": "s", "correct": True}, right,
                                              {"text": "n", "correct": False}]},
        "hard": {"question": "qh", "samples": [{"text": "n", "correct": False}] * 3 + [right]},
        "none": {"question": "qn", "samples": [{"text": "n", "correct": False}] * 4},
    }
    rationalized = {"none": {"samples": [{"text": "h", "correct": True}]}}
    star = StarArguments(star_samples_per_problem=4, star_balance="pass_rate")
    rows, counts = build_round_data(samples, rationalized, star, [], seed=0)
    got = {}
    for r in rows:
        got[r["problem_id"]] = got.get(r["problem_id"], 0) + 1
    assert got == {"easy": 1, "mid": 2, "hard": 4, "none": 4}  # ceil(4 / c), a rationalized problem k times
    assert counts["kept"] == 3 and counts["rationalized"] == 1 and counts["balance_copies"] == 1 + 3 + 3
    plain, counts = build_round_data(samples, rationalized, StarArguments(star_samples_per_problem=4), [], seed=0)
    assert len(plain) == 4 and "balance_copies" not in counts
    with pytest.raises(ValueError, match="star_balance must be one of none, pass_rate, got 'rate'"):
        StarArguments(star_balance="rate")


def test_held_out_results_break_down_by_the_tasks_difficulty(tmp_path):
    from llm2diff.star.report import difficulty_groups, report_table, with_difficulty
    from llm2diff.tasks.base import get_task

    task = get_task("arithmetic", min_steps=2, max_steps=3)
    rows = task.load_rows(None, "test", 6)
    assert {task.difficulty(r) for r in rows} <= {"2 steps", "3 steps"}
    assert task.difficulty(rows[0]) == f"{len(rows[0]['steps'])} steps"
    groups = difficulty_groups(StarArguments(star_task_options='{"min_steps": 2, "max_steps": 3}',
                                             star_eval_problems=6))
    assert groups == {task.row_id(r, i): task.difficulty(r) for i, r in enumerate(rows)}
    (tmp_path / "round-1" / "eval").mkdir(parents=True)
    (tmp_path / "round-1" / "eval" / "results.jsonl").write_text("".join(
        json.dumps({"id": task.row_id(r, i), "correct": i % 2 == 0}) + "\n" for i, r in enumerate(rows)))
    records = with_difficulty(tmp_path, [{"round": 0}, {"round": 1}], groups)
    assert "by_difficulty" not in records[0]
    by = records[1]["by_difficulty"]
    for label in by:
        members = [i for i, r in enumerate(rows) if task.difficulty(r) == label]
        assert by[label] == {"correct": sum(i % 2 == 0 for i in members), "n": len(members)}
    line = report_table([{**records[1], "accuracy": 0.5, "eval_examples": 6}]).splitlines()[-1]
    label, c = next(iter(by.items()))
    assert f"{label} {c['correct'] / c['n']:.0%} ({c['n']})" in line
    assert difficulty_groups(StarArguments(star_task="gsm8k")) == {}  # a task without difficulty labels


ROW = {"question": "Leo has 1 shell. He finds 2 more shells. He finds 9 more shells. How many shells does Leo have now?",
       "answer": "Leo starts with 1 shell.\n1 + 2 = 3\n3 + 9 = 12\n#### 12"}
RIGHT = ROW["answer"]
LUCKY = "Leo starts with 1 shell.\n1 + 2 = 4\n4 + 9 = 12\n#### 12"  # the right answer after a wrong step


def test_process_filtering_drops_answer_right_rationales_with_a_wrong_step():
    from llm2diff.tasks.base import get_task

    task = get_task("arithmetic")
    assert task.grade(LUCKY, ROW).correct and task.step_labels(LUCKY, ROW) == [1, 0, 0, 0]

    def labels(problem_id, text):
        return task.step_labels(text, ROW)

    samples = {"p": {"question": "q", "samples": [{"text": LUCKY, "correct": True}, {"text": RIGHT, "correct": True}]},
               "u": {"question": "qu", "samples": [{"text": LUCKY, "correct": True}]}}
    rationalized = {"u": {"samples": [{"text": RIGHT, "correct": True}]}}
    rows, counts = build_round_data(samples, rationalized, StarArguments(), [], seed=0, step_labels=labels)
    assert [r["answer"] for r in rows] == [LUCKY, LUCKY]  # answer filtering keeps the lucky guesses
    assert counts["wrong_steps"] == 2
    rows, counts = build_round_data(samples, rationalized, StarArguments(star_filter="steps"), [], seed=0,
                                    step_labels=labels)
    # process filtering keeps the sound rationale, and falls back on the rationalized one where none is left
    assert [(r["problem_id"], r["answer"], r["origin"]) for r in rows] == [("p", RIGHT, "sampled"),
                                                                          ("u", RIGHT, "rationalized")]
    assert counts["wrong_steps"] == 2 and counts["kept"] == 1 and counts["rationalized"] == 1


def test_prm_filtering_keeps_what_the_prm_accepts_and_says_what_it_turned_away():
    from llm2diff.tasks.base import get_task

    task = get_task("arithmetic")
    samples = {"p": {"question": "q", "samples": [{"text": LUCKY, "correct": True}, {"text": RIGHT, "correct": True}]},
               "u": {"question": "qu", "samples": [{"text": RIGHT + " ", "correct": True}]}}
    judged = []

    def accepts(problem_id, text):  # a PRM that rejects the lucky guess and one sound rationale
        judged.append((problem_id, text))
        return text == RIGHT

    star = StarArguments(star_filter="prm", star_prm="unused")
    rows, counts = build_round_data(samples, {}, star, [], seed=0,
                                    step_labels=lambda pid, text: task.step_labels(text, ROW), prm_accepts=accepts)
    assert [(r["problem_id"], r["answer"]) for r in rows] == [("p", RIGHT)]
    assert judged == [("p", LUCKY), ("p", RIGHT), ("u", RIGHT + " ")]
    assert (counts["prm_rejected"], counts["prm_rejected_wrong_steps"], counts["wrong_steps"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="needs the process reward model"):
        build_round_data(samples, {}, star, [], seed=0)


def test_process_filtering_needs_a_task_with_step_labels():
    from llm2diff.recipe import RecipeError
    from llm2diff.star.rounds import check_task
    from llm2diff.tasks.base import TASKS

    with pytest.raises(ValueError, match="star_filter must be one of answer, steps, prm"):
        StarArguments(star_filter="process")
    with pytest.raises(ValueError, match="star_filter 'prm' needs star_prm"):
        StarArguments(star_filter="prm")
    with pytest.raises(ValueError, match=r"star_prm_threshold must be in \[0, 1\]"):
        StarArguments(star_filter="prm", star_prm="x", star_prm_threshold=1.5)
    without = [name for name in TASKS if name not in ("arithmetic", "ungraded")]
    with pytest.raises(RecipeError, match="star_filter 'steps' needs exact step labels"):
        check_task(StarArguments(star_task=without[0], star_filter="steps"))


def test_star_under_accelerate_shards_sampling_across_two_processes(workdir):
    import os
    import subprocess
    import sys

    recipe = _recipe(workdir, "accel", star_rounds=1, star_batch_size=2, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--cpu` would start one process; `--multi_gpu` starts torchrun, and use_cpu makes the job gloo over CPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm2diff", "star", "--config", recipe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "accel" / "round-1" / "samples.jsonl").read_text().splitlines()]
    # one problem per batch (2 sequences, k = 2): each process sampled two problems, written once, by the main process
    assert sorted(r["id"] for r in records) == ["train-0", "train-1", "train-2", "train-3"]
    assert sorted(r["process"] for r in records) == [0, 0, 1, 1]
    assert json.loads((workdir / "accel" / "report.json").read_text())["rounds"][1]["round"] == 1


def test_the_prm_judge_scores_each_rationale_after_its_prompt(tmp_path):
    """`star_filter: prm` end to end below the round: a saved PRM scores a rationale's lines after the problem's
    prompt; threshold 0 accepts everything, 1 nothing (a sigmoid never reaches 1), and the verdict is the minimum
    step score against the threshold."""
    from conftest import adapted_with_saved_base

    from llm2diff.prm import build_prm
    from llm2diff.star.rounds import StarRun
    from llm2diff.tasks.base import get_task

    dlm = adapted_with_saved_base(tmp_path, "qwen2")
    dlm.save_pretrained(tmp_path / "policy")
    prm = build_prm(str(tmp_path / "base"), dlm.tokenizer, lora_r=4, lora_alpha=8)  # as llm2diff prm builds it
    prm.save_pretrained(tmp_path / "prm")
    run = object.__new__(StarRun)  # the judge needs the run's task, rows and initial model only
    run.task, run.rows, run.row_ids, run.initial = get_task("arithmetic"), [ROW], ["p"], str(tmp_path / "policy")
    verdicts = {}
    for threshold in (0.0, 1.0):
        run.star = StarArguments(star_filter="prm", star_prm=str(tmp_path / "prm"), star_prm_threshold=threshold)
        verdicts[threshold] = [run._prm_judge()("p", text) for text in (RIGHT, LUCKY)]
    assert verdicts == {0.0: [True, True], 1.0: [False, False]}
    run.star = StarArguments(star_filter="prm", star_prm=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="star_prm .* is not a directory"):
        run._prm_judge()
