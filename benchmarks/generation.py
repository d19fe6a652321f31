"""Benchmark: generation speed of the block sampler against the AR parent, each row with its accuracy.

On the quickstart model and the built-in task, one thread, the same prompts for every row, at batch size 1 and 8:
  - the AR parent's greedy `generate` (adapter off, same weights): the baseline tokens/s;
  - the AR twin (the quickstart recipe with `block_size: 1`), for the accuracy comparison;
  - the block sampler under each commit rule at a few settings: tokens/s, forward passes (NFE) per token, ratio;
  - for a model trained with `clean_attention: causal`, verified decoding (each block denoised by the threshold
    rule, then checked by the model's own causal stream: its greedy causal output) at a few thresholds;
  - lossless mode (a self-distilled adapter, `--lossless-model`): tokens/s, ratio, mean accepted draft length, and
    whether every output equals the parent's greedy output;
  - time for 128, 256 and 512 new tokens (end-of-sequence ignored), to show cost grows with the new tokens only.
Prints one table; asserts nothing.

    python benchmarks/generation.py                                   # outputs/quickstart, outputs/quickstart-ar-twin
    python benchmarks/generation.py --problems 20 --skip-lengths      # a quick look
    python benchmarks/generation.py --lossless-model outputs/quickstart-selfdistill
    python benchmarks/generation.py --model outputs/quickstart-fast-causal --dtype bfloat16 --check-verified 30
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# (name, sampler settings): each row of the diffusion part of the table
SETTINGS = [
    ("confidence, 1/step", {"tokens_per_step": 1}),
    ("confidence, 2/step", {"tokens_per_step": 2}),
    ("threshold 0.9", {"commit_rule": "threshold", "threshold": 0.9}),
    ("threshold 0.7", {"commit_rule": "threshold", "threshold": 0.7}),
    ("threshold 0.5", {"commit_rule": "threshold", "threshold": 0.5}),
    ("margin 0.5", {"commit_rule": "margin", "threshold": 0.5}),
    ("entropy 0.5", {"commit_rule": "entropy", "entropy_bound": 0.5}),
    ("entropy 2.0", {"commit_rule": "entropy", "entropy_bound": 2.0}),
    ("random, 2/step", {"commit_rule": "random", "tokens_per_step": 2, "seed": 0}),
    ("threshold 0.7 + correction", {"commit_rule": "threshold", "threshold": 0.7, "remask_threshold": 0.3,
                                    "remask_budget": 1}),
    ("one step per block", {"max_steps_per_block": 1}),
    ("threshold 0.7 + correction, LoRA merged", {"commit_rule": "threshold", "threshold": 0.7, "remask_threshold": 0.3,
                                                 "remask_budget": 1, "merge_lora": True}),
    ("verified, threshold 0.9", {"mode": "verified", "threshold": 0.9}),
    ("verified, threshold 0.7", {"mode": "verified", "threshold": 0.7}),
    ("verified, threshold 0.5", {"mode": "verified", "threshold": 0.5}),
    ("verified, threshold 0.7, LoRA merged", {"mode": "verified", "threshold": 0.7, "merge_lora": True}),
]


def problems_for(dlm, count: int):
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import load_raw_dataset

    c = dlm.config
    recipe = (c.training or {}).get("recipe", {})
    data_args = DataArguments(
        dataset_name="builtin:arithmetic", builtin_num_eval=count, system_prompt=c.system_prompt,
        builtin_max_operand=recipe.get("builtin_max_operand", 10), builtin_operations=recipe.get("builtin_operations", "+-"),
        builtin_min_steps=recipe.get("builtin_min_steps", 1), builtin_max_steps=recipe.get("builtin_max_steps", 2),
        use_chat_template=c.use_chat_template, prompt_template=c.prompt_template)
    return list(load_raw_dataset(data_args, "test")), data_args


def length_scaling(dlm, data_args, problem, lengths, settings) -> list[tuple[int, float, float, float]]:
    """Seconds for each length with end-of-sequence ignored, for the AR parent and the sampler, and the sampler's
    forward passes per token."""
    import torch

    from llm2diff.evaluation.completions import left_pad
    from llm2diff.training.data import render_example

    ids, mask = left_pad([render_example({"question": problem["question"], "answer": ""}, dlm.tokenizer,
                                         data_args)[0]], dlm.tokenizer.pad_token_id)
    eos = type(dlm).eos_token_ids
    rows = []
    try:
        type(dlm).eos_token_ids = property(lambda self: ())  # ignore end-of-sequence: always the full length
        for n in lengths:
            start = time.perf_counter()
            dlm.ar_generate(ids, mask, max_new_tokens=n, min_new_tokens=n)
            ar = time.perf_counter() - start
            start = time.perf_counter()
            out = dlm.generate(ids, mask, max_new_tokens=n, **settings)
            dif = time.perf_counter() - start
            assert int(out.num_new_tokens[0]) == n
            rows.append((n, ar, dif, out.nfe / n))
    finally:
        type(dlm).eos_token_ids = eos
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def lossless_row(dlm, problems, data_args, max_new_tokens: int, merge_lora: bool = False, parent_tail: int = 0) -> dict:
    """Parent greedy `generate` and lossless mode on the same prompts, one at a time: speed and equality."""
    from llm2diff.evaluation.completions import left_pad
    from llm2diff.training.data import render_example

    parent_s = lossless_s = 0.0
    tokens = identical = 0
    accepted, verify = [], 0
    for problem in problems:
        ids, mask = left_pad([render_example({"question": problem["question"], "answer": ""}, dlm.tokenizer,
                                             data_args)[0]], dlm.tokenizer.pad_token_id)
        start = time.perf_counter()
        parent = dlm.ar_generate(ids, mask, max_new_tokens=max_new_tokens)
        parent_s += time.perf_counter() - start
        start = time.perf_counter()
        out = dlm.generate(ids, mask, max_new_tokens=max_new_tokens, mode="lossless", merge_lora=merge_lora,
                           parent_tail=parent_tail)
        lossless_s += time.perf_counter() - start
        identical += int(same_tokens(parent, out.sequences))
        tokens += int(out.num_new_tokens.sum())
        accepted += out.accepted_lengths
        verify += out.nfe_verify
    recipe = (dlm.config.training or {}).get("recipe", {})
    name = "self-distilled" if recipe.get("self_distill") else "quickstart"
    merged = ", LoRA merged" if merge_lora else ""
    tail = f", parent tail {parent_tail}" if parent_tail else ""
    return {"model": f"{name} drafter, block {dlm.config.block_size}{merged}{tail}",
            "parent_tps": tokens / parent_s, "lossless_tps": tokens / lossless_s, "ratio": parent_s / lossless_s,
            "mean_accepted": sum(accepted) / max(len(accepted), 1), "verify_per_token": verify / max(tokens, 1),
            "identical": identical, "rows": len(problems)}


def verified_identical(dlm, problems, data_args, max_new_tokens: int, threshold: float) -> tuple[int, int]:
    """How many of `problems` verified decoding answers with exactly the model's own greedy `generate` (adapter on,
    one prompt at a time, in the model's dtype): (equal, checked)."""
    import torch

    from llm2diff.evaluation.completions import left_pad
    from llm2diff.sampling.lossless import parent_suppressed_ids
    from llm2diff.training.data import render_example

    equal = 0
    for problem in problems:
        ids, mask = left_pad([render_example({"question": problem["question"], "answer": ""}, dlm.tokenizer,
                                             data_args)[0]], dlm.tokenizer.pad_token_id)
        with torch.inference_mode(), dlm.trained_token_rows_merged():
            greedy = dlm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, suppress_tokens=parent_suppressed_ids(dlm),
                                        pad_token_id=dlm.tokenizer.pad_token_id)
        out = dlm.generate(ids, mask, max_new_tokens=max_new_tokens, mode="verified", threshold=threshold)
        width = ids.shape[1]
        new = out.sequences[0, width: width + int(out.num_new_tokens[0])].tolist()
        equal += int(greedy[0, width: width + len(new)].tolist() == new)
    return equal, len(problems)


def same_tokens(a, b) -> bool:
    """Equal sequences, allowing one of them to carry extra trailing padding columns (0 = pad id here or not)."""
    import torch

    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b))
    return bool(torch.equal(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart")
    parser.add_argument("--twin", default="outputs/quickstart-ar-twin", help="the AR twin (block size 1); skipped if absent")
    parser.add_argument("--lossless-model", default=None, help="the drafter for lossless mode, e.g. a "
                        "self-distilled adapter (default: --model)")
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights dtype of every model in the run (the AR parent's too). On a CPU with AMX "
                             "(bfloat16 tiles), a bfloat16 pass over 8-32 positions costs little more than one over 1; "
                             "without AMX bfloat16 is slower than float32 (a warning says so)")
    parser.add_argument("--only", default=None,
                        help="setting names to run, separated by ';' (names hold commas), e.g. "
                             "'threshold 0.7;one step per block' (default: all)")
    parser.add_argument("--skip-lengths", action="store_true")
    parser.add_argument("--skip-lossless", action="store_true")
    parser.add_argument("--skip-diffusion", action="store_true",
                        help="only the lossless rows (and the length rows unless --skip-lengths)")
    parser.add_argument("--check-verified", type=int, default=0, metavar="N",
                        help="for a causal-clean model: on the first N problems, whether verified decoding "
                             "(threshold 0.7) returns exactly the model's own greedy generate (default 0: skip)")
    parser.add_argument("--parent-tails", default="0,2",
                        help="lossless rows for each parent_tail value (the parent decodes a block's last N "
                             "positions alone), comma-separated")
    args = parser.parse_args()

    import torch

    from llm2diff import load
    from llm2diff.evaluation.exact_match import evaluate_answers
    from llm2diff.hardware import describe, warn_if_slow_dtype

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dlm = load(args.model, dtype=dtype)
    warn_if_slow_dtype(dtype, dlm.model.device, hint="leave out --dtype bfloat16")
    problems, data_args = problems_for(dlm, args.problems)
    print(f"model {args.model} (block size {dlm.config.block_size}), {len(problems)} built-in problems, "
          f"max_new_tokens {args.max_new_tokens}, {args.dtype}", flush=True)
    print(f"hardware: {describe(args.threads, dlm.model.device)}", flush=True)
    wanted = [name.strip() for name in (args.only or "").split(";") if name.strip()]
    unknown = [name for name in wanted if name not in dict(SETTINGS)]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {'; '.join(name for name, _ in SETTINGS)}")
    settings = [s for s in SETTINGS if s[0] in wanted] if wanted else SETTINGS
    if not dlm.config.causal_clean:  # verified decoding needs a causal clean stream
        settings = [(name, kwargs) for name, kwargs in settings if kwargs.get("mode") != "verified"]
    table, lossless_rows = [], []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        common = {"max_new_tokens": args.max_new_tokens, "batch_size": batch}
        if not args.skip_diffusion:
            base = evaluate_answers(dlm, problems, data_args, use_parent=True, name="AR parent (greedy generate)",
                                    **common)
            table.append((batch, base, base))
        if Path(args.twin).is_dir() and not args.skip_diffusion:
            twin = load(args.twin, dtype=dtype)
            table.append((batch, evaluate_answers(twin, problems, data_args, name="AR twin (block 1)", **common), base))
            del twin
        for name, kwargs in ([] if args.skip_diffusion else settings):
            result = evaluate_answers(dlm, problems, data_args, name=f"diffusion: {name}", **{**common, **kwargs})
            table.append((batch, result, base))
            print(f"  batch {batch} {name}: {result.tokens_per_second:.1f} tokens/s, accuracy {result.accuracy:.0%}",
                  flush=True)
        if batch == 1 and not args.skip_lossless:
            for drafter in [load(args.lossless_model, dtype=dtype) if args.lossless_model else dlm]:
                for merge in (False, True):
                    for tail in (int(t) for t in args.parent_tails.split(",")):
                        lossless_rows.append(lossless_row(drafter, problems, data_args, args.max_new_tokens, merge,
                                                          tail))

    print("\n| batch | sampler | accuracy | tokens/s | ratio to AR parent | NFE/token |")
    print("|---|---|---|---|---|---|")
    for batch, r, base in table:
        ratio = r.tokens_per_second / base.tokens_per_second if base.tokens_per_second else float("nan")
        nfe = 1 / r.tokens_per_forward if r.tokens_per_forward else float("nan")
        print(f"| {batch} | {r.name} | {r.accuracy:.0%} | {r.tokens_per_second:.1f} | {ratio:.2f}x | {nfe:.3f} |")

    if lossless_rows:
        print("\n| lossless (batch 1) | parent tokens/s | lossless tokens/s | ratio | mean accepted draft length | "
              "parent passes per token | outputs identical |")
        print("|---|---|---|---|---|---|---|")
    for row in lossless_rows:
        print(f"| {row['model']} | {row['parent_tps']:.1f} | {row['lossless_tps']:.1f} | {row['ratio']:.2f}x | "
              f"{row['mean_accepted']:.2f} | {row['verify_per_token']:.3f} | {row['identical']} of {row['rows']} |")

    if args.check_verified and dlm.config.causal_clean:
        equal, checked = verified_identical(dlm, problems[: args.check_verified], data_args, args.max_new_tokens, 0.7)
        print(f"\nverified decoding (threshold 0.7) = the model's greedy generate ({args.dtype}): {equal} of "
              f"{checked} problems")

    if not args.skip_lengths:
        best = dict(SETTINGS)["threshold 0.7"]
        rows = length_scaling(dlm, data_args, problems[0], (128, 256, 512), best)
        print("\n| new tokens (eos ignored) | AR parent s | diffusion (threshold 0.7) s | diffusion time / previous | "
              "diffusion NFE/token |")
        print("|---|---|---|---|---|")
        previous = None
        for n, ar, dif, nfe in rows:
            growth = "-" if previous is None else f"{dif / previous:.2f}x"
            print(f"| {n} | {ar:.2f} | {dif:.2f} | {growth} | {nfe:.3f} |")
            previous = dif


if __name__ == "__main__":
    main()
