"""Reasoning steps: segmentation, exact labels on the built-in task, Math-Shepherd rollout labels."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff.prm.steps import arithmetic_step_labels, rollout_labels, step_ends
from llm2diff.tasks.arithmetic import _STEP_LINE, apply_operation, step_equations
from llm2diff.tasks.base import get_task

ROW = {"question": "Leo has 1 shell. He finds 2 more shells. Then he gets 9 more shells. How many?",
       "answer": "Leo starts with 1 shell.\n1 + 2 = 3\n3 + 9 = 12\n#### 12"}


class CharTokenizer:
    """One token per character (id = code point); pad 0, end-of-sequence 1."""

    pad_token_id, eos_token_id = 0, 1

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i > 1)


def test_step_ends_by_lines_and_by_blocks():
    tok = CharTokenizer()
    ids = tok.encode("ab\ncd\nef") + [1, 1]
    assert step_ends(ids, tok, "lines", eos_ids=(1,)) == [2, 5, 7]
    assert step_ends(ids, None, "blocks", block_size=4, eos_ids=(1,)) == [3, 7]
    assert step_ends(ids, None, "blocks", block_size=3, eos_ids=(1,)) == [2, 5, 7]
    assert step_ends([1, 1], tok, "lines", eos_ids=(1,)) == []
    with pytest.raises(ValueError, match="must be one of lines, blocks"):
        step_ends(ids, tok, "sentences")
    with pytest.raises(ValueError, match="needs the model's block_size"):
        step_ends(ids, None, "blocks")


def test_exact_arithmetic_labels():
    assert arithmetic_step_labels(ROW["answer"], ROW) == [1, 1, 1, 1]
    assert arithmetic_step_labels("Leo starts with 1 shell.\n1 + 2 = 4\n4 + 9 = 13\n#### 13", ROW) == [1, 0, 0, 0]
    assert arithmetic_step_labels("Leo starts with 1 shell.\n1 + 2 = 3\n3 + 9 = 12\n#### 13", ROW) == [1, 1, 1, 0]
    assert arithmetic_step_labels("Leo starts with 1 shell.\n1 + 2 = 3\n3 + 8 = 11\n#### 11", ROW) == [1, 1, 0, 0]


class FaithfulPolicy:
    """A stand-in policy that continues a solution by computing the remaining gold operations from the last value it
    reads in the prefix (so a wrong step propagates), flipping the final answer with probability `noise`."""

    def __init__(self, row, noise=0.0):
        self.tokenizer = CharTokenizer()
        self.eos_token_ids = (1,)
        self.ops = [(op, b) for _, op, b, _ in step_equations(row["answer"])]
        self.start = step_equations(row["answer"])[0][0]
        self.noise = noise

    def generate(self, input_ids, attention_mask, decoding, seed, response_prefix):
        assert decoding["mode"] == "block"
        max_new_tokens = decoding["max_new_tokens"]
        rng = random.Random(seed)
        tok = self.tokenizer
        rows, num_new = [], []
        for prompt, prefix in zip(input_ids.tolist(), response_prefix.tolist()):
            text = tok.decode(prefix)
            lines = [m for m in (_STEP_LINE.match(line) for line in text.split("\n")) if m]
            value = int(lines[-1][4]) if lines else self.start
            rest = ""
            if "####" not in text:
                for op, b in self.ops[len(lines):]:
                    new = apply_operation(value, op, b)
                    rest += f"\n{value} {op} {b} = {new}"
                    value = new
                final = value + (1 if rng.random() < self.noise else 0)
                rest += f"\n#### {final}"
            rows.append(prompt + prefix + tok.encode(rest) + [1])
            num_new.append(len(tok.encode(rest)) + 1)
        width = max(len(r) for r in rows)
        return SimpleNamespace(sequences=torch.tensor([r + [0] * (width - len(r)) for r in rows]), nfe=1,
                               num_new_tokens=torch.tensor(num_new), nfe_per_row=torch.ones(len(rows), dtype=torch.long))


@pytest.mark.parametrize("response", [
    ROW["answer"],
    "Leo starts with 1 shell.\n1 + 2 = 4\n4 + 9 = 13\n#### 13",
    "Leo starts with 1 shell.\n1 + 2 = 3\n3 + 8 = 11\n#### 11",
])
def test_rollout_labels_agree_with_exact_labels(response):
    policy = FaithfulPolicy(ROW)
    tok = policy.tokenizer
    ids = tok.encode(response) + [1]
    ends = step_ends(ids, tok, "lines", eos_ids=(1,))
    soft, hard = rollout_labels(policy, get_task("arithmetic"), ROW, tok.encode("Q"), ids, ends, num_rollouts=4)
    exact = arithmetic_step_labels(response, ROW)
    assert hard == exact and soft == [float(x) for x in exact]


def test_soft_labels_are_the_fraction_of_correct_rollouts():
    policy = FaithfulPolicy(ROW, noise=0.5)
    tok = policy.tokenizer
    ids = tok.encode(ROW["answer"]) + [1]
    ends = step_ends(ids, tok, "lines", eos_ids=(1,))
    soft, hard = rollout_labels(policy, get_task("arithmetic"), ROW, tok.encode("Q"), ids, ends, num_rollouts=40)
    assert all(0.3 < s < 0.7 for s in soft[:3]) and soft[3] == 1.0  # the last prefix already holds "#### 12"
    assert hard == [1, 1, 1, 1]


def test_rollouts_with_a_real_block_sampler_continue_inside_blocks():
    from llm2diff import adapt

    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)
    task = get_task("arithmetic")
    row = {"question": "tom has 3 apples", "answer": "3 + 4 = 7\n#### 7"}
    response = dlm.tokenizer("3 + 4 = 7 #### 7", add_special_tokens=False).input_ids
    ends = [2, 5]  # the second prefix (6 tokens) ends inside the second block
    first = rollout_labels(dlm, task, row, [5, 6, 7], response, ends, num_rollouts=3, max_new_tokens=6, seed=3)
    again = rollout_labels(dlm, task, row, [5, 6, 7], response, ends, num_rollouts=3, max_new_tokens=6, seed=3)
    assert first == again and len(first[0]) == 2
    assert all(s in (0.0, 1 / 3, 2 / 3, 1.0) for s in first[0])
    with pytest.raises(ValueError, match="num_rollouts must be >= 1"):
        rollout_labels(dlm, task, row, [5], response, ends, num_rollouts=0)
