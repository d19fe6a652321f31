"""`llm2diff rounds`: STaR, then process-reward labelling and training, then RL, round after round.

    llm2diff rounds --config recipes/quickstart-rounds.yaml

Round 0 is the starting model (trained from the recipe, or `star_init_model`). Each round r = 1..`rounds`:
  1. STaR (`round-r/star/`): sample with the current policy, keep verified rationales, fine-tune, grade;
  2. PRM (`round-r/prm/`): the STaR model samples solutions, rollouts label their steps, a PRM is trained
     (skipped with `rounds_prm: false`);
  3. RL (`round-r/rl/`): GRPO from the STaR model with the task's outcome reward plus
     `rounds_rl_process_weight` x the PRM's step scores; the RL model is the next round's policy;
and `round-r/round.json` records the three stages' held-out accuracy, the PRM's AUROC and the stage times. The
report (report.md, report.json, accuracy.png) is rewritten after every round. Each stage resumes from its own
outputs, so re-running the command after an interruption continues where it stopped.

The recipe is a STaR recipe (model, data, diffusion, trainer and `star_*` keys) plus the `prm_*` labelling keys
and these `rounds*` keys; the PRM and GRPO trainers take their own step counts and learning rates from here.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2diff.atomic import write_json_atomic, write_text_atomic


@dataclass
class RoundsArguments:
    rounds: int = field(default=2, metadata={"help": "STaR -> PRM -> RL rounds after round 0."})
    rounds_prm: bool = field(default=True, metadata={"help": "Label steps and train a PRM each round."})
    rounds_prm_max_steps: int = field(default=60, metadata={"help": "PRM training steps per round."})
    rounds_prm_learning_rate: float = field(default=5e-4, metadata={"help": "PRM learning rate."})
    rounds_prm_batch_size: int = field(default=8, metadata={"help": "PRM training batch size."})
    rounds_rl_max_steps: int = field(default=40, metadata={"help": "GRPO steps per round (0 = skip RL)."})
    rounds_rl_learning_rate: float = field(default=2e-5, metadata={"help": "GRPO learning rate."})
    rounds_rl_num_generations: int = field(default=8, metadata={"help": "Completions per prompt (GRPO group)."})
    rounds_rl_batch_size: int = field(default=8, metadata={"help": "GRPO per-device batch (a multiple of the group)."})
    rounds_rl_beta: float = field(default=0.04, metadata={"help": "KL weight to the reference adapter."})
    rounds_rl_temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the rollouts."})
    rounds_rl_estimator: str = field(default="one_pass", metadata={"help": "'one_pass' or 'coupled' log-probs."})
    rounds_rl_process_weight: float = field(default=0.5, metadata={
        "help": "Weight of the PRM's step scores in the advantages (0 = outcome rewards only)."})
    rounds_rl_num_problems: int = field(default=100, metadata={"help": "Training prompts for GRPO per round."})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.rounds_rl_batch_size % self.rounds_rl_num_generations:
            raise ValueError(f"rounds_rl_batch_size ({self.rounds_rl_batch_size}) must be a multiple of "
                             f"rounds_rl_num_generations ({self.rounds_rl_num_generations})")
        if self.rounds_rl_process_weight > 0 and not self.rounds_prm:
            raise ValueError("rounds_rl_process_weight > 0 needs rounds_prm: true (the PRM gives the process reward)")


def rounds_dataclasses() -> tuple[type, ...]:
    from llm2diff.prm.pipeline import PRMArguments
    from llm2diff.star.config import star_dataclasses

    return star_dataclasses() + (PRMArguments, RoundsArguments)


def _prm_stage(args: RoundsArguments, prm_args, star, train_args, recipe, policy: str, out: Path) -> dict | None:
    from transformers import TrainingArguments

    from llm2diff.prm.pipeline import run_prm

    report_file = out / "prm_report.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    stage_args = copy.deepcopy(prm_args)
    stage_args.prm_policy = policy
    # the task is the STaR task: the prm_* keys only set how solutions are sampled and labelled
    stage_args.prm_task, stage_args.prm_task_options, stage_args.prm_source = (
        star.star_task, star.star_task_options, star.star_source)
    stage_args.prm_train_split, stage_args.prm_eval_split = star.star_train_split, star.star_eval_split
    trainer_args = TrainingArguments(
        output_dir=str(out), max_steps=args.rounds_prm_max_steps, learning_rate=args.rounds_prm_learning_rate,
        per_device_train_batch_size=args.rounds_prm_batch_size, seed=train_args.seed, use_cpu=train_args.use_cpu,
        bf16=bool(train_args.bf16), report_to=train_args.report_to, logging_steps=10, save_strategy="no")
    return run_prm(stage_args, trainer_args, recipe)


def _rl_stage(args: RoundsArguments, star, train_args, recipe, policy: str, prm_dir: Path | None, out: Path) -> dict:
    from llm2diff.rl.grpo import DiffusionGRPOConfig
    from llm2diff.rl.pipeline import RLArguments, run_rl

    report_file = out / "rl_report.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    weight = args.rounds_rl_process_weight if prm_dir is not None else 0.0
    rl_args = RLArguments(rl_policy=policy, rl_task=star.star_task, rl_task_options=star.star_task_options,
                          rl_source=star.star_source, rl_split=star.star_train_split,
                          rl_num_problems=args.rounds_rl_num_problems, rl_eval_split=star.star_eval_split,
                          rl_eval_problems=star.star_eval_problems, rl_eval_batch_size=star.star_eval_batch_size,
                          rl_prm=None if prm_dir is None else str(prm_dir))
    grpo = DiffusionGRPOConfig(
        output_dir=str(out), max_steps=args.rounds_rl_max_steps, learning_rate=args.rounds_rl_learning_rate,
        num_generations=args.rounds_rl_num_generations, per_device_train_batch_size=args.rounds_rl_batch_size,
        beta=args.rounds_rl_beta, temperature=args.rounds_rl_temperature, diffusion_estimator=args.rounds_rl_estimator,
        process_weight=weight, max_completion_length=star.star_max_new_tokens,
        rollout_decoding={k: v for k, v in star.decoding_for("sampling").items()  # STaR's commit rule; GRPO's own
                          if k not in ("mode", "temperature", "top_k", "top_p", "max_new_tokens", "seed")},  # sampling
        seed=train_args.seed, use_cpu=train_args.use_cpu, bf16=bool(train_args.bf16), report_to=train_args.report_to,
        logging_steps=5, save_strategy="no")
    return run_rl(rl_args, grpo, recipe)


def stage_rows(root: Path, records: list[dict]) -> list[dict]:
    """One row per stage of each round (round 0; then STaR, PRM, RL): held-out accuracy, its change against round
    0 paired over the problems both graded (`llm2diff.evaluation.intervals`), the PRM's AUROC, and the stage's
    seconds. Stages a round did not run are left out."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    base = root / "round-0" / "eval" / "results.jsonl"
    before = read_correct(base) if base.is_file() else None
    rows = []
    for r in records:
        n = r["round"]
        if n == 0:
            stages = [("round 0", root / "round-0" / "eval", r.get("star_accuracy"), None)]
        else:
            stages = [("STaR", root / f"round-{n}" / "star" / "eval", r.get("star_accuracy"), r.get("star_seconds"))]
            if r.get("prm_seconds") is not None:
                stages.append(("PRM", None, None, r.get("prm_seconds")))
            if r.get("rl_seconds") is not None:
                stages.append(("RL", root / f"round-{n}" / "rl" / "eval", r.get("rl_accuracy"), r.get("rl_seconds")))
        for stage, eval_dir, accuracy, seconds in stages:
            change = None
            if n > 0 and before is not None and eval_dir is not None and (eval_dir / "results.jsonl").is_file():
                change = paired_difference(before, read_correct(eval_dir)).to_dict()
            rows.append({"round": n, "stage": stage, "accuracy": accuracy, "vs_round_0": change, "seconds": seconds,
                         "prm_auroc": (r.get("prm_auroc_rollout"), r.get("prm_auroc_exact")) if stage == "PRM" else None})
    return rows


def rounds_table(rows: list[dict]) -> str:
    """The rows of `stage_rows` as a table (the STaR report's format: accuracy, change with interval, cost)."""
    lines = ["| round | stage | held-out accuracy | vs round 0 (95% interval) | PRM AUROC (rollout / exact) | seconds |",
             "|---|---|---|---|---|---|"]

    def num(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for row in rows:
        d = row["vs_round_0"]
        change = "-" if d is None else (f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
                                        f"(+{d['gained']}/-{d['lost']})")
        auroc = "-" if row["prm_auroc"] is None else f"{num(row['prm_auroc'][0])} / {num(row['prm_auroc'][1])}"
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        lines.append(f"| {row['round']} | {row['stage']} | {accuracy} | {change} | {auroc} | {num(row['seconds'], '.0f')} |")
    return "\n".join(lines)


def _write_report(root: Path, records: list[dict]) -> None:
    from llm2diff.star.report import plot_accuracy

    rows = stage_rows(root, records)
    table = rounds_table(rows)
    write_text_atomic(root / "report.md", f"# STaR -> PRM -> RL rounds\n\n{table}\n\n![accuracy by round](accuracy.png)\n")
    run = json.loads((root / "star_run.json").read_text()) if (root / "star_run.json").is_file() else {}
    write_json_atomic(root / "report.json", {"rounds": records, "stages": rows,
                                             **{k: v for k, v in run.items() if k != "key"}})
    points = [{"round": r["round"], "accuracy": r["rl_accuracy"] if r.get("rl_accuracy") is not None
               else r["star_accuracy"]} for r in records]
    plot_accuracy(points, root / "accuracy.png", "held-out accuracy after each round (RL model, else STaR)")
    print(f"\n{table}\n", flush=True)


def run_rounds(model_args, data_args, train_args, star, prm_args, args: RoundsArguments,
               recipe: dict[str, Any]) -> list[dict]:
    """Run (or resume) round 0 and `args.rounds` STaR -> PRM -> RL rounds."""
    from accelerate import PartialState

    from llm2diff.rundir import check_writable, output_lock

    check_writable(train_args.output_dir)
    with output_lock(train_args.output_dir, enabled=PartialState(cpu=train_args.use_cpu).is_main_process):
        return _run_rounds(model_args, data_args, train_args, star, prm_args, args, recipe)


def _run_rounds(model_args, data_args, train_args, star, prm_args, args: RoundsArguments,
                recipe: dict[str, Any]) -> list[dict]:
    from llm2diff.star.rounds import StarRun

    run = StarRun(model_args, data_args, train_args, star, recipe)
    root = run.root
    zero = run.round_zero()
    records = [{"round": 0, "star_accuracy": zero["accuracy"], "policy": run.initial}]
    if run.state.is_main_process:
        _write_report(root, records)
    policy = run.initial
    for r in range(1, args.rounds + 1):
        out = root / f"round-{r}"
        record_file = out / "round.json"
        if record_file.is_file():
            records.append(json.loads(record_file.read_text()))
            policy = records[-1]["policy"]
            continue
        start = time.perf_counter()
        star_record = run.round(r, policy, out / "star")
        star_model = str(out / "star" / "model")
        star_seconds = time.perf_counter() - start
        prm_report, prm_seconds, prm_dir = None, None, None
        if args.rounds_prm:
            start = time.perf_counter()
            prm_report = _prm_stage(args, prm_args, star, train_args, recipe, star_model, out / "prm")
            prm_seconds = time.perf_counter() - start
            prm_dir = out / "prm" / "prm"
        rl_report, rl_seconds, next_policy = None, None, star_model
        if args.rounds_rl_max_steps > 0:
            start = time.perf_counter()
            rl_report = _rl_stage(args, star, train_args, recipe, star_model,
                                  prm_dir if args.rounds_rl_process_weight > 0 else None, out / "rl")
            rl_seconds = time.perf_counter() - start
            next_policy = str(out / "rl" / "model")
        record = {
            "round": r, "star_accuracy": star_record["accuracy"], "star_kept": star_record.get("kept"),
            "star_rationalized": star_record.get("rationalized"), "pass_at_k": star_record.get("pass_at_k"),
            "prm_auroc_rollout": None if prm_report is None else prm_report.get("rollout_auroc"),
            "prm_auroc_exact": None if prm_report is None else prm_report.get("exact_auroc"),
            "prm_rollout_vs_exact": None if prm_report is None else prm_report.get("rollout_vs_exact"),
            "rl_accuracy": None if rl_report is None else rl_report.get("accuracy"),
            "star_seconds": round(star_seconds, 1), "prm_seconds": None if prm_seconds is None else round(prm_seconds, 1),
            "rl_seconds": None if rl_seconds is None else round(rl_seconds, 1), "policy": next_policy,
        }
        if run.state.is_main_process:
            write_json_atomic(record_file, record)
        records.append(record)
        if run.state.is_main_process:
            _write_report(root, records)
        policy = next_policy
    return records
