"""Reasoning steps of a response and their labels: by lines or by diffusion blocks, exact or from rollouts.

    ends = step_ends(response_ids, tokenizer, by="lines")          # index of each step's last token
    exact = arithmetic_step_labels(response_text, row)              # built-in task: the generator knows each value
    soft, hard = rollout_labels(dlm, task, row, prompt_ids, response_ids, ends, num_rollouts=8, seed=0)

A step's label sits on its last token. Rollout labels follow Math-Shepherd (Wang et al. 2024, "Math-Shepherd:
Verify and Reinforce LLMs Step-by-step without Human Annotations"): from the prefix that ends with the step, the
current policy completes the solution N times; the soft label is the fraction of completions the task's grader
accepts, the hard label whether any is. The block sampler continues from a prefix that ends inside a block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm2diff.tasks.arithmetic import step_labels as arithmetic_step_labels  # noqa: F401  (the built-in task's)

SEGMENTATIONS = ("lines", "blocks")


def step_ends(
    response_ids: Sequence[int], tokenizer=None, by: str = "lines", block_size: int | None = None,
    eos_ids: Sequence[int] = (),
) -> list[int]:
    """Indices of the last token of each step of a response.

    by="lines": a step ends with a token whose text contains a newline (so "5 + 3 = 8\\n" is one step), and the last
    step with the last token; by="blocks": every `block_size` tokens (the units the block sampler commits). Trailing
    end-of-sequence tokens belong to the last step and never end one themselves.
    """
    if by not in SEGMENTATIONS:
        raise ValueError(f"step segmentation must be one of {', '.join(SEGMENTATIONS)}, got {by!r}")
    ids = list(response_ids)
    last = len(ids) - 1
    while last >= 0 and ids[last] in set(eos_ids):
        last -= 1
    if last < 0:
        return []
    if by == "blocks":
        if not block_size or block_size < 1:
            raise ValueError("step segmentation by blocks needs the model's block_size")
        ends = list(range(block_size - 1, last, block_size))
    else:
        if tokenizer is None:
            raise ValueError("step segmentation by lines needs the tokenizer")
        ends = [i for i in range(last) if "\n" in tokenizer.decode([ids[i]])]
    return ends + [last]


@torch.no_grad()
def rollout_labels(
    policy, task, row: dict, prompt_ids: Sequence[int], response_ids: Sequence[int], ends: Sequence[int],
    num_rollouts: int = 8, max_new_tokens: int = 96, temperature: float = 1.0, seed: int = 0,
    decoding: dict | None = None,
) -> tuple[list[float], list[int]]:
    """Math-Shepherd labels of each step by completing the solution from the step's prefix.

    Args:
        policy: a `DiffusionLM` (anything with its `generate(input_ids, attention_mask, decoding=...,
            response_prefix=...)`).
        task: the task whose `grade(text, row)` decides whether a completion is right.
        ends: each step's last token index in `response_ids`.
        decoding: further decoding settings of the rollouts (e.g. a threshold), over the policy's saved ones; the
            rollouts always use the block sampler, at `temperature`, `max_new_tokens` past the prefix.

    Returns:
        (soft, hard): per step, the fraction of `num_rollouts` completions graded correct, and whether any was.
    """
    if num_rollouts < 1:
        raise ValueError(f"num_rollouts must be >= 1, got {num_rollouts}")
    from llm2diff.evaluation.completions import complete

    tok = policy.tokenizer
    response = list(response_ids)
    prompts = [list(prompt_ids)] * num_rollouts
    soft, hard = [], []
    for s, end in enumerate(ends):
        prefix = torch.tensor([response[: end + 1]] * num_rollouts)
        rollout = {"temperature": temperature, "max_new_tokens": max_new_tokens, **(decoding or {}), "mode": "block"}
        done = complete(policy, prompts, rollout, seed=seed + s, response_prefix=prefix)
        correct = 0
        for completion in done.rows:
            text = tok.decode(response[: end + 1] + completion.tokens, skip_special_tokens=True)
            correct += bool(task.grade(text, row).correct)
        soft.append(correct / num_rollouts)
        hard.append(int(correct > 0))
    return soft, hard
