"""STaR-style self-training rounds for diffusion (or AR-twin) models: sample, verify, rationalize, retrain, evaluate.

    llm2diff star --config recipes/quickstart-star.yaml
    accelerate launch -m llm2diff star --config recipes/quickstart-star.yaml

Round 0 is the starting model: `star_init_model`, or a model trained from the recipe's own data and steps. Each
round r = 1..R then
  1. samples k rationales per training problem with the round r-1 model (block sampler, temperature, seed per
     round) and grades them with the task's grader                                  -> round-r/samples.jsonl
  2. re-samples problems with no correct rationale with the answer given as a hint, keeping correct rationales
     without the hint (rationalization)                                             -> round-r/rationalized.jsonl
  3. builds the round's data: correct rationales, deduplicated, at most `star_max_per_problem` per problem, plus
     `star_mix_sft` original rows                                                   -> round-r/data (datasets)
  4. fine-tunes the round-0 model afresh (`star_restart: initial`, as in STaR) or the round r-1 model
     (`previous`) for `star_train_steps`                                           -> round-r/model
  5. grades held-out problems with the evaluation runner                            -> round-r/eval
and writes round-r/round.json, then the report (report.md, report.json, accuracy.png) in the output directory.

Every stage's output is written atomically, or appended record by record (samples), and a stage is skipped when
its output exists, so re-running the same command after an interruption resumes where it stopped. Raising
`star_rounds` continues a finished run. An output directory that holds a different recipe's run is refused.

STaR: Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning".
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from llm2diff.atomic import atomic_directory, write_json_atomic
from llm2diff.recipe import RecipeError
from llm2diff.star.config import StarArguments
from llm2diff.star.sampling import SampleOptions, sample_and_grade
from llm2diff.tasks.base import EvalTask

logger = logging.getLogger("llm2diff")

RUN_FILE = "star_run.json"


def check_task(star: StarArguments):
    """The task, which must have a grader (and a final answer when rationalizing)."""
    from llm2diff.tasks.base import get_task, parse_task_options

    task = get_task(star.star_task, **parse_task_options(star.star_task_options, star.star_task))
    if type(task).grade is EvalTask.grade:
        raise RecipeError(f"task {star.star_task!r} has no grader, so its samples cannot be verified; STaR needs a "
                          "task module that implements grade()")
    if star.star_filter == "steps" and type(task).step_labels is EvalTask.step_labels:
        raise RecipeError(f"star_filter 'steps' needs exact step labels, and task {star.star_task!r} has none "
                          "(the built-in arithmetic task has them): use star_filter 'answer'")
    return task


def check_run_dir(root: Path, recipe: dict[str, Any], rows_fingerprint: str | None = None) -> None:
    """Refuse an output directory holding a run of a different recipe or problems; record this run in a new one."""
    from llm2diff.rundir import check_run_record, resume_key

    if not (root / RUN_FILE).is_file() and root.is_dir() and any(p.name.startswith("round-") for p in root.iterdir()):
        raise RecipeError(f"{root} holds rounds but no {RUN_FILE}: not a STaR run of this recipe; use another "
                          "output_dir")
    key = resume_key(recipe)
    if rows_fingerprint is not None:
        key["training_problems"] = rows_fingerprint
    check_run_record(root, key, name=RUN_FILE, what="STaR run", recipe=recipe)


def _round_train_args(train_args, output_dir: Path, steps: int, seed: int):
    args = copy.deepcopy(train_args)
    args.output_dir = str(output_dir)
    args.max_steps = steps
    args.seed = seed
    args.resume_from_checkpoint = None
    return args


def _last_checkpoint(directory: Path) -> str | None:
    from llm2diff.training.checkpoints import newest_complete_checkpoint

    return newest_complete_checkpoint(directory)


def _train(model_args, data_args, train_args, recipe, out: Path, rows=None, init_model=None) -> dict:
    """Train into out/model (resuming from its last checkpoint); out/train.json marks it done."""
    from accelerate import PartialState

    from llm2diff.training.arguments import FinalEvalArguments
    from llm2diff.training.run import run_train

    marker = out / "train.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    start = time.perf_counter()
    model_dir = out / "model"
    train_args.resume_from_checkpoint = _last_checkpoint(model_dir)
    summary = run_train(model_args, data_args, train_args, FinalEvalArguments(), recipe, train_rows=rows,
                        init_model=init_model)
    record = {"seconds": round(time.perf_counter() - start, 2), "metrics": summary["train"],
              "examples": None if rows is None else len(rows), "init_model": init_model,
              "resumed_from": train_args.resume_from_checkpoint}
    if PartialState().is_main_process:
        write_json_atomic(marker, record)
    PartialState().wait_for_everyone()
    return record


def _evaluate(star: StarArguments, model_dir: Path, out: Path, seed: int, reuse: Path | None = None) -> dict:
    """Grade `model_dir` on the held-out problems into `out` (resumable). `reuse`: an earlier evaluation directory
    of the same model (e.g. the plain run's round 0 a variant starts from); taken as it is, copied whole, when it
    was made with exactly these settings, so the variant's round 0 is the same grading, not a second one."""
    import dataclasses
    import shutil

    from accelerate import PartialState

    from llm2diff.evaluation.runner import EvalConfig, run_eval

    state = PartialState()
    path = out / "summary.json"
    if state.is_main_process and not path.is_file():
        cfg = EvalConfig(model=str(model_dir), task=star.star_task, source=star.star_source, split=star.star_eval_split,
                         limit=star.star_eval_problems, task_options=star.star_task_options,
                         max_new_tokens=star.star_max_new_tokens, batch_size=star.star_eval_batch_size,
                         decoding=star.decoding_for("grading"), seed=seed, output_dir=str(out))
        if reuse is not None and _same_evaluation(reuse / "summary.json", dataclasses.asdict(cfg)):
            with atomic_directory(out) as tmp:
                shutil.copytree(reuse, tmp, dirs_exist_ok=True)
                summary = json.loads((tmp / "summary.json").read_text())
                summary["reused_from"] = str(reuse)
                write_json_atomic(tmp / "summary.json", summary)
            logger.info("%s: the evaluation in %s has these settings; reused, not graded again", out, reuse)
        else:
            start = time.perf_counter()
            summary = run_eval(cfg)
            summary["stage_seconds"] = round(time.perf_counter() - start, 2)
            write_json_atomic(path, summary)
    state.wait_for_everyone()
    return json.loads(path.read_text())


def _same_evaluation(summary_path: Path, config: dict) -> bool:
    """Whether the evaluation summarised at `summary_path` graded the same model with the same settings as
    `config` (an `EvalConfig` as a dict; the output directory aside)."""
    if not summary_path.is_file():
        return False
    recorded = dict(json.loads(summary_path.read_text()).get("config") or {})
    wanted = json.loads(json.dumps(config))  # tuples and paths as the summary stores them
    if Path(recorded.pop("model", "")).resolve() != Path(wanted.pop("model")).resolve():
        return False
    recorded.pop("output_dir", None)
    wanted.pop("output_dir", None)
    return recorded == wanted


def build_round_data(samples: dict[str, dict], rationalized: dict[str, dict], star: StarArguments,
                     sft_rows: list[dict], seed: int, step_labels=None, prm_accepts=None,
                     ) -> tuple[list[dict], dict[str, int]]:
    """The round's training rows: correct rationales (deduped, capped per problem) plus original SFT rows.

    `step_labels(problem_id, text)` gives a rationale's exact step labels (None: the task has none). With them, the
    answer-right rationales whose steps are not all right are counted (`wrong_steps`), and with
    `star_filter: steps` they are not kept (a problem left without one falls back on its rationalized samples).
    With `star_filter: prm`, `prm_accepts(problem_id, text)` decides instead (the PRM's lowest step score against
    `star_prm_threshold`); `prm_rejected` counts what it turned away, and `prm_rejected_wrong_steps` how many of
    those the exact labels also call wrong. With `star_balance: pass_rate`, a problem whose kept rationales came
    from c of its k samples has them repeated ceil(k / c) times (a rationalized one k times), so hard problems
    weigh as much as easy ones (difficulty-aware, as DART-Math's rejection tuning); `balance_copies` counts the
    repeats.
    """
    if star.star_filter == "steps" and step_labels is None:
        raise ValueError("star_filter 'steps' needs the task's exact step labels")
    if star.star_filter == "prm" and prm_accepts is None:
        raise ValueError("star_filter 'prm' needs the process reward model's verdicts (prm_accepts)")
    rows = []
    counts = {"kept": 0, "rationalized": 0, "problems_solved": 0, "sft": 0,
              "wrong_steps": None if step_labels is None else 0}
    if star.star_filter == "prm":
        counts.update(prm_rejected=0, prm_rejected_wrong_steps=None if step_labels is None else 0)

    def usable(problem_id: str, text: str) -> bool:
        right = None
        if step_labels is not None:
            labels = step_labels(problem_id, text)
            right = bool(labels) and all(labels)
            counts["wrong_steps"] += not right
        if star.star_filter == "steps":
            return right
        if star.star_filter == "prm":
            accepted = prm_accepts(problem_id, text)
            counts["prm_rejected"] += not accepted
            if not accepted and right is not None:
                counts["prm_rejected_wrong_steps"] += not right
            return accepted
        return True

    k = star.star_samples_per_problem
    for problem_id, record in samples.items():
        texts: list[tuple[str, str]] = []
        good = 0  # samples (duplicates included) that would be kept: the problem's pass rate for `star_balance`
        for sample in record["samples"]:
            if sample["correct"] and usable(problem_id, sample["text"]):
                good += 1
                if sample["text"] not in {t for t, _ in texts}:
                    texts.append((sample["text"], "sampled"))
        if not texts and problem_id in rationalized:
            for sample in rationalized[problem_id]["samples"]:
                if sample["correct"] and sample["text"] not in {t for t, _ in texts} and \
                        usable(problem_id, sample["text"]):
                    texts.append((sample["text"], "rationalized"))
        texts = texts[: star.star_max_per_problem]
        if texts:
            counts["problems_solved"] += 1
        # star_balance 'pass_rate': a problem solved by c of its k samples counts k / c times (rationalized: k)
        copies = min(k, -(-k // max(good, 1))) if star.star_balance == "pass_rate" else 1
        for text, origin in texts:
            for _ in range(copies):
                rows.append({"question": record["question"], "answer": text, "origin": origin,
                             "problem_id": problem_id})
            counts["kept" if origin == "sampled" else "rationalized"] += 1
            if copies > 1:
                counts["balance_copies"] = counts.get("balance_copies", 0) + copies - 1
    if star.star_mix_sft and sft_rows:
        pick = random.Random(seed).sample(range(len(sft_rows)), min(star.star_mix_sft, len(sft_rows)))
        for i in pick:
            rows.append({"question": sft_rows[i]["question"], "answer": sft_rows[i]["answer"], "origin": "sft",
                         "problem_id": f"sft-{i}"})
        counts["sft"] = len(pick)
    return rows, counts


def _sft_rows(data_args, star: StarArguments) -> list[dict]:
    if not star.star_mix_sft:
        return []
    from llm2diff.training.data import load_raw_dataset

    ds = load_raw_dataset(data_args, data_args.train_split)
    if "question" not in ds.column_names or "answer" not in ds.column_names:
        raise RecipeError(f"star_mix_sft needs question/answer rows in the recipe's dataset; it has "
                          f"{sorted(ds.column_names)}")
    return [{"question": r["question"], "answer": r["answer"]} for r in ds]


class StarRun:
    """One STaR run's state: round 0, then one round at a time (`llm2diff rounds` interleaves other stages)."""

    def __init__(self, model_args, data_args, train_args, star: StarArguments, recipe: dict[str, Any],
                 root: Path | None = None, check_dir: bool = True):
        from accelerate import PartialState

        # the trainer's process state: on CPUs, several processes are one job only when created with cpu=True
        self.state = PartialState(cpu=train_args.use_cpu)
        self.model_args, self.data_args, self.train_args, self.star, self.recipe = (
            model_args, data_args, train_args, star, recipe)
        self.root = Path(root or train_args.output_dir)
        self.task = check_task(star)
        self.rows = self.task.load_rows(star.star_source, star.star_train_split, star.star_num_problems)
        if check_dir and self.state.is_main_process:
            from llm2diff.rundir import rows_fingerprint

            check_run_dir(self.root, recipe, rows_fingerprint(self.rows))
        self.state.wait_for_everyone()
        self.row_ids = [self.task.row_id(row, i) for i, row in enumerate(self.rows)]
        self.sft_rows = _sft_rows(data_args, star)
        self.initial: str | None = None

    def round_zero(self) -> dict:
        """Train (or take) the starting model and grade it. Sets `self.initial`."""
        from transformers import set_seed

        star, train_args = self.star, self.train_args
        r0 = self.root / "round-0"
        if star.star_init_model:
            self.initial = str(Path(star.star_init_model))
            if not Path(self.initial).is_dir():
                raise FileNotFoundError(f"star_init_model {self.initial!r} is not a directory written by llm2diff train")
            train0 = {"seconds": 0.0, "init_model": self.initial}
        else:
            set_seed(train_args.seed)
            train0 = _train(self.model_args, self.data_args, _round_train_args(train_args, r0 / "model",
                                                                               train_args.max_steps, train_args.seed),
                            self.recipe, r0)
            self.initial = str(r0 / "model")
        reuse = Path(self.initial).parent / "eval" if star.star_init_model else None  # a STaR run's round 0
        eval0 = _evaluate(star, Path(self.initial), r0 / "eval", train_args.seed, reuse)
        record = _round_record(0, eval0, train0, None, None, None, None)
        if self.state.is_main_process:
            write_json_atomic(r0 / "round.json", record)
        return record

    def _prm_judge(self):
        """`prm_accepts(problem_id, text)` for `star_filter: prm`: the rationale's steps (its lines, as `llm2diff
        prm` cuts them) scored by the PRM `star_prm` after the problem's prompt; accepted when the lowest score is
        at least `star_prm_threshold`."""
        from llm2diff.evaluation.runner import PromptRenderer
        from llm2diff.modeling.loading import load
        from llm2diff.prm.model import check_tokenizer_match, load_prm
        from llm2diff.prm.steps import step_ends

        star = self.star
        if not Path(star.star_prm).is_dir():
            raise FileNotFoundError(f"star_prm {star.star_prm!r} is not a directory: give the prm/ directory that "
                                    "llm2diff prm wrote")
        prm = load_prm(star.star_prm)
        dlm = load(self.initial)  # the prompt format and tokenizer of the policy the rationales came from
        check_tokenizer_match(prm, dlm.tokenizer)
        render, tok = PromptRenderer(dlm), dlm.tokenizer
        by_id = dict(zip(self.row_ids, self.rows))

        def accepts(problem_id: str, text: str) -> bool:
            response = list(tok(text, add_special_tokens=False).input_ids) + list(dlm.eos_token_ids[:1])
            ends = step_ends(response, tok, "lines", eos_ids=dlm.eos_token_ids)
            if not ends:
                return False
            scores = prm.step_scores([render(self.task, by_id[problem_id], [])], [response], [ends])[0]
            return min(scores) >= star.star_prm_threshold

        return accepts

    def round(self, r: int, previous: str, out: Path | None = None) -> dict:
        """One round sampled with the `previous` model; the round's model goes to `out/model`. Resumable."""
        from transformers import set_seed

        from llm2diff.modeling.loading import load

        star, train_args, task = self.star, self.train_args, self.task
        out = out or self.root / f"round-{r}"
        round_file = out / "round.json"
        if round_file.is_file():
            return json.loads(round_file.read_text())
        seed = train_args.seed + 1000 * r
        dlm = load(previous)
        options = SampleOptions(star.decoding_for("sampling"), batch_size=star.star_batch_size)
        k = star.star_samples_per_problem
        samples, sample_stats = sample_and_grade(dlm, task, self.rows, k, options, seed, out / "samples.jsonl",
                                                 desc=f"round {r}: sampling")
        unsolved = [i for i, row_id in enumerate(self.row_ids) if samples[row_id]["num_correct"] == 0]
        rationalized, rat_stats = {}, None
        if star.star_rationalize and unsolved:
            hints = {i: task.final_answer(self.rows[i]) for i in unsolved}
            usable = [i for i in unsolved if hints[i] is not None]
            if len(usable) < len(unsolved):
                logger.warning("task %s gives no final answer for %d problems: they are not rationalized",
                               star.star_task, len(unsolved) - len(usable))
            if usable:
                # the rows keep their ids from the full list, so records line up with the samples
                keyed = [{**self.rows[i], "id": self.row_ids[i]} for i in usable]
                questions = [star.star_hint_template.format(question=task.question(self.rows[i]), answer=hints[i])
                             for i in usable]
                rationalized, rat_stats = sample_and_grade(dlm, task, keyed, k, options, seed + 500,
                                                           out / "rationalized.jsonl", questions=questions,
                                                           desc=f"round {r}: rationalizing")
        del dlm
        data_dir = out / "data"
        step_labels = None
        if type(task).step_labels is not EvalTask.step_labels:  # the task knows its steps: count (and filter)
            by_id = dict(zip(self.row_ids, self.rows))

            def step_labels(problem_id: str, text: str) -> list[int] | None:
                return task.step_labels(text, by_id[problem_id])

        prm_accepts = self._prm_judge() if star.star_filter == "prm" else None
        data_rows, counts = build_round_data(samples, rationalized, star, self.sft_rows, seed, step_labels,
                                             prm_accepts)
        if not data_rows:
            raise RuntimeError(f"round {r}: no correct rationale among {len(samples)} problems x {k} samples; "
                               "raise star_samples_per_problem or star_decoding.temperature, or start from a stronger model")
        import datasets

        if self.state.is_main_process and not (data_dir / "dataset_info.json").is_file():
            with atomic_directory(data_dir) as tmp:
                datasets.Dataset.from_list(data_rows).save_to_disk(str(tmp))
        self.state.wait_for_everyone()
        round_data = datasets.load_from_disk(str(data_dir)).select_columns(["question", "answer"])
        init = self.initial if star.star_restart == "initial" else previous
        round_args = _round_train_args(train_args, out / "model", star.star_train_steps, seed)
        if star.star_learning_rate is not None:
            round_args.learning_rate = star.star_learning_rate
        set_seed(seed)
        train = _train(self.model_args, self.data_args, round_args, self.recipe, out, rows=round_data, init_model=init)
        evaluation = _evaluate(star, out / "model", out / "eval", train_args.seed)
        pass_at_k = sum(1 for s in samples.values() if s["num_correct"] > 0) / max(len(samples), 1)
        record = _round_record(r, evaluation, train, sample_stats, rat_stats, counts,
                               {"pass_at_k": pass_at_k, "k": k, "problems": len(samples), "unsolved": len(unsolved)})
        if self.state.is_main_process:
            write_json_atomic(round_file, record)
        return record


def run_star(model_args, data_args, train_args, star: StarArguments, recipe: dict[str, Any]) -> list[dict]:
    """Run (or resume) all rounds. Returns the per-round records (also in report.json)."""
    from llm2diff.star.report import write_report

    from accelerate import PartialState

    from llm2diff.rundir import check_writable, output_lock

    check_writable(train_args.output_dir)
    with output_lock(train_args.output_dir, enabled=PartialState(cpu=train_args.use_cpu).is_main_process):
        run = StarRun(model_args, data_args, train_args, star, recipe)
        records = [run.round_zero()]
        if run.state.is_main_process:
            write_report(run.root, records, star)
        previous = run.initial
        for r in range(1, star.star_rounds + 1):
            records.append(run.round(r, previous))
            if run.state.is_main_process:
                write_report(run.root, records, star)
            previous = str(run.root / f"round-{r}" / "model")
    return records


def _round_record(r, evaluation, train, sample_stats, rat_stats, counts, train_metrics) -> dict:
    return {
        "round": r,
        "accuracy": evaluation["metrics"].get("accuracy", evaluation["correct"] / max(evaluation["num_examples"], 1)),
        "eval_examples": evaluation["num_examples"],
        "eval_nfe_per_token": evaluation.get("nfe_per_token"),
        "train_problems": None if train_metrics is None else train_metrics["problems"],
        "pass_at_k": None if train_metrics is None else train_metrics["pass_at_k"],
        "k": None if train_metrics is None else train_metrics["k"],
        "kept": None if counts is None else counts["kept"],
        "rationalized": None if counts is None else counts["rationalized"],
        "sft_mixed": None if counts is None else counts["sft"],
        "wrong_steps": None if counts is None else counts.get("wrong_steps"),
        "balance_copies": None if counts is None else counts.get("balance_copies"),
        "prm_rejected": None if counts is None else counts.get("prm_rejected"),
        "prm_rejected_wrong_steps": None if counts is None else counts.get("prm_rejected_wrong_steps"),
        "sampling": None if sample_stats is None else sample_stats.to_dict(),
        "rationalizing": None if rat_stats is None else rat_stats.to_dict(),
        "seconds": {"sample": None if sample_stats is None else round(sample_stats.seconds, 1),
                    "rationalize": None if rat_stats is None else round(rat_stats.seconds, 1),
                    "train": train.get("seconds"), "eval": evaluation.get("stage_seconds")},
    }


__all__ = ["run_star", "StarRun", "build_round_data", "check_task", "check_run_dir", "StarArguments"]
