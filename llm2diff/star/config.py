"""`StarArguments`: the recipe keys of self-training rounds (`llm2diff star`), beside the training recipe's keys.

A STaR recipe is a training recipe (model, data, diffusion and trainer keys: they define round 0 and how each round
fine-tunes) plus these `star_*` keys. See docs/star.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESTARTS = ("initial", "previous")


@dataclass
class StarArguments:
    star_task: str = field(default="arithmetic", metadata={
        "help": "Task whose problems are solved and graded: arithmetic, gsm8k, arc_agi (any task with a grader)."})
    star_task_options: str | None = field(default=None, metadata={
        "help": "Task constructor options as JSON, e.g. '{\"max_operand\": 10}' for arithmetic."})
    star_source: str | None = field(default=None, metadata={
        "help": "Where the task's rows come from (hub name or local path); default: the task's own."})
    star_train_split: str = field(default="train", metadata={"help": "Split whose problems are sampled each round."})
    star_eval_split: str = field(default="test", metadata={"help": "Held-out split graded after each round."})
    star_num_problems: int = field(default=200, metadata={"help": "Training problems sampled per round."})
    star_eval_problems: int = field(default=100, metadata={"help": "Held-out problems graded per round."})
    star_rounds: int = field(default=3, metadata={
        "help": "Rounds after round 0. Raising it and re-running the command continues a finished run."})
    star_samples_per_problem: int = field(default=4, metadata={"help": "Rationales sampled per problem (k)."})
    star_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature for rationales."})
    star_top_p: float | None = field(default=None, metadata={"help": "Sampling top-p for rationales."})
    star_tokens_per_step: int = field(default=1, metadata={"help": "Sampler: tokens committed per step."})
    star_threshold: float | None = field(default=None, metadata={
        "help": "Sampler: also commit every token above this confidence (faster sampling)."})
    star_max_new_tokens: int = field(default=96, metadata={"help": "Token budget per rationale."})
    star_batch_size: int = field(default=32, metadata={"help": "Sequences per generate call."})
    star_rationalize: bool = field(default=True, metadata={
        "help": "For problems with no correct sample, re-sample with the answer as a hint; keep correct rationales "
                "(stored without the hint)."})
    star_hint_template: str = field(default="{question}\nHint: the final answer is {answer}.", metadata={
        "help": "Prompt used for rationalization; must contain {question} and {answer}."})
    star_max_per_problem: int = field(default=1, metadata={"help": "Kept rationales per problem (after dedupe)."})
    star_mix_sft: int = field(default=0, metadata={
        "help": "Original SFT rows (the recipe's dataset, question/answer) mixed into each round's data."})
    star_restart: str = field(default="initial", metadata={
        "help": "'initial': fine-tune the round-0 model afresh each round (as in STaR); 'previous': continue from "
                "the last round's model."})
    star_train_steps: int = field(default=60, metadata={"help": "Training steps per round."})
    star_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the rounds' fine-tuning (default: the recipe's learning_rate, used by round 0)."})
    star_init_model: str | None = field(default=None, metadata={
        "help": "A saved llm2diff model to start from (round 0); default: train round 0 from the recipe."})
    star_eval_batch_size: int = field(default=25, metadata={"help": "Prompts per generate call when grading."})
    star_eval_threshold: float | None = field(default=None, metadata={
        "help": "Sampler threshold when grading (None = one token per step, greedy)."})

    def __post_init__(self) -> None:
        from llm2diff.tasks.base import TASKS

        if self.star_task not in TASKS:
            raise ValueError(f"unknown star_task {self.star_task!r}; available: {', '.join(sorted(TASKS))}")
        for name in ("star_samples_per_problem", "star_num_problems", "star_eval_problems", "star_rounds",
                     "star_max_new_tokens", "star_batch_size", "star_max_per_problem", "star_train_steps",
                     "star_eval_batch_size", "star_tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.star_mix_sft < 0:
            raise ValueError(f"star_mix_sft must be >= 0, got {self.star_mix_sft}")
        if self.star_restart not in RESTARTS:
            raise ValueError(f"star_restart must be one of {', '.join(RESTARTS)}, got {self.star_restart!r}")
        if self.star_rationalize and not all(k in self.star_hint_template for k in ("{question}", "{answer}")):
            raise ValueError("star_hint_template must contain {question} and {answer}, got "
                             f"{self.star_hint_template!r}")
        if self.star_learning_rate is not None and self.star_learning_rate <= 0:
            raise ValueError(f"star_learning_rate must be > 0, got {self.star_learning_rate}")
        if self.star_temperature < 0:
            raise ValueError(f"star_temperature must be >= 0, got {self.star_temperature}")


def star_dataclasses() -> tuple[type, ...]:
    """The recipe dataclasses of `llm2diff star`: model, data and trainer keys plus `StarArguments`."""
    from llm2diff.recipe import recipe_dataclasses

    return recipe_dataclasses()[:3] + (StarArguments,)
