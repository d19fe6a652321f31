"""Benchmark: what a STaR round can find at each sampling temperature, before spending a round on it.

A round learns only from the rationales its sampling finds. This samples k rationales per training-pool problem
from one model at each temperature (over the recipe's `star_decoding` otherwise: commit rule, threshold), with the
round's own sampler, problems and k, and counts per difficulty group: how many distinct rationales a problem gets,
pass@k, the share of right samples, and, for a task with step labels, the problems that get a sound rationale
(every step right: what `star_filter: steps` keeps) and how many sound rationales there are; with the sampler's
passes per token and seconds. Same problems and sampling seed at every temperature. Prints the table and writes
it to --out with the settings and hardware. Asserts nothing.

    python benchmarks/star_exploration.py --model outputs/self-improvement/diffusion/plain/seed-1/round-0/model
    python benchmarks/star_exploration.py --model M --temperatures 0.7,1.0,1.3,1.6 --problems 200 --k 4
    python benchmarks/star_exploration.py --model M --recipe recipes/quickstart-star.yaml

Measured (2026-12-07, docs/star.md; the same sampling and counts by an earlier script): the round-0 model of
recipes/star-headroom.yaml (seed 1) on the first 40 three-step pool problems, k = 4, threshold 0.9: problems with a
sound rationale 1, 2, 7 and 2 at temperature 0.7, 1.0, 1.3 and 1.6 (pass@4 2, 2, 9 and 8: at 1.6 mostly lucky
answers after a wrong step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def star_settings(recipe: str, overrides: dict):
    """The recipe's STaR settings (`StarArguments`) with `overrides` (e.g. star_samples_per_problem)."""
    from llm2diff.recipe import parse_recipe
    from llm2diff.star.config import star_dataclasses

    argv = ["--config", recipe]
    for key, value in overrides.items():
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return parse_recipe(argv, classes=star_dataclasses())[3]


def exploration(records: list[dict], rows_by_id: dict[str, dict], task, k: int) -> dict[str, dict]:
    """Per difficulty group ("all" first) of the sampled `records` (as `sample_and_grade` writes them): problems,
    distinct rationales per problem, pass@k, right samples, and (when the task labels steps) problems with a sound
    rationale and sound rationales."""
    from llm2diff.tasks.base import EvalTask

    labelled = type(task).step_labels is not EvalTask.step_labels
    groups: dict[str, dict] = {}
    for record in records:
        row = rows_by_id[record["id"]]
        label = task.difficulty(row)
        for name in ("all",) + ((label,) if label is not None else ()):
            g = groups.setdefault(name, {"problems": 0, "distinct": 0, "solved": 0, "right": 0, "samples": 0,
                                         "sound_problems": 0 if labelled else None, "sound": 0 if labelled else None})
            samples = record["samples"]
            g["problems"] += 1
            g["distinct"] += len({s["text"] for s in samples})
            g["solved"] += any(s["correct"] for s in samples)
            g["right"] += sum(s["correct"] for s in samples)
            g["samples"] += len(samples)
            if labelled:
                sound = [s for s in samples if s["correct"] and all(task.step_labels(s["text"], row) or [0])]
                g["sound"] += len(sound)
                g["sound_problems"] += bool(sound)
    return {name: {"problems": g["problems"], "distinct_per_problem": g["distinct"] / g["problems"],
                   "pass_at_k": g["solved"] / g["problems"], "right_share": g["right"] / max(g["samples"], 1),
                   "sound_problems": g["sound_problems"], "sound": g["sound"], "k": k}
            for name, g in sorted(groups.items(), key=lambda item: (item[0] != "all", item[0]))}


def table(rows: list[dict]) -> str:
    lines = ["| temperature | group | problems | distinct of k | pass@k | right samples | problems with a sound "
             "rationale | sound rationales | passes/token | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, g in row["groups"].items():
            sound = "- | -" if g["sound"] is None else f"{g['sound_problems']} | {g['sound']}"
            lines.append(f"| {row['temperature']} | {name} | {g['problems']} | {g['distinct_per_problem']:.2f} of "
                         f"{g['k']} | {g['pass_at_k']:.0%} | {g['right_share']:.1%} | {sound} "
                         f"| {row['passes_per_token']:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved llm2diff model (e.g. a STaR run's round-0/model)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "star-headroom.yaml"),
                        help="the STaR recipe whose task, pool, k and sampling settings to use")
    parser.add_argument("--temperatures", default="0.7,1.0,1.3,1.6")
    parser.add_argument("--problems", type=int, default=None, help="pool problems (default: the recipe's)")
    parser.add_argument("--difficulty", default=None, help="only the pool problems of this group, e.g. '3 steps'")
    parser.add_argument("--k", type=int, default=None, help="rationales per problem (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/star-exploration")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llm2diff.atomic import write_json_atomic
    from llm2diff.hardware import describe
    from llm2diff.modeling.loading import load
    from llm2diff.star.rounds import check_task
    from llm2diff.star.sampling import SampleOptions, sample_and_grade

    overrides = {"star_num_problems": args.problems} if args.problems else {}
    if args.k:
        overrides["star_samples_per_problem"] = args.k
    star = star_settings(args.recipe, overrides)
    task = check_task(star)
    rows = task.load_rows(star.star_source, star.star_train_split, star.star_num_problems)
    ids = [task.row_id(row, i) for i, row in enumerate(rows)]
    keyed = [{**row, "id": row_id} for row, row_id in zip(rows, ids)]
    if args.difficulty:
        keyed = [row for row in keyed if task.difficulty(row) == args.difficulty]
        if not keyed:
            raise SystemExit(f"no pool problem is in difficulty group {args.difficulty!r}")
    k = star.star_samples_per_problem
    dlm = load(args.model)
    out = Path(args.out)
    print(f"STaR exploration: {args.model}, {len(keyed)} pool problems"
          f"{' (' + args.difficulty + ')' if args.difficulty else ''}, k={k}, recipe {args.recipe}", flush=True)
    print(f"hardware: {describe(args.threads)}", flush=True)
    results = []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        decoding = {**star.decoding_for("sampling"), "temperature": temperature}
        records, cost = sample_and_grade(dlm, task, keyed, k, SampleOptions(decoding, batch_size=star.star_batch_size),
                                         args.seed, out / f"samples-t{temperature}.jsonl",
                                         desc=f"temperature {temperature}")
        results.append({"temperature": temperature, "decoding": decoding,
                        "groups": exploration(list(records.values()), {r["id"]: r for r in keyed}, task, k),
                        "passes_per_token": cost.nfe_per_token, "seconds": cost.seconds})
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    print(f"\n{describe(args.threads)}\n{text}")
    write_json_atomic(out / "exploration.json", {"args": vars(args), "hardware": describe(args.threads),
                                                  "rows": results})
    (out / "exploration.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
