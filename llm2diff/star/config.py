"""`StarArguments`: the recipe keys of self-training rounds (`llm2diff star`), beside the training recipe's keys.

A STaR recipe is a training recipe (model, data, diffusion and trainer keys: they define round 0 and how each round
fine-tunes) plus these `star_*` keys. See docs/star.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2diff.recipe import DecodingLayer, decoding_field, fold_deprecated_keys

RESTARTS = ("initial", "previous")
FILTERS = ("answer", "steps", "prm")
BALANCES = ("none", "pass_rate")
SAMPLING = {"mode": "block", "temperature": 0.7, "tokens_per_step": 1}  # rationales: sampled, one token per step
GRADING = {"mode": "block", "temperature": 0.0, "tokens_per_step": 1}  # held-out problems: greedy, one per step


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
        "help": "Rounds after round 0 (0: train and grade round 0 only). Raising it and re-running the command "
                "continues a finished run."})
    star_samples_per_problem: int = field(default=4, metadata={"help": "Rationales sampled per problem (k)."})
    star_decoding: DecodingLayer | None = decoding_field(
        "How rationales are sampled: decoding settings over the round model's saved ones and STaR's defaults "
        "(the block sampler at temperature 0.7, one token per step), e.g. {temperature: 1.0, threshold: 0.9}.")
    star_max_new_tokens: int = field(default=96, metadata={"help": "Token budget per rationale (and per graded answer)."})
    star_batch_size: int = field(default=32, metadata={"help": "Sequences per generate call."})
    star_rationalize: bool = field(default=True, metadata={
        "help": "For problems with no correct sample, re-sample with the answer as a hint; keep correct rationales "
                "(stored without the hint)."})
    star_hint_template: str = field(default="{question}\nHint: the final answer is {answer}.", metadata={
        "help": "Prompt used for rationalization; must contain {question} and {answer}."})
    star_filter: str = field(default="answer", metadata={
        "help": "Which rationales a round keeps: 'answer' (the final answer is right, as in STaR), 'steps' (and "
                "every step is right by the task's exact step labels; the built-in arithmetic task has them) or "
                "'prm' (and every step scores at least star_prm_threshold by the process reward model star_prm). "
                "Where the task has step labels the round records how many answer-right rationales carry a wrong "
                "step."})
    star_prm: str | None = field(default=None, metadata={
        "help": "A trained process reward model (the prm/ directory `llm2diff prm` writes) for star_filter 'prm'."})
    star_prm_threshold: float = field(default=0.5, metadata={
        "help": "star_filter 'prm' keeps a rationale when its lowest step score is at least this."})
    star_max_per_problem: int = field(default=1, metadata={"help": "Kept rationales per problem (after dedupe)."})
    star_balance: str = field(default="none", metadata={
        "help": "'none': every kept rationale once; 'pass_rate': a problem solved by c of its k samples has its "
                "kept rationales repeated ceil(k / c) times (rationalized ones k times), so the problems the model "
                "rarely solves weigh as much as those it always solves (difficulty-aware rejection tuning)."})
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
    star_eval_decoding: DecodingLayer | None = decoding_field(
        "How every round's model is graded: decoding settings over the round model's saved ones and STaR's "
        "grading default (the block sampler, one token per step, greedy), e.g. {threshold: 0.9}.")
    # earlier releases' keys: folded into star_decoding / star_eval_decoding (with a message naming the new form)
    star_temperature: float | None = field(default=None, metadata={"help": "Deprecated: star_decoding.temperature."})
    star_top_p: float | None = field(default=None, metadata={"help": "Deprecated: star_decoding.top_p."})
    star_tokens_per_step: int | None = field(default=None, metadata={
        "help": "Deprecated: star_decoding.tokens_per_step."})
    star_threshold: float | None = field(default=None, metadata={"help": "Deprecated: star_decoding.threshold."})
    star_eval_threshold: float | None = field(default=None, metadata={
        "help": "Deprecated: star_eval_decoding.threshold."})

    def __post_init__(self) -> None:
        from llm2diff.tasks.base import TASKS

        fold_deprecated_keys(self, "star_decoding", {"star_temperature": "temperature", "star_top_p": "top_p",
                                                     "star_tokens_per_step": "tokens_per_step",
                                                     "star_threshold": "threshold"})
        fold_deprecated_keys(self, "star_eval_decoding", {"star_eval_threshold": "threshold"})

        if self.star_task not in TASKS:
            raise ValueError(f"unknown star_task {self.star_task!r}; available: {', '.join(sorted(TASKS))}")
        if self.star_rounds < 0:
            raise ValueError(f"star_rounds must be >= 0 (0 trains and grades round 0 only), got {self.star_rounds}")
        for name in ("star_samples_per_problem", "star_num_problems", "star_eval_problems",
                     "star_max_new_tokens", "star_batch_size", "star_max_per_problem", "star_train_steps",
                     "star_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.star_mix_sft < 0:
            raise ValueError(f"star_mix_sft must be >= 0, got {self.star_mix_sft}")
        if self.star_filter not in FILTERS:
            raise ValueError(f"star_filter must be one of {', '.join(FILTERS)}, got {self.star_filter!r}")
        if self.star_filter == "prm" and not self.star_prm:
            raise ValueError("star_filter 'prm' needs star_prm: the directory of a trained process reward model "
                             "(llm2diff prm writes it to <output_dir>/prm)")
        if not 0.0 <= self.star_prm_threshold <= 1.0:
            raise ValueError(f"star_prm_threshold must be in [0, 1] (a step score), got {self.star_prm_threshold}")
        if self.star_balance not in BALANCES:
            raise ValueError(f"star_balance must be one of {', '.join(BALANCES)}, got {self.star_balance!r}")
        if self.star_restart not in RESTARTS:
            raise ValueError(f"star_restart must be one of {', '.join(RESTARTS)}, got {self.star_restart!r}")
        if self.star_rationalize and not all(k in self.star_hint_template for k in ("{question}", "{answer}")):
            raise ValueError("star_hint_template must contain {question} and {answer}, got "
                             f"{self.star_hint_template!r}")
        if self.star_learning_rate is not None and self.star_learning_rate <= 0:
            raise ValueError(f"star_learning_rate must be > 0, got {self.star_learning_rate}")
        for which in ("sampling", "grading"):  # every setting valid: refused here, not rounds later
            self.decoding_for(which)

    def decoding_for(self, which: str) -> dict:
        """The decoding layer STaR puts over a model's saved decoding for `which` ("sampling" rationales or
        "grading" held-out problems): STaR's default, then `star_decoding` / `star_eval_decoding`."""
        from llm2diff.sampling.config import DecodingConfig

        base, layer = ((SAMPLING, self.star_decoding) if which == "sampling" else (GRADING, self.star_eval_decoding))
        merged = {**base, "max_new_tokens": self.star_max_new_tokens, **(layer or {})}
        DecodingConfig.resolve(merged)
        return merged


def star_dataclasses() -> tuple[type, ...]:
    """The recipe dataclasses of `llm2diff star`: model, data and trainer keys plus `StarArguments`."""
    from llm2diff.training.arguments import train_dataclasses

    return train_dataclasses()[:3] + (StarArguments,)
