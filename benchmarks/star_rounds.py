"""Benchmark: STaR rounds on the quickstart model and task, the diffusion model against its AR twin.

Runs `llm2diff star` twice with the same recipe (recipes/quickstart-star.yaml with fixed, printed counts): once
as the block-diffusion model (block size 4) and once as the AR twin (`block_size: 1`, i.e. the same pipeline with
causal-LM SFT and one token per forward pass). Prints held-out accuracy per round, its change against round 0,
and sampling time and NFE per token per round for each. Asserts nothing.

    python benchmarks/star_rounds.py                       # about an hour on 2 CPU cores
    python benchmarks/star_rounds.py --rounds 1 --problems 20 --eval-problems 50 --round0-steps 30   # a quick look

Both runs resume where they stopped when the command is run again (they are ordinary STaR runs under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, block_size: int, args, out: Path) -> list[dict]:
    report = out / name / "report.json"
    fields = {
        "output_dir": str(out / name), "block_size": block_size, "max_steps": args.round0_steps,
        "star_rounds": args.rounds, "star_num_problems": args.problems, "star_eval_problems": args.eval_problems,
        "star_samples_per_problem": args.k, "star_train_steps": args.round_steps, "star_mix_sft": args.mix_sft,
        "seed": args.seed, "star_learning_rate": args.star_lr,
    }
    if args.round0_from:
        # Reuse a round-0 model trained with the same recipe and steps (e.g. by an earlier run of this benchmark).
        fields["star_init_model"] = str(Path(args.round0_from) / name / "round-0" / "model")
    command = [sys.executable, "-m", "llm2diff", "star", "--config", str(ROOT / "recipes" / "quickstart-star.yaml")]
    for key, value in fields.items():
        command += [f"--{key}", str(value)]
    command += list(args.extra)
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, check=False, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[{name}] failed (exit {proc.returncode})")
    print(f"[{name}] finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return json.loads(report.read_text())["rounds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--problems", type=int, default=60, help="training problems sampled per round")
    parser.add_argument("--k", type=int, default=4, help="rationales per problem")
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--round0-steps", type=int, default=60, help="round-0 training steps (batch 8)")
    parser.add_argument("--round-steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--mix-sft", type=int, default=60, help="original SFT rows mixed into each round")
    parser.add_argument("--star-lr", type=float, default=2e-4, help="learning rate of the rounds' fine-tuning")
    parser.add_argument("--round0-from", default=None,
                        help="an earlier --out whose {diffusion,ar-twin}/round-0/model to start from (skips round-0 training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/star-bench")
    parser.add_argument("extra", nargs="*", help="further recipe overrides for both runs, after --, e.g. -- "
                                                 "--star_filter answer --star_balance none")
    args = parser.parse_args()

    from llm2diff.hardware import describe

    out = Path(args.out)
    print(f"STaR benchmark: quickstart recipe, round 0 {args.round0_steps} steps, {args.rounds} rounds x "
          f"{args.problems} problems x k={args.k}, {args.round_steps} steps per round at lr {args.star_lr} (+{args.mix_sft} SFT rows), "
          f"{args.eval_problems} held-out problems, round 0 from {args.round0_from or 'this run'}, seed {args.seed}, {args.threads} threads", flush=True)
    print(f"hardware: {describe(args.threads)}", flush=True)
    results = {"diffusion (block 4)": run("diffusion", 4, args, out), "AR twin (block 1)": run("ar-twin", 1, args, out)}

    print("\n| model | round | held-out accuracy | vs round 0 | pass@k (train) | kept + rationalized "
          "| sampling s | sampling tokens/s | NFE/token (sampling) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rounds in results.items():
        base = rounds[0]["accuracy"]
        for r in rounds:
            sampling = r.get("sampling") or {}
            kept = "-" if r.get("kept") is None else f"{r['kept']} + {r['rationalized']}"
            pass_at_k = "-" if r.get("pass_at_k") is None else f"{r['pass_at_k']:.0%}"
            seconds = (r.get("seconds") or {}).get("sample")
            print(f"| {name} | {r['round']} | {r['accuracy']:.0%} | {100 * (r['accuracy'] - base):+.0f} pts "
                  f"| {pass_at_k} | {kept} | {'-' if seconds is None else f'{seconds:.0f}'} "
                  f"| {sampling.get('tokens_per_second', '-')} | {sampling.get('nfe_per_token', '-')} |")


if __name__ == "__main__":
    main()
