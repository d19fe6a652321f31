"""Benchmark: generation throughput of a diffusion model against its AR parent on the same GSM8K-style prompts.

Prints tokens/s, forward passes per token (NFE/token) and accuracy for the block sampler and for the AR parent's
greedy `generate` (adapter off, same weights), and the diffusion/AR throughput ratio. Asserts nothing.

    python benchmarks/eval_speed.py --model outputs/quickstart                      # built-in arithmetic, 50 problems
    python benchmarks/eval_speed.py --model outputs/quickstart --data ../shared/data/gsm8k/train.jsonl --limit 50
    python benchmarks/eval_speed.py --model outputs/quickstart --threshold 0.9 --threads 2
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart", help="a saved llm2diff model with a LoRA adapter")
    parser.add_argument("--data", default=None, help="GSM8K-format JSONL (question/answer); default: built-in task")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tokens-per-step", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from llm2diff import load
    from llm2diff.evaluation.exact_match import evaluate_answers
    from llm2diff.hardware import describe
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import load_raw_dataset

    torch.set_num_threads(args.threads)
    dlm = load(args.model)
    c = dlm.config
    recipe = (c.training or {}).get("recipe", {})
    if args.data:
        data_args = DataArguments(dataset_name=args.data, system_prompt=c.system_prompt,
                                  use_chat_template=c.use_chat_template, prompt_template=c.prompt_template)
        problems = list(load_raw_dataset(data_args, "train"))[: args.limit]
    else:
        data_args = DataArguments(
            dataset_name="builtin:arithmetic", builtin_num_eval=args.limit, system_prompt=c.system_prompt,
            builtin_max_operand=recipe.get("builtin_max_operand", 10), builtin_operations=recipe.get("builtin_operations", "+-"),
            builtin_min_steps=recipe.get("builtin_min_steps", 1), builtin_max_steps=recipe.get("builtin_max_steps", 2),
            use_chat_template=c.use_chat_template, prompt_template=c.prompt_template)
        problems = list(load_raw_dataset(data_args, "test"))
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    diffusion = evaluate_answers(dlm, problems, data_args, tokens_per_step=args.tokens_per_step,
                                 threshold=args.threshold, **common)
    parent = evaluate_answers(dlm, problems, data_args, use_parent=True, **common)

    print(f"model {args.model} (block size {c.block_size}), {len(problems)} problems, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}")
    print(f"hardware: {describe(args.threads, dlm.model.device)}")
    print(f"{'':40s} {'accuracy':>9s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'NFE/token':>10s}")
    for r in (diffusion, parent):
        print(f"{r.name:40s} {r.accuracy:9.1%} {r.new_tokens:7d} {r.seconds:8.1f} {r.tokens_per_second:9.1f} "
              f"{1 / r.tokens_per_forward if r.tokens_per_forward else float('nan'):10.3f}")
    ratio = diffusion.tokens_per_second / parent.tokens_per_second if parent.tokens_per_second else float("nan")
    print(f"ratio diffusion/AR tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
