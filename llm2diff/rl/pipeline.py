"""`llm2diff rl`: GRPO on a task with the task's grader as outcome reward and, optionally, a PRM's step scores.

    llm2diff rl --config recipes/quickstart-rl.yaml

The policy (`rl_policy`, a saved llm2diff model with a LoRA adapter) keeps training its adapter with
`DiffusionGRPOTrainer` on `rl_num_problems` problems of `rl_task`. Rewards: 1 when the task's grader accepts a
completion, else 0 (outcome); with `rl_prm` and `process_weight > 0`, the PRM's score of every step of the
completion adds to the advantages of that step's tokens (see `llm2diff.rl.advantages`). The trained model goes to
`<output_dir>/model` (adapter, tokenizer, diffusion_config.json), its held-out grades to `<output_dir>/eval`, and
a summary to `rl_report.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2diff.atomic import write_json_atomic


@dataclass
class RLArguments:
    rl_policy: str | None = field(default=None, metadata={
        "help": "A saved llm2diff model with a LoRA adapter: the policy whose adapter GRPO keeps training."})
    rl_task: str = field(default="arithmetic", metadata={"help": "Task whose grader gives the outcome reward."})
    rl_task_options: str | None = field(default=None, metadata={"help": "Task constructor options as JSON."})
    rl_source: str | None = field(default=None, metadata={"help": "Where the task's rows come from."})
    rl_split: str = field(default="train", metadata={"help": "Split of the training problems."})
    rl_num_problems: int = field(default=200, metadata={"help": "Training problems (prompts)."})
    rl_eval_split: str = field(default="test", metadata={"help": "Held-out split graded after training."})
    rl_eval_problems: int = field(default=100, metadata={"help": "Held-out problems graded after training (0 = skip)."})
    rl_eval_batch_size: int = field(default=25, metadata={"help": "Prompts per generate call when grading."})
    rl_prm: str | None = field(default=None, metadata={
        "help": "A PRM directory written by `llm2diff prm`: its step scores become process rewards."})
    rl_steps: str | None = field(default=None, metadata={
        "help": "Step segmentation for process rewards: 'lines' or 'blocks' (default: the PRM's own)."})

    def __post_init__(self) -> None:
        from llm2diff.tasks.base import TASKS

        if self.rl_task not in TASKS:
            raise ValueError(f"unknown rl_task {self.rl_task!r}; available: {', '.join(sorted(TASKS))}")
        if self.rl_num_problems < 1 or self.rl_eval_problems < 0:
            raise ValueError("rl_num_problems must be >= 1 and rl_eval_problems >= 0")
        if self.rl_steps not in (None, "lines", "blocks"):
            raise ValueError(f"rl_steps must be 'lines' or 'blocks', got {self.rl_steps!r}")


def rl_dataclasses() -> tuple[type, ...]:
    from llm2diff.rl.grpo import DiffusionGRPOConfig

    return (RLArguments, DiffusionGRPOConfig)


def prompt_for(dlm, task, row: dict):
    """The prompt in the policy's own format: chat messages (the trainer applies the template) or plain text."""
    from llm2diff.evaluation.runner import PromptRenderer

    render = PromptRenderer(dlm)
    if render.chat:
        messages = task.messages(row, [])
        if dlm.config.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": dlm.config.system_prompt}, *messages]
        return messages
    return dlm.tokenizer.decode(render(task, row, []), skip_special_tokens=False)


def outcome_reward(task):
    """A TRL reward function: 1.0 when the task's grader accepts the completion, else 0.0."""

    def reward(prompts, completions, row_json, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(task.grade(text, json.loads(row)).correct) for text, row in zip(texts, row_json)]

    reward.__name__ = f"{task.name}_correct"
    return reward


def prm_process_reward(prm, policy_tokenizer, by: str, block_size: int, eos_ids):
    """A `process_reward` callable for `DiffusionGRPOTrainer`: step spans and PRM scores of each completion."""
    from llm2diff.prm.model import check_tokenizer_match
    from llm2diff.prm.steps import step_ends

    check_tokenizer_match(prm, policy_tokenizer)
    tok = policy_tokenizer

    def process_reward(prompts, completions, completion_ids):
        prompt_ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prompt_ids.append(list(tok(prompt, add_special_tokens=False).input_ids))
            else:
                text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                prompt_ids.append(list(tok(text, add_special_tokens=False).input_ids))
        ends = [step_ends(ids, tok, by, block_size, eos_ids) for ids in completion_ids]
        keep = [i for i, e in enumerate(ends) if e]
        scores = [[] for _ in completion_ids]
        if keep:
            scored = prm.step_scores([prompt_ids[i] for i in keep], [list(completion_ids[i]) for i in keep],
                                     [ends[i] for i in keep])
            for i, s in zip(keep, scored):
                scores[i] = s
        spans = [[(0 if k == 0 else e[k - 1] + 1, end) for k, end in enumerate(e)] for e in ends]
        return spans, scores

    return process_reward


def run_rl(rl_args: RLArguments, grpo_args, recipe: dict[str, Any]) -> dict[str, Any]:
    """Train the policy with GRPO, save it, grade held-out problems. Returns the report.

    The output directory is locked for the run; `resume_from_checkpoint` continues from the newest complete
    checkpoint, and only a run of the same recipe and starting policy.
    """
    from llm2diff.recipe import RecipeError
    from llm2diff.rundir import check_run_record, check_writable, model_fingerprint, output_lock, resume_key
    from llm2diff.star.config import StarArguments
    from llm2diff.star.rounds import check_task
    from llm2diff.training.checkpoints import checkpoints
    from llm2diff.training.run import resume_checkpoint

    if not rl_args.rl_policy:
        raise RecipeError("rl_policy is required: a saved llm2diff model with a LoRA adapter")
    if not Path(rl_args.rl_policy).is_dir():
        raise FileNotFoundError(f"rl_policy {rl_args.rl_policy!r} is not a directory written by llm2diff train")
    if grpo_args.process_weight > 0 and not rl_args.rl_prm:
        raise RecipeError("process_weight > 0 needs rl_prm: a PRM directory written by llm2diff prm")
    root = Path(grpo_args.output_dir)
    check_writable(root)
    task = check_task(StarArguments(star_task=rl_args.rl_task, star_task_options=rl_args.rl_task_options,
                                    star_rationalize=False))
    main_process = grpo_args.process_index == 0
    with output_lock(root, enabled=main_process):
        checkpoint = resume_checkpoint(grpo_args)
        if main_process:  # a resume must continue this very run: same recipe and starting policy
            check_run_record(root, {**resume_key(recipe), "policy": model_fingerprint(rl_args.rl_policy)},
                             what="RL run", replace=checkpoint is None and not checkpoints(root), recipe=recipe)
        return _run_rl(rl_args, grpo_args, recipe, task, root, checkpoint)


def _run_rl(rl_args: RLArguments, grpo_args, recipe: dict[str, Any], task, root: Path, checkpoint) -> dict[str, Any]:
    import datasets

    from llm2diff.modeling.loading import load
    from llm2diff.recipe import RecipeError
    from llm2diff.rl.grpo import DiffusionGRPOTrainer
    from llm2diff.training.checkpoints import checkpoint_step
    from llm2diff.training.run import finish_at_checkpoint

    dlm = load(rl_args.rl_policy, is_trainable=True)
    if not dlm.has_adapter:
        raise RecipeError(f"{rl_args.rl_policy} has no LoRA adapter; GRPO here trains adapters")
    rows = task.load_rows(rl_args.rl_source, rl_args.rl_split, rl_args.rl_num_problems)
    dataset = datasets.Dataset.from_list([{"prompt": prompt_for(dlm, task, row), "row_json": json.dumps(row)}
                                          for row in rows])
    process = None
    if rl_args.rl_prm and grpo_args.process_weight > 0:
        from llm2diff.prm.model import load_prm

        prm = load_prm(rl_args.rl_prm)
        by = rl_args.rl_steps or prm.config.step_segmentation
        process = prm_process_reward(prm, dlm.tokenizer, by, dlm.config.block_size, dlm.eos_token_ids)
    trainer = DiffusionGRPOTrainer(model=dlm, reward_funcs=[outcome_reward(task)], args=grpo_args,
                                   train_dataset=dataset, process_reward=process)
    start = time.perf_counter()
    if checkpoint is not None and checkpoint_step(checkpoint) == grpo_args.max_steps:
        result = finish_at_checkpoint(trainer, checkpoint)  # the trainer would take one step more
    else:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {"recipe": recipe, "train": result.metrics, "train_seconds": round(seconds, 1),
                              "num_processes": trainer.accelerator.num_processes,
                              "rewards": [e for e in trainer.state.log_history if "reward" in e]}
    if trainer.accelerator.is_main_process:
        dlm.config.training = {"recipe": recipe, "seed": grpo_args.seed, "stage": "rl",
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        dlm.save_pretrained(root / "model", selected_adapters=["default"])
        if rl_args.rl_eval_problems:
            from llm2diff.evaluation.runner import EvalConfig, run_eval

            summary = run_eval(EvalConfig(model=str(root / "model"), task=rl_args.rl_task, source=rl_args.rl_source,
                                          split=rl_args.rl_eval_split, limit=rl_args.rl_eval_problems,
                                          task_options=rl_args.rl_task_options,
                                          max_new_tokens=grpo_args.max_completion_length,
                                          batch_size=rl_args.rl_eval_batch_size, seed=grpo_args.seed,
                                          output_dir=str(root / "eval"),
                                          # graded as STaR grades its rounds: one token per step, greedy
                                          decoding={"mode": "block", "tokens_per_step": 1, "temperature": 0.0}))
            report["accuracy"] = summary["metrics"]["accuracy"]
        write_json_atomic(root / "rl_report.json", report)
    return report
