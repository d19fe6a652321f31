"""Benchmark: the PRM at inference. Best-of-k by a process reward model against majority vote and a single sample.

Samples k solutions per held-out problem once (the block sampler at the given temperature) and scores every rule
on the same samples (`llm2diff.prm.select`): the first sample, majority vote over final answers, best-of-k by the
PRM's lowest or last step score, and the oracle (pass@k). Prints accuracy and the policy's passes per problem for
each rule (with --step-search also the PRM-guided search that builds a solution line by line from k candidates
per step), with the paired difference of each rule against the single sample (95% bootstrap interval over
problems), and writes the rows to --out. Asserts nothing.

    python benchmarks/prm_selection.py --model outputs/quickstart --prm outputs/quickstart-prm/prm --k 8
    python benchmarks/prm_selection.py --model outputs/quickstart --prm outputs/quickstart-prm/prm --k 4 --step-search
    python benchmarks/prm_selection.py --model outputs/quickstart --k 8          # without a PRM: single, majority, oracle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart")
    parser.add_argument("--prm", default=None, help="a trained PRM directory (llm2diff prm writes <output_dir>/prm)")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--task-options", default=None, help="the task's options as JSON")
    parser.add_argument("--split", default="test")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--step-search", action="store_true",
                        help="also the PRM-guided step search (k candidate lines per step, the PRM keeps the best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/prm_selection.json")
    args = parser.parse_args()

    import torch

    from llm2diff import load
    from llm2diff.atomic import write_json_atomic
    from llm2diff.evaluation.intervals import format_difference, paired_difference
    from llm2diff.hardware import describe
    from llm2diff.prm.select import compare_selection, selection_table
    from llm2diff.tasks.base import get_task, parse_task_options

    torch.set_num_threads(args.threads)
    dlm = load(args.model)
    prm = None
    if args.prm:
        from llm2diff.prm import load_prm

        prm = load_prm(args.prm)
    task = get_task(args.task, **parse_task_options(args.task_options, args.task))
    rows = task.load_rows(None, args.split, args.problems)
    print(f"model {args.model}, PRM {args.prm or 'none'}, {len(rows)} {args.task} problems ({args.split}), k={args.k}, "
          f"temperature {args.temperature}, seed {args.seed}", flush=True)
    print(f"hardware: {describe(args.threads, dlm.model.device)}", flush=True)
    result = compare_selection(dlm, task, rows, k=args.k, prm=prm, seed=args.seed, step_search=args.step_search,
                               decoding={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens})
    print(selection_table(result))
    single = [p["correct"][0] for p in result.chosen]
    differences = {}
    for rule in result.correct:
        if rule in ("single", "oracle"):
            continue
        right = [p["step_search_correct"] if rule == "prm-steps" else p["correct"][p["picks"][rule]]
                 for p in result.chosen]
        d = paired_difference(single, right)
        differences[rule] = d.to_dict()
        print(f"{rule} vs single: {format_difference(d)}")
    write_json_atomic(Path(args.out), {**result.to_dict(), "vs_single": differences, "args": vars(args)})


if __name__ == "__main__":
    main()
