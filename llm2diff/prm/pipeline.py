"""`llm2diff prm`: label reasoning steps with the policy's own rollouts, then train and evaluate a process reward model.

    llm2diff prm --config recipes/quickstart-prm.yaml

1. The policy (`prm_policy`, a saved llm2diff model) samples `prm_samples_per_problem` solutions for training and
   held-out problems of `prm_task` (`samples-train.jsonl`, `samples-eval.jsonl`; resumable).
2. Each solution is cut into steps (`prm_steps`: lines or blocks) and every step is labelled Math-Shepherd style:
   `prm_num_rollouts` completions from the prefix ending with the step, graded by the task (soft = fraction
   correct, hard = any). For the built-in arithmetic task the exact labels are recorded beside them
   (`labels-train.jsonl`, `labels-eval.jsonl`, one line per solution, appended as they finish).
3. A PRM (token-classification head + LoRA on the policy's base model) is trained on the training labels with the
   transformers `Trainer` (`prm/`), and evaluated on the held-out labels: step-label accuracy and AUROC against
   the rollout labels, and for the built-in task against the exact labels, plus how often rollout labels agree
   with the exact ones (`prm_report.json`).
Every output is written atomically or appended record by record; re-running the command resumes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2diff.atomic import read_jsonl_records, write_json_atomic
from llm2diff.recipe import DecodingLayer, decoding_field, fold_deprecated_keys
from llm2diff.sampling.config import DecodingConfig

logger = logging.getLogger("llm2diff")


@dataclass
class PRMArguments:
    prm_policy: str | None = field(default=None, metadata={
        "help": "A saved llm2diff model: it samples the solutions and rolls out from their steps."})
    prm_task: str = field(default="arithmetic", metadata={"help": "Task with a grader: arithmetic, gsm8k, ..."})
    prm_task_options: str | None = field(default=None, metadata={"help": "Task constructor options as JSON."})
    prm_source: str | None = field(default=None, metadata={"help": "Where the task's rows come from."})
    prm_train_split: str = field(default="train", metadata={"help": "Split whose problems are labelled for training."})
    prm_eval_split: str = field(default="test", metadata={"help": "Held-out split for the PRM's evaluation."})
    prm_num_problems: int = field(default=60, metadata={"help": "Training problems."})
    prm_eval_problems: int = field(default=30, metadata={"help": "Held-out problems."})
    prm_samples_per_problem: int = field(default=2, metadata={"help": "Solutions sampled per problem."})
    prm_decoding: DecodingLayer | None = decoding_field(
        "How the solutions are sampled: decoding settings over the policy's saved ones and this default: the block "
        "sampler at temperature 1.0 (high enough to get wrong steps too), e.g. {temperature: 1.0, threshold: 0.9}.")
    prm_num_rollouts: int = field(default=4, metadata={"help": "Completions per step prefix (Math-Shepherd N)."})
    prm_rollout_decoding: DecodingLayer | None = decoding_field(
        "How the rollouts are sampled: decoding settings over the policy's saved ones and this default: the block "
        "sampler at temperature 0.7, e.g. {temperature: 0.7, threshold: 0.9}.")
    prm_max_new_tokens: int = field(default=48, metadata={"help": "Token budget of solutions and rollouts."})
    prm_batch_size: int = field(default=32, metadata={"help": "Sequences per generate call when sampling."})
    # earlier releases' keys: folded into prm_decoding / prm_rollout_decoding (with a message naming the new form)
    prm_temperature: float | None = field(default=None, metadata={"help": "Deprecated: prm_decoding.temperature."})
    prm_rollout_temperature: float | None = field(default=None, metadata={
        "help": "Deprecated: prm_rollout_decoding.temperature."})
    prm_threshold: float | None = field(default=None, metadata={
        "help": "Deprecated: prm_decoding.threshold and prm_rollout_decoding.threshold."})
    prm_steps: str = field(default="lines", metadata={"help": "Step segmentation: 'lines' or 'blocks'."})
    prm_label_type: str = field(default="soft", metadata={
        "help": "'soft': the fraction of correct rollouts; 'hard': whether any rollout is correct."})
    prm_lora_r: int = field(default=16, metadata={"help": "LoRA rank of the PRM."})

    def __post_init__(self) -> None:
        from llm2diff.prm.steps import SEGMENTATIONS
        from llm2diff.tasks.base import TASKS

        threshold = self.prm_threshold  # it set both, so it goes into both
        fold_deprecated_keys(self, "prm_decoding", {"prm_temperature": "temperature", "prm_threshold": "threshold"})
        if threshold is not None:
            self.prm_rollout_decoding = {"threshold": threshold, **(self.prm_rollout_decoding or {})}
        fold_deprecated_keys(self, "prm_rollout_decoding", {"prm_rollout_temperature": "temperature"})
        for which in ("solutions", "rollouts"):  # every setting valid: refused here, not after sampling
            DecodingConfig.resolve(self.decoding_for(which))

        if self.prm_task not in TASKS:
            raise ValueError(f"unknown prm_task {self.prm_task!r}; available: {', '.join(sorted(TASKS))}")
        if self.prm_steps not in SEGMENTATIONS:
            raise ValueError(f"prm_steps must be one of {', '.join(SEGMENTATIONS)}, got {self.prm_steps!r}")
        if self.prm_label_type not in ("soft", "hard"):
            raise ValueError(f"prm_label_type must be 'soft' or 'hard', got {self.prm_label_type!r}")
        for name in ("prm_num_problems", "prm_eval_problems", "prm_samples_per_problem", "prm_num_rollouts",
                     "prm_max_new_tokens", "prm_batch_size", "prm_lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


    def decoding_for(self, which: str) -> dict:
        """The decoding layer over the policy's saved decoding for the "solutions" or the "rollouts"."""
        base, layer = ((SOLUTIONS, self.prm_decoding) if which == "solutions" else
                       (ROLLOUTS, self.prm_rollout_decoding))
        return {**base, "max_new_tokens": self.prm_max_new_tokens, **(layer or {}), "mode": "block"}


SOLUTIONS = {"mode": "block", "temperature": 1.0}
ROLLOUTS = {"mode": "block", "temperature": 0.7}


def prm_dataclasses() -> tuple[type, ...]:
    from transformers import TrainingArguments

    return (PRMArguments, TrainingArguments)


def _task(args: PRMArguments):
    from llm2diff.star.config import StarArguments
    from llm2diff.star.rounds import check_task

    return check_task(StarArguments(star_task=args.prm_task, star_task_options=args.prm_task_options,
                                    star_rationalize=False))


def label_solutions(dlm, task, rows: list[dict], samples: dict[str, dict], args: PRMArguments, out: Path,
                    seed: int) -> list[dict]:
    """Step labels for every sampled solution (one record per solution, appended to `out` as they finish).

    The rollouts of the n-th solution (counted over all of them) draw with the seed `seed + 7919 * n`, so a run
    resumed after an interruption labels the remaining solutions exactly as an uninterrupted run does."""
    from tqdm.auto import tqdm

    from llm2diff.evaluation.runner import PromptRenderer
    from llm2diff.prm.steps import rollout_labels, step_ends

    tok = dlm.tokenizer
    render = PromptRenderer(dlm)
    done = read_jsonl_records(out)
    eos = tok.eos_token_id
    solutions = [(f"{samples[task.row_id(row, i)]['id']}#{j}", row, sample["text"])
                 for i, row in enumerate(rows) for j, sample in enumerate(samples[task.row_id(row, i)]["samples"])]
    todo = [(n, key, row, text) for n, (key, row, text) in enumerate(solutions) if key not in done]
    with out.open("a") as sink:
        for n, key, row, text in tqdm(todo, desc=f"labelling steps ({out.stem})"):
            prompt = render(task, row, [])
            response = list(tok(text, add_special_tokens=False).input_ids) + [eos]
            ends = step_ends(response, tok, args.prm_steps, dlm.config.block_size, dlm.eos_token_ids)
            if not ends:
                continue
            rollout = args.decoding_for("rollouts")
            soft, hard = rollout_labels(dlm, task, row, prompt, response, ends, args.prm_num_rollouts,
                                        rollout["max_new_tokens"], rollout["temperature"], seed + 7919 * n,
                                        decoding=rollout)
            record = {"id": key, "prompt_ids": prompt, "response_ids": response, "step_ends": ends,
                      "soft_labels": soft, "hard_labels": hard}
            if args.prm_task == "arithmetic" and args.prm_steps == "lines":
                exact = _exact_labels(tok, response, ends, row)
                if exact is not None:
                    record["exact_labels"] = exact
            done[key] = record
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    return list(done.values())


def _exact_labels(tok, response: list[int], ends: list[int], row: dict) -> list[int] | None:
    """The built-in task's exact label of each step: the text up to the step end, labelled line by line."""
    from llm2diff.prm.steps import arithmetic_step_labels

    labels = []
    for end in ends:
        text = tok.decode(response[: end + 1], skip_special_tokens=True)
        per_line = arithmetic_step_labels(text.rstrip("\n"), row)
        if not per_line:
            return None
        labels.append(per_line[-1])
    return labels


def _rows_for_training(records: list[dict], label_type: str):
    import datasets

    key = "soft_labels" if label_type == "soft" else "hard_labels"
    return datasets.Dataset.from_list([{"prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"],
                                        "step_ends": r["step_ends"], "step_labels": [float(x) for x in r[key]],
                                        "id": r["id"]} for r in records])


def agreement(records: list[dict]) -> dict[str, Any] | None:
    """How often the rollout (hard) labels equal the exact labels, over all steps that have both."""
    pairs = [(h, e) for r in records if "exact_labels" in r for h, e in zip(r["hard_labels"], r["exact_labels"])]
    if not pairs:
        return None
    return {"steps": len(pairs), "agreement": sum(h == e for h, e in pairs) / len(pairs),
            "exact_positive_rate": sum(e for _, e in pairs) / len(pairs)}


def run_prm(prm_args: PRMArguments, train_args, recipe: dict[str, Any]) -> dict[str, Any]:
    """Sample, label, train and evaluate. Returns the report (also written to `prm_report.json`).

    The output directory is locked for the run, and a rerun resumes there only with the same recipe and policy.
    """
    from accelerate import PartialState

    from llm2diff.recipe import RecipeError
    from llm2diff.rundir import check_run_record, check_writable, model_fingerprint, output_lock, resume_key

    if not prm_args.prm_policy:
        raise RecipeError("prm_policy is required: the saved llm2diff model whose solutions and rollouts label steps")
    if not Path(prm_args.prm_policy).is_dir():
        raise FileNotFoundError(f"prm_policy {prm_args.prm_policy!r} is not a directory written by llm2diff train")
    task = _task(prm_args)
    root = Path(train_args.output_dir)
    check_writable(root)
    main_process = PartialState().is_main_process
    with output_lock(root, enabled=main_process):
        if main_process:  # samples and labels are resumed: they must come from this policy and recipe
            check_run_record(root, {**resume_key(recipe), "policy": model_fingerprint(prm_args.prm_policy)},
                             what="PRM run", recipe=recipe)
        return _run_prm(prm_args, train_args, recipe, task, root)


def _run_prm(prm_args: PRMArguments, train_args, recipe: dict[str, Any], task, root: Path) -> dict[str, Any]:
    from llm2diff.modeling.loading import load
    from llm2diff.prm.metrics import auroc, step_label_accuracy
    from llm2diff.prm.model import build_prm, train_prm
    from llm2diff.star.sampling import SampleOptions, sample_and_grade

    dlm = load(prm_args.prm_policy)
    options = SampleOptions(prm_args.decoding_for("solutions"), batch_size=prm_args.prm_batch_size)
    start = time.perf_counter()
    labelled = {}
    for split, name, limit in ((prm_args.prm_train_split, "train", prm_args.prm_num_problems),
                               (prm_args.prm_eval_split, "eval", prm_args.prm_eval_problems)):
        rows = task.load_rows(prm_args.prm_source, split, limit)
        for row in rows:
            if task.final_answer(row) is None and not row.get("answer"):
                raise ValueError(f"{prm_args.prm_task} row {row.get('id')} has no gold answer; step labels need one")
        samples, _ = sample_and_grade(dlm, task, rows, prm_args.prm_samples_per_problem, options,
                                      train_args.seed + (0 if name == "train" else 1), root / f"samples-{name}.jsonl",
                                      desc=f"sampling ({name})")
        labelled[name] = label_solutions(dlm, task, rows, samples, prm_args, root / f"labels-{name}.jsonl",
                                         train_args.seed)
    label_seconds = time.perf_counter() - start
    base = dlm.config.base_model_name_or_path
    del dlm
    if not labelled["train"]:
        raise RuntimeError("no solution had a step to label; raise prm_max_new_tokens or check the policy")

    prm_dir = root / "prm"
    report_path = root / "prm_report.json"
    if not (prm_dir / "prm_config.json").is_file():
        from llm2diff.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(prm_args.prm_policy)
        prm = build_prm(base, tokenizer, lora_r=prm_args.prm_lora_r, lora_alpha=2 * prm_args.prm_lora_r,
                        label_type=prm_args.prm_label_type, step_segmentation=prm_args.prm_steps)
        args = _prm_training_args(train_args, prm_dir)
        train_prm(prm, _rows_for_training(labelled["train"], prm_args.prm_label_type), args)
    else:
        from llm2diff.prm.model import load_prm

        prm = load_prm(prm_dir)
    eval_records = labelled["eval"]
    scores = prm.step_scores([r["prompt_ids"] for r in eval_records], [r["response_ids"] for r in eval_records],
                             [r["step_ends"] for r in eval_records]) if eval_records else []
    flat_scores = [s for row in scores for s in row]
    report: dict[str, Any] = {"recipe": recipe, "label_seconds": round(label_seconds, 1),
                              "train": prm.config.training, "eval_steps": len(flat_scores)}
    for name, key in (("rollout", "hard_labels"), ("exact", "exact_labels")):
        labels = [x for r in eval_records if key in r for x in r[key]]
        if labels and len(labels) == len(flat_scores):
            report[f"{name}_accuracy"] = step_label_accuracy(flat_scores, labels)
            report[f"{name}_auroc"] = auroc(flat_scores, labels) if 0 < sum(labels) < len(labels) else None
    report["rollout_vs_exact"] = agreement(labelled["train"] + eval_records)
    write_json_atomic(report_path, report)
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2), flush=True)
    return report


def _prm_training_args(train_args, output_dir: Path):
    import copy

    args = copy.deepcopy(train_args)
    args.output_dir = str(output_dir)
    return args
