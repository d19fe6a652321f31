"""Benchmark: does learned retraction fix committed mistakes? Planted errors, then accuracy against passes per token.

Two models on the built-in task (held-out problems of the kind each was trained on): --model, trained with editing
noise (default outputs/quickstart-fast-edit), and --baseline, the same recipe without it (outputs/quickstart-fast).
Each decodes with the correction methods below over its saved commit rule (threshold 0.7 for both recipes):

    none       no correction
    heuristic  remask_threshold 0.3, budget 1: remask a committed token whose probability fell (ReMDM-style)
    replace    edit_threshold E, budget 2: where the model now predicts another token with probability >= E at a
               committed position of the open block, put that token there (learned)
    remask     the same disputes, masked and denoised again (learned)
    reopen     replace, plus reopening finished blocks (reopen_threshold E, budget 2): the pass that appends a
               finished block reads it, and confident disputes there replace tokens and recompute the block
    reopen-last@E  (with --reopen-thresholds) reopening at E, and the last block judged too by one more pass where
               one of its tokens was committed below E (no later block's pass reads it)

1. Planted errors. Per problem, the model's own greedy answer (one token per step, no correction) is the
   reference. One position past its block's first, in a block after the first (a seeded choice among the
   answer's tokens), gets a wrong token: by default the model's own most likely other token there with the block
   still masked (the mistake it would plausibly commit early; --plant parent: the AR parent's most likely other
   token, an error the model itself would rarely make). Two scenarios, after the reference's earlier blocks:
   early, the wrong token committed while the rest of its block is masked (the block is then denoised under each
   method); finished, the block already completed around the error without correction (its other tokens follow
   it, as with the model's own mistakes; only reopening can act). Decoding runs on into the next block, whose
   first pass is where reopening reads the planted one. Detected: the token there changed; fixed: it is the
   reference token again. --outcome decodes every run on to the end and grades the answer: a plant is harmful
   when the answer is wrong without correction (the model's second choice is sometimes a sound alternative, which
   the reference-token count calls unfixed), and each method's recovered share is of the harmful plants. Every
   plant is recorded in the JSON (problem, position, tokens, what each method left there).
2. Accuracy against forward passes per token at batch 1, each method, and plain one-token-per-step decoding (what
   editing noise costs or gives there), with each method's paired difference against `none` of the same model
   (95% bootstrap interval over problems).
Prints the tables and writes them to --out with the settings and hardware, and a copy to the committed results
archive (benchmarks/results/retraction/retraction-<digest of the settings>.json). Asserts nothing.

    python benchmarks/retraction.py                                        # both quickstart-fast models, 100 problems
    python benchmarks/retraction.py --problems 20 --skip-accuracy          # the planted errors only, a quick look
    python benchmarks/retraction.py --model outputs/qs-edit --baseline outputs/quickstart-fast --edit-threshold 0.3
    python benchmarks/retraction.py --reopen-thresholds 0.3,0.7,0.9 --methods none,reopen@0.3,reopen@0.7,reopen@0.9
    python benchmarks/retraction.py --causal outputs/quickstart-fast-causal --reopen-thresholds 0.7,0.9

--causal adds a model trained with clean_attention: causal and the AR loss (recipes/quickstart-fast-causal.yaml):
there the pass that appends a finished block is the model's own AR stream, so reopening is judged causally (each
token from the tokens before it, not from the block around it, which was written to agree with the error), and its
accuracy table adds verified decoding (that stream checks every block) for comparison.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, arithmetic_held_out, settings_key  # noqa: E402

# the block sampler (a causal-clean model's saved decoding is verified decoding), no correction
NO_CORRECTION = {"mode": "block", "remask_threshold": None, "edit_threshold": None, "remask_budget": None,
                 "reopen_threshold": None}
VERIFIED = {"mode": "verified"}  # a causal-clean model's own AR stream checks every block (accuracy rows only)


def thresholds(text: str) -> list[float]:
    """`--reopen-thresholds`: comma-separated probabilities in (0, 1], e.g. `0.3,0.7,0.9` (argparse's type)."""
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            value = float(piece)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{piece!r} is not a number: give probabilities, e.g. 0.3,0.7,0.9")
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{value:g} is not a probability in (0, 1]: e.g. 0.3,0.7,0.9")
        values.append(value)
    return values


def methods(edit_threshold: float, reopen_thresholds=()) -> dict[str, dict]:
    """Each correction method as decoding settings over the model's saved commit rule; `reopen_thresholds` adds
    "reopen@E" rows: reopening at its own threshold E (in-block replacement still at `edit_threshold`), and
    "reopen-last@E": the same with the last block judged too where one of its tokens was committed below E
    (`reopen_last`, `reopen_last_below`; a planted block counts as unsure)."""
    reopen = {**NO_CORRECTION, "edit_threshold": edit_threshold, "edit_action": "replace", "remask_budget": 2,
              "reopen_budget": 2}
    return {
        "none": dict(NO_CORRECTION),
        "heuristic": {**NO_CORRECTION, "remask_threshold": 0.3, "remask_budget": 1},
        "replace": {**NO_CORRECTION, "edit_threshold": edit_threshold, "edit_action": "replace", "remask_budget": 2},
        "remask": {**NO_CORRECTION, "edit_threshold": edit_threshold, "edit_action": "remask", "remask_budget": 2},
        "reopen": {**reopen, "reopen_threshold": edit_threshold},
        **{f"reopen@{e:g}": {**reopen, "reopen_threshold": e} for e in reopen_thresholds},
        **{f"reopen-last@{e:g}": {**reopen, "reopen_threshold": e, "reopen_last": True, "reopen_last_below": e}
           for e in reopen_thresholds},
    }


ONE_PER_STEP = {**NO_CORRECTION, "commit_rule": "confidence", "threshold": None, "tokens_per_step": 1}


def plant_position(reference: list[int], block_size: int, eos_ids, rng: random.Random) -> int | None:
    """A position of the reference answer past its block's first, in a block after the first, before the
    end-of-sequence (None when the answer has no such position)."""
    end = next((i for i, t in enumerate(reference) if t in set(eos_ids)), len(reference))
    candidates = [i for i in range(block_size, end) if i % block_size]
    return rng.choice(candidates) if candidates else None


def parent_alternative(dlm, prompt: list[int], reference: list[int], position: int) -> int:
    """The AR parent's most likely token at `position` after the prompt and the reference before it, other than
    the reference token (and the mask token or spare rows)."""
    import torch

    from llm2diff.modeling.parent import parent_suppressed_ids

    ids = torch.tensor([prompt + reference[:position]], device=dlm.device)
    with dlm.ar_parent() as parent, torch.no_grad():
        logits = parent(input_ids=ids).logits[0, -1].float()
    logits[parent_suppressed_ids(dlm) + [reference[position]]] = float("-inf")
    return int(logits.argmax())


def model_alternative(dlm, prompt: list[int], reference: list[int], position: int) -> int:
    """The model's own most likely token at `position` other than the reference one, read as the block's first
    denoising step reads it (the reference's earlier blocks committed, the block all masked): the mistake it would
    most plausibly commit there early."""
    import torch

    from llm2diff.sampling.block_cache import BlockContext

    size = dlm.config.block_size
    block = position // size
    ids = torch.tensor([prompt], device=dlm.device)
    was_training = dlm.model.training
    dlm.model.eval()
    try:
        with torch.no_grad(), dlm.trained_token_rows_merged():
            ctx = BlockContext(dlm.model, ids, torch.ones_like(ids), size, dlm.config.shift,
                               causal_clean=dlm.config.causal_clean)
            for b in range(block):
                ctx.commit(torch.tensor([reference[b * size : (b + 1) * size]], device=dlm.device))
            logits = ctx.block_logits(torch.full((1, size), dlm.config.mask_token_id, device=dlm.device))[0]
    finally:
        dlm.model.train(was_training)
    from llm2diff.modeling.parent import parent_suppressed_ids

    scores = logits[position % size].float()
    scores[parent_suppressed_ids(dlm) + [reference[position]]] = float("-inf")
    return int(scores.argmax())


def reference_answer(dlm, prompt: list[int], max_new_tokens: int) -> list[int]:
    from llm2diff.evaluation.completions import complete

    return complete(dlm, [prompt], {**ONE_PER_STEP, "max_new_tokens": max_new_tokens}).rows[0].tokens


def planted(dlm, prompt: list[int], reference: list[int], position: int, wrong: int, layer: dict,
            finished: list[int] | None = None, to_end: int | None = None) -> tuple[int, list[int], list[int]]:
    """Decode the planted block again under `layer`, then the next block (reopening reads a finished block in the
    next block's first pass), or with `to_end` (the answer's token budget) on to the end of the answer under the
    model's stop rules. `finished`: the planted block already whole (every token committed, none to denoise: only
    reopening can change it); else only the wrong token is committed and the rest is denoised. Returns the token
    that ends up at `position`, the planted block as decoded, and the whole answer (the reference before the
    planted block, then what was decoded from there on)."""
    import torch

    from llm2diff.sampling.config import DecodingConfig
    from llm2diff.sampling.sampler import run_block_sampler

    size = dlm.config.block_size
    block = position // size
    prefix = torch.tensor([reference[: block * size]])
    if finished is not None:
        draft = torch.tensor([finished])
    else:
        draft = torch.full((1, size), dlm.config.mask_token_id)
        draft[0, position % size] = wrong
    budget = {"max_new_tokens": 2 * size, "stop_strings": []} if to_end is None else \
        {"max_new_tokens": max(to_end - block * size, size)}
    decoding = DecodingConfig.resolve(dlm.decoding, {**layer, **budget})
    ids = torch.tensor([prompt])
    out = run_block_sampler(dlm, ids, torch.ones_like(ids), decoding, prefix, draft)
    start = len(prompt) + block * size
    tail = out.sequences[0, start : start + int(out.num_new_tokens[0])].tolist()
    return (int(out.sequences[0, len(prompt) + position]), out.sequences[0, start : start + size].tolist(),
            reference[: block * size] + tail)


SCENARIOS = ("early", "finished")


def planted_errors(dlm, prompts, max_new_tokens: int, layers: dict[str, dict], seed: int = 0, progress=None,
                   source: str = "model", grade=None, records: list | None = None) -> dict:
    """Per scenario and method: planted errors detected and fixed (counts) over the problems with a position to
    plant at. `early`: the wrong token committed while the rest of its block is still masked (in-block correction
    can act as the block fills); `finished`: the block completed around it without correction, so its other tokens
    follow the error, as the model's own mistakes do (only reopening can act). `source`: the wrong token is the
    model's own second choice there ("model") or the AR parent's ("parent").

    `grade(i, tokens) -> bool` (problem index, answer tokens): every planted run also decodes on to the end of the
    answer and is graded, and each count adds `right` (answers graded right), `harmful` (plants in a right reference
    answer after which the answer is wrong without correction: a planted token that is a sound alternative, such as
    another wording, is no mistake) and `recovered` (harmful plants whose answer the method gets right). `records`: one entry per plant is appended
    (problem, position, reference and wrong token; per scenario and method the token left there, and with `grade`
    whether the answer is right)."""
    rng = random.Random(seed)
    fields = ("planted", "detected", "fixed") + (("right", "harmful", "recovered") if grade else ())
    counts = {scenario: {name: dict.fromkeys(fields, 0) for name in layers} for scenario in SCENARIOS}
    for index, prompt in enumerate(prompts):
        reference = reference_answer(dlm, prompt, max_new_tokens)
        position = plant_position(reference, dlm.config.block_size, dlm.eos_token_ids, rng)
        if progress is not None:
            progress.update(1)
        if position is None:
            continue
        wrong = (model_alternative if source == "model" else parent_alternative)(dlm, prompt, reference, position)
        _, around, _ = planted(dlm, prompt, reference, position, wrong, NO_CORRECTION)  # the error's own block
        to_end = max_new_tokens if grade else None
        record = {"problem": index, "position": position, "reference": reference[position], "wrong": wrong,
                  "after": {}}
        if grade:
            reference_right = record["reference_right"] = bool(grade(index, reference))
        for scenario in SCENARIOS:
            finished = around if scenario == "finished" else None
            runs = {name: planted(dlm, prompt, reference, position, wrong, layer, finished, to_end)
                    for name, layer in layers.items()}
            after = record["after"][scenario] = {name: {"token": token} for name, (token, _, _) in runs.items()}
            if grade:
                for name, (_, _, answer) in runs.items():
                    after[name]["right"] = bool(grade(index, answer))
                uncorrected = after["none"]["right"] if "none" in after else bool(grade(index, planted(
                    dlm, prompt, reference, position, wrong, NO_CORRECTION, finished, to_end)[2]))
                harmful = reference_right and not uncorrected
            for name, (token, _, _) in runs.items():
                c = counts[scenario][name]
                c["planted"] += 1
                c["detected"] += token != wrong
                c["fixed"] += token == reference[position]
                if grade:
                    c["right"] += after[name]["right"]
                    c["harmful"] += harmful
                    c["recovered"] += harmful and after[name]["right"]
        if records is not None:
            records.append(record)
    return counts


def answer_grader(dlm, task, rows):
    """`grade(i, tokens) -> bool` for `planted_errors`: the answer `tokens` to problem `rows[i]`, graded by `task`."""

    def grade(i: int, tokens: list[int]) -> bool:
        return bool(task.grade(dlm.tokenizer.decode(tokens, skip_special_tokens=True), rows[i]).correct)

    return grade


def accuracy(dlm, task, rows, prompts, layer: dict, max_new_tokens: int, progress=None) -> dict:
    """Batch 1: per-problem correctness, forward passes per token, tokens/s and corrections under `layer`."""
    from llm2diff.evaluation.completions import complete

    correct, passes, tokens, seconds = [], 0, 0, 0.0
    for row, prompt in zip(rows, prompts):
        done = complete(dlm, [prompt], {**layer, "max_new_tokens": max_new_tokens})
        c = done.rows[0]
        correct.append(bool(task.grade(c.text, row).correct))
        passes, tokens, seconds = passes + c.passes, tokens + len(c.tokens), seconds + done.seconds
        if progress is not None:
            progress.update(1)
    return {"correct": correct, "accuracy": sum(correct) / max(len(correct), 1),
            "passes_per_token": passes / max(tokens, 1), "tokens_per_second": tokens / max(seconds, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart-fast-edit")
    parser.add_argument("--baseline", default="outputs/quickstart-fast")
    parser.add_argument("--causal", default="",
                        help="also a model trained with clean_attention: causal and the AR loss (e.g. "
                             "outputs/quickstart-fast-causal), whose reopening is judged by its own AR stream; its "
                             "accuracy rows add verified decoding")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--edit-threshold", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--plant", choices=("model", "parent"), default="model",
                        help="the planted token: the model's own most likely other token with the block masked "
                             "(its plausible early mistake), or the AR parent's most likely other token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-planted", action="store_true")
    parser.add_argument("--outcome", action="store_true",
                        help="planted errors: decode every run on to the end of the answer and grade it, so that "
                             "the table counts harmful plants (the answer wrong without correction) and the answers "
                             "each method recovers (about 3x the planted runs' time)")
    parser.add_argument("--reopen-thresholds", type=thresholds, default=[],
                        help="also reopening at each of these thresholds (rows reopen@E), e.g. 0.3,0.7,0.9: where "
                             "fixing planted errors meets the cost of reopening sound blocks")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--out", default="outputs/retraction.json")
    parser.add_argument("--archive", default=str(RESULTS / "retraction"),
                        help="a copy of --out goes here, named by the settings (benchmarks/results, committed with the "
                             "code; '' for none)")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from llm2diff import load
    from llm2diff.atomic import write_json_atomic
    from llm2diff.evaluation.intervals import format_difference, paired_difference
    from llm2diff.hardware import describe

    torch.set_num_threads(args.threads)
    layers = methods(args.edit_threshold, args.reopen_thresholds)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(layers) - {"1/step", "verified"}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}: choose among {', '.join(layers)}, 1/step, "
                             "verified (causal-clean models)")
        layers = {name: layer for name, layer in layers.items() if name in args.methods.split(",")}
    steps = [("1/step", ONE_PER_STEP)] if not args.methods or "1/step" in args.methods.split(",") else []
    results = {"args": vars(args), "hardware": describe(args.threads), "models": {}}
    print(f"hardware: {results['hardware']}", flush=True)
    for label, path in (("edit-trained", args.model), ("baseline", args.baseline), ("causal-clean", args.causal)):
        if not path:
            continue
        dlm = load(path)
        task, rows, prompts = arithmetic_held_out(dlm, args.problems)
        row = {"path": path, "decoding": dlm.decoding.non_default()}
        start = time.perf_counter()
        if not args.skip_planted:
            grade = answer_grader(dlm, task, rows) if args.outcome else None
            row["plants"] = []
            with tqdm(total=len(prompts), desc=f"{label}: planted errors") as bar:
                row["planted"] = planted_errors(dlm, prompts, args.max_new_tokens, layers, args.seed, bar, args.plant,
                                                grade, row["plants"])
            row["planted_seconds"] = round(time.perf_counter() - start, 1)
        if not args.skip_accuracy:
            row["accuracy"] = {}
            verified = [("verified", VERIFIED)] if dlm.config.causal_clean and (
                not args.methods or "verified" in args.methods.split(",")) else []
            for name, layer in [*layers.items(), *steps, *verified]:
                with tqdm(total=len(prompts), desc=f"{label}: {name}") as bar:
                    row["accuracy"][name] = accuracy(dlm, task, rows, prompts, layer, args.max_new_tokens, bar)
            if "none" in row["accuracy"]:
                base = row["accuracy"]["none"]["correct"]
                for name, measured in row["accuracy"].items():
                    if name != "none":
                        measured["vs_none"] = paired_difference(base, measured["correct"]).to_dict()
        results["models"][label] = row
        write_json_atomic(Path(args.out), results)
        if args.archive:  # named by what changes the measurement (not where it is written or how many threads)
            settings = {k: v for k, v in vars(args).items() if k not in ("out", "archive", "threads")}
            write_json_atomic(Path(args.archive) / f"{settings_key('retraction', settings)}.json", results)

    what = "the model's own second choice" if args.plant == "model" else "the AR parent's most likely wrong token"
    if not args.skip_planted:
        print(f"\nPlanted errors ({what} with the block masked, one per problem; edit threshold "
              f"{args.edit_threshold}):\n")
        print("| model | error planted | method | planted | detected | fixed |"
              + (" answer right | harmful plants | harmful recovered |" if args.outcome else "")
              + "\n|---|---|---|---|---|---|" + ("---|---|---|" if args.outcome else ""))
    for label, row in results["models"].items():
        for scenario, methods_counts in row.get("planted", {}).items():
            where = "early in its block" if scenario == "early" else "in a finished block"
            for name, c in methods_counts.items():
                n = max(c["planted"], 1)
                line = f"| {label} | {where} | {name} | {c['planted']} | {c['detected'] / n:.0%} | {c['fixed'] / n:.0%} |"
                if "harmful" in c:
                    line += (f" {c['right'] / n:.0%} | {c['harmful']} ({c['harmful'] / n:.0%}) "
                             f"| {c['recovered'] / max(c['harmful'], 1):.0%} |")
                print(line)
    if not args.skip_accuracy:
        print(f"\nAccuracy at batch 1 ({args.problems} held-out problems):\n")
        print("| model | method | accuracy | vs none [95%] | passes/token | tokens/s |\n|---|---|---|---|---|---|")
        for label, row in results["models"].items():
            for name, m in row["accuracy"].items():
                versus = format_difference(paired_difference(row["accuracy"]["none"]["correct"], m["correct"])) \
                    if name != "none" and "none" in row["accuracy"] else "-"
                print(f"| {label} | {name} | {m['accuracy']:.1%} | {versus} | {m['passes_per_token']:.3f} "
                      f"| {m['tokens_per_second']:.1f} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
