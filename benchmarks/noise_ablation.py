"""Benchmark: which noise trains the best model? One table, same model, task, steps and seed for every setting.

Trains the quickstart recipe (SmolLM2-135M-Instruct, block size 4, LoRA, built-in arithmetic) once per noise setting
for the same fixed number of steps, then grades the same held-out problems with one token per step and with
threshold decoding (which shows how many tokens a forward pass commits). Semantic settings are also graded with the
coarse-to-fine commit rule that mirrors their noise. Prints held-out accuracy, NFE per token under threshold
decoding, training time (scoring included) and the scoring cost, as one table. Asserts nothing.

    python benchmarks/noise_ablation.py                                  # all settings, about an hour on 2 CPU cores
    python benchmarks/noise_ablation.py --settings random,semantic-idf --steps 30 --problems 50   # a quick look

Each setting trains in its own process (`llm2diff train`) into `<out>/<setting>`; a finished setting is reused
when the command is run again, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict[str, object]] = {
    "random": {},
    "semantic-idf": {"noise_order": "semantic", "semantic_scorer": "idf"},
    "semantic-surprisal": {"noise_order": "semantic", "semantic_scorer": "surprisal"},
    "semantic-parent-deletion": {"noise_order": "semantic", "semantic_scorer": "parent_deletion"},
    "semantic-embedding": {"noise_order": "semantic", "semantic_scorer": "embedding_deletion"},
    "complementary": {"complementary_masks": True, "t_max": 0.999},
    "position": {"position_masking_strength": 1.0},
}


def train(name: str, overrides: dict[str, object], args, out: Path) -> dict:
    """Train one setting in a fresh process (or reuse a finished run). Returns its record."""
    record_path = out / name / "ablation_train.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    fields = {
        "max_steps": args.steps, "builtin_num_train": args.train_examples, "output_dir": str(out / name),
        "final_eval_samples": 0, "save_steps": 10_000, "seed": args.seed, "semantic_temperature": args.temperature,
        **overrides,
    }
    command = [sys.executable, "-m", "llm2diff", "train", "--config", str(ROOT / "recipes" / "quickstart.yaml")]
    for key, value in fields.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
        raise SystemExit(f"[{name}] training failed (exit {run.returncode})")
    cost = re.findall(r"significance scores \(.*?\): .*", run.stdout + run.stderr)
    record = {"setting": name, "overrides": overrides, "train_seconds": round(seconds, 1),
              "scoring": cost[-1] if cost else None, "hardware": args.hardware}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def evaluate(name: str, record: dict, args, out: Path) -> dict:
    path = out / name / "ablation_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    from llm2diff import load
    from llm2diff.evaluation.exact_match import evaluate_answers
    from llm2diff.training.arguments import DataArguments
    from llm2diff.training.data import load_raw_dataset

    dlm = load(out / name)
    c = dlm.config
    recipe = (c.training or {}).get("recipe", {})
    data_args = DataArguments(
        dataset_name="builtin:arithmetic", builtin_num_eval=args.problems, system_prompt=c.system_prompt,
        builtin_max_operand=recipe.get("builtin_max_operand", 10), builtin_operations=recipe.get("builtin_operations", "+-"),
        builtin_min_steps=recipe.get("builtin_min_steps", 1), builtin_max_steps=recipe.get("builtin_max_steps", 2),
        use_chat_template=c.use_chat_template, prompt_template=c.prompt_template)
    problems = list(load_raw_dataset(data_args, "test"))
    common = dict(max_new_tokens=48, batch_size=25)
    one = evaluate_answers(dlm, problems, data_args, tokens_per_step=1, **common)
    thr = evaluate_answers(dlm, problems, data_args, threshold=args.threshold, **common)
    result = {**record, "accuracy": one.accuracy, "accuracy_threshold": thr.accuracy,
              "nfe_per_token_threshold": round(1 / thr.tokens_per_forward, 3), "problems": len(problems)}
    if dlm.significance is not None:
        c2f = evaluate_answers(dlm, problems, data_args, tokens_per_step=1, commit_rule="coarse_to_fine", **common)
        result["accuracy_coarse_to_fine"] = c2f.accuracy
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=60, help="training steps per setting (batch 8)")
    parser.add_argument("--train-examples", type=int, default=480,
                        help="built-in training problems, scored once (60 steps x batch 8 see 480)")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems graded per setting")
    parser.add_argument("--threshold", type=float, default=0.9, help="confidence threshold for the NFE column")
    parser.add_argument("--temperature", type=float, default=0.3, help="semantic_temperature of semantic settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/noise-ablation")
    args = parser.parse_args()
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; available: {', '.join(SETTINGS)}")

    import torch

    from llm2diff.hardware import describe

    torch.set_num_threads(args.threads)
    args.hardware = describe(args.threads)  # stored in every setting's JSON records
    out = Path(args.out)
    print(f"noise ablation: quickstart recipe, {args.steps} steps x batch 8, {args.train_examples} training problems, "
          f"{args.problems} held-out problems, seed {args.seed}, semantic temperature {args.temperature}, "
          f"{args.threads} threads", flush=True)
    print(f"hardware: {args.hardware}", flush=True)
    rows = []
    for name in names:
        record = train(name, SETTINGS[name], args, out)
        rows.append(evaluate(name, record, args, out))
        print(f"[{name}] done: {json.dumps(rows[-1])}", flush=True)

    print(f"\n| setting | accuracy (1 token/step) | accuracy (threshold {args.threshold}) | NFE/token (threshold) "
          "| accuracy (coarse-to-fine) | train time | scoring cost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c2f = f"{r['accuracy_coarse_to_fine']:.0%}" if "accuracy_coarse_to_fine" in r else "-"
        scoring = r["scoring"].split(": ", 1)[1] if r.get("scoring") else "-"
        print(f"| {r['setting']} | {r['accuracy']:.0%} | {r['accuracy_threshold']:.0%} | "
              f"{r['nfe_per_token_threshold']:.2f} | {c2f} | {r['train_seconds'] / 60:.1f} min | {scoring} |")


if __name__ == "__main__":
    main()
