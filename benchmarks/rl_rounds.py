"""Benchmark: does RL after STaR help, and do process rewards help beyond outcome rewards? One table.

On the quickstart model and built-in task (fixed, printed counts):
  1. `llm2diff star` (round 0 + one STaR round)                      -> the STaR policy and its held-out accuracy
  2. `llm2diff prm` with the STaR policy                              -> a PRM and its step-label AUROC
  3. `llm2diff rl` from the STaR policy, outcome reward only          -> held-out accuracy
  4. `llm2diff rl` from the STaR policy, outcome + process reward     -> held-out accuracy (same steps, same seed)
Prints held-out accuracy after STaR only, STaR + RL (outcome) and STaR + RL (outcome + process), the PRM's AUROC
against rollout and exact labels, and the time of each stage. Asserts nothing.

    python benchmarks/rl_rounds.py                              # about an hour on 2 CPU cores
    python benchmarks/rl_rounds.py --rl-steps 5 --problems 20   # a quick look

Every stage is an ordinary resumable run under --out, so running the command again continues where it stopped.
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


def stage(name: str, command: str, recipe: str, overrides: dict, threads: int) -> float:
    argv = [sys.executable, "-m", "llm2diff", command, "--config", str(ROOT / "recipes" / recipe)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    print(f"[{name}] {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, check=False, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[{name}] failed (exit {proc.returncode})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round0-steps", type=int, default=60)
    parser.add_argument("--problems", type=int, default=40, help="STaR problems (k=4) and RL prompts")
    parser.add_argument("--prm-problems", type=int, default=30)
    parser.add_argument("--rl-steps", type=int, default=20)
    parser.add_argument("--eval-problems", type=int, default=50)
    parser.add_argument("--round0-from", default=None,
                        help="a saved round-0 model of the quickstart-star recipe to start from (skips round-0 training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/rl-bench")
    args = parser.parse_args()

    from llm2diff.hardware import describe

    out = Path(args.out)
    print(f"RL benchmark: quickstart recipe, round 0 {args.round0_steps} steps, 1 STaR round on {args.problems} "
          f"problems, PRM on {args.prm_problems} problems, {args.rl_steps} GRPO steps on {args.problems} prompts, "
          f"{args.eval_problems} held-out problems, round 0 from {args.round0_from or 'this run'}, seed {args.seed}, {args.threads} threads", flush=True)
    print(f"hardware: {describe(args.threads)}", flush=True)
    star_dir, prm_dir = out / "star", out / "prm"
    policy = star_dir / "round-1" / "model"
    common = {"seed": args.seed}
    times = {"star": stage("star", "star", "quickstart-star.yaml", {
        **common, "output_dir": star_dir, "max_steps": args.round0_steps, "star_rounds": 1,
        "star_num_problems": args.problems, "star_eval_problems": args.eval_problems, "star_train_steps": 20,
        "star_mix_sft": args.problems,
        **({"star_init_model": args.round0_from} if args.round0_from else {})}, args.threads)}
    times["prm"] = stage("prm", "prm", "quickstart-prm.yaml", {
        **common, "output_dir": prm_dir, "prm_policy": policy, "prm_num_problems": args.prm_problems,
        "prm_eval_problems": max(10, args.prm_problems // 2)}, args.threads)
    rl = {"outcome": {"process_weight": 0.0}, "outcome + process": {"process_weight": 0.5, "rl_prm": prm_dir / "prm"}}
    for name, extra in rl.items():
        times[name] = stage(name, "rl", "quickstart-rl.yaml", {
            **common, "output_dir": out / ("rl-" + name.replace(" + ", "-")), "rl_policy": policy,
            "rl_num_problems": args.problems, "rl_eval_problems": args.eval_problems, "max_steps": args.rl_steps,
            **extra}, args.threads)

    star = json.loads((star_dir / "report.json").read_text())["rounds"]
    prm = json.loads((prm_dir / "prm_report.json").read_text())
    print("\n| model | held-out accuracy | stage time |")
    print("|---|---|---|")
    print(f"| round 0 (SFT) | {star[0]['accuracy']:.0%} | - |")
    print(f"| STaR (1 round) | {star[1]['accuracy']:.0%} | {times['star'] / 60:.1f} min |")
    for name in rl:
        report = json.loads((out / ("rl-" + name.replace(" + ", "-")) / "rl_report.json").read_text())
        print(f"| STaR + RL ({name}) | {report['accuracy']:.0%} | {times[name] / 60:.1f} min |")
    agreement = prm.get("rollout_vs_exact") or {}
    print(f"\nPRM: AUROC {prm.get('rollout_auroc')} against rollout labels, {prm.get('exact_auroc')} against exact "
          f"labels; rollout/exact label agreement {agreement.get('agreement')} over {agreement.get('steps')} steps; "
          f"PRM stage {times['prm'] / 60:.1f} min")


if __name__ == "__main__":
    main()
