"""Benchmark: do STaR rounds improve the model, by how much, and which variant helps most (mean over seeds, paired
intervals over problems).

Runs `llm2diff star` with one recipe (default recipes/star-headroom.yaml: round 0 learns from a small set of easy
worked problems, the rounds sample harder problems given with final answers only, 300 held-out harder problems) for
every (model, variant, seed):
  - models: the block-diffusion model (the recipe's block size) and its AR twin (`block_size: 1`);
  - variants, at equal sampling budget (same problems, k and decoding): `plain` STaR (rationalization on, answer
    filtering), `no-rationalize`, `steps` (process-filtered: keep only rationales whose every step is right);
  - seeds: the training seed of round 0 and the rounds, and the sampling seed.
Variants other than `plain` start from the plain run's round-0 model of the same model and seed, so the variants
differ only in their rounds. Every run is an ordinary STaR run under --out: run the command again to resume; a
finished run is read, not redone.

The table: per model, variant and round, held-out accuracy (mean, min-max over seeds), the change against round 0
(mean over seeds, each seed's 95% paired bootstrap interval, and how many seeds' intervals exclude 0), pass@k on
the training pool, kept / rationalized / wrong-step rationales, sampling tokens/s and passes per token; then the
gap between the AR twin and the diffusion model per round (paired over problems, per seed). Rows also go to
<out>/self_improvement.json with the commands that produced them. Asserts nothing.

    nohup python benchmarks/self_improvement.py > self_improvement.log 2>&1 &      # hours on a 2-core CPU
    nohup python benchmarks/self_improvement.py --seeds 1 > seed1.log 2>&1 &       # a second core: runs another
                                                                                   # process holds are skipped
    python benchmarks/self_improvement.py --seeds 0 --variants plain --rounds 1    # a first look
    python benchmarks/self_improvement.py --table-only                             # the table from what is done
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
sys.path.insert(0, str(ROOT))

MODELS = {"diffusion": {}, "ar-twin": {"block_size": 1}}
VARIANTS = {"plain": {}, "no-rationalize": {"star_rationalize": False}, "steps": {"star_filter": "steps"}}


def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return out / model / variant / f"seed-{seed}"


def star_command(args, model: str, variant: str, seed: int) -> list[str]:
    fields = {"output_dir": run_dir(Path(args.out), model, variant, seed), "seed": seed, "star_rounds": args.rounds,
              **MODELS[model], **VARIANTS[variant]}
    if variant != "plain":  # the same round 0 as the plain run of this model and seed
        fields["star_init_model"] = run_dir(Path(args.out), model, "plain", seed) / "round-0" / "model"
    command = [sys.executable, "-m", "llm2diff", "star", "--config", str(args.recipe)]
    for key, value in fields.items():
        command += [f"--{key}", str(value)]
    return command + list(args.extra)


def run(args, model: str, variant: str, seed: int) -> bool:
    """Run (or resume) one STaR run; False when another process is running it now (its directory is locked)."""
    report = run_dir(Path(args.out), model, variant, seed) / "report.json"
    if report.is_file() and len(json.loads(report.read_text())["rounds"]) == args.rounds + 1:
        return True
    command = star_command(args, model, variant, seed)
    print(f"[{model}/{variant}/seed {seed}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    log = run_dir(Path(args.out), model, variant, seed).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    size = log.stat().st_size if log.is_file() else 0
    with log.open("a") as sink:
        proc = subprocess.run(command, check=False, stdout=sink, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        with log.open() as text:
            text.seek(size)
            if "is in use by another llm2diff run" in text.read():  # another instance of this benchmark runs it
                print(f"[{model}/{variant}/seed {seed}] running in another process: skipped", flush=True)
                return False
        raise SystemExit(f"[{model}/{variant}/seed {seed}] failed (exit {proc.returncode}); see {log}")
    print(f"[{model}/{variant}/seed {seed}] finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return True


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(out: Path, models, variants, seeds) -> dict:
    """Rows of the table from the finished rounds under `out` (a round missing for some seed is left out)."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct, spread

    rows, gaps = [], []
    for model in models:
        for variant in variants:
            reports = {}
            for seed in seeds:
                path = run_dir(out, model, variant, seed) / "report.json"
                if path.is_file():
                    reports[seed] = {r["round"]: r for r in json.loads(path.read_text())["rounds"]}
            rounds = sorted({r for rep in reports.values() for r in rep})
            for r in rounds:
                have = [s for s in reports if r in reports[s]]
                records = [reports[s][r] for s in have]
                changes = []
                for s in have:
                    base = run_dir(out, model, variant, s) / "round-0" / "eval"
                    now = run_dir(out, model, variant, s) / f"round-{r}" / "eval"
                    if r > 0 and (base / "results.jsonl").is_file() and (now / "results.jsonl").is_file():
                        changes.append(paired_difference(read_correct(base), read_correct(now)).to_dict())
                sampling = [rec.get("sampling") or {} for rec in records]
                rows.append({
                    "model": model, "variant": variant, "round": r, "seeds": have,
                    "accuracy": spread([rec["accuracy"] for rec in records]).__dict__,
                    "eval_examples": records[0]["eval_examples"],
                    "vs_round_0": changes,
                    "pass_at_k": _mean([rec.get("pass_at_k") for rec in records]),
                    "kept": _mean([rec.get("kept") for rec in records]),
                    "rationalized": _mean([rec.get("rationalized") for rec in records]),
                    "wrong_steps": _mean([rec.get("wrong_steps") for rec in records]),
                    "tokens_per_second": _mean([s.get("tokens_per_second") for s in sampling]),
                    "nfe_per_token": _mean([s.get("nfe_per_token") for s in sampling]),
                })
    for variant in variants:  # the AR twin minus the diffusion model, paired over the same held-out problems
        for seed in seeds:
            for r in range(0, 100):
                twin = run_dir(out, "ar-twin", variant, seed) / f"round-{r}" / "eval" / "results.jsonl"
                diffusion = run_dir(out, "diffusion", variant, seed) / f"round-{r}" / "eval" / "results.jsonl"
                if not (twin.is_file() and diffusion.is_file()):
                    break
                gaps.append({"variant": variant, "seed": seed, "round": r,
                             **paired_difference(read_correct(diffusion), read_correct(twin)).to_dict()})
    return {"rows": rows, "gaps": gaps}


def table(summary: dict) -> str:
    lines = ["| model | variant | round | held-out accuracy (mean, min-max) | vs round 0: mean, per seed [95% interval] "
             "| seeds excluding 0 | pass@k | kept + rationalized | wrong steps | tokens/s | NFE/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        acc = row["accuracy"]
        changes = row["vs_round_0"]
        if changes:
            mean = sum(c["difference"] for c in changes) / len(changes)
            per_seed = "; ".join(f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]" for c in changes)
            change = f"{100 * mean:+.1f}: {per_seed}"
            excluding = f"{sum(c['low'] > 0 for c in changes)}/{len(changes)} up, {sum(c['high'] < 0 for c in changes)} down"
        else:
            change = excluding = "-"
        kept = "-" if row["kept"] is None else f"{row['kept']:.0f} + {row['rationalized']:.0f}"

        def num(value, spec):
            return "-" if value is None else format(value, spec)

        lines.append(f"| {row['model']} | {row['variant']} | {row['round']} | {100 * acc['mean']:.1f}% "
                     f"({100 * acc['low']:.1f}-{100 * acc['high']:.1f}, n={row['eval_examples']}, "
                     f"{len(row['seeds'])} seeds) | {change} | {excluding} | {num(row['pass_at_k'], '.0%')} | {kept} "
                     f"| {num(row['wrong_steps'], '.0f')} | {num(row['tokens_per_second'], '.1f')} "
                     f"| {num(row['nfe_per_token'], '.2f')} |")
    if summary["gaps"]:
        lines += ["", "| variant | round | AR twin minus diffusion, per seed [95% interval] |", "|---|---|---|"]
        keys = sorted({(g["variant"], g["round"]) for g in summary["gaps"]})
        for variant, r in keys:
            per_seed = "; ".join(f"seed {g['seed']}: {100 * g['difference']:+.1f} [{100 * g['low']:+.1f}, "
                                 f"{100 * g['high']:+.1f}]" for g in summary["gaps"]
                                 if g["variant"] == variant and g["round"] == r)
            lines.append(f"| {variant} | {r} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "star-headroom.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (runs go one at a time)")
    parser.add_argument("--out", default="outputs/self-improvement")
    parser.add_argument("--table-only", action="store_true", help="print the table of what is finished; run nothing")
    parser.add_argument("extra", nargs="*", help="further recipe overrides for every run, after --, e.g. "
                                                 "-- --star_num_problems 50")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown models/variants {unknown}: models {list(MODELS)}, variants {list(VARIANTS)}")
    if "plain" not in variants and not args.table_only:
        variants = ["plain", *variants]  # the other variants start from its round 0
    out = Path(args.out)
    if not args.table_only:
        from llm2diff.hardware import describe

        print(f"self-improvement benchmark: {args.recipe}, models {models}, variants {variants}, seeds {seeds}, "
              f"{args.rounds} rounds, {args.threads} thread(s) per run", flush=True)
        print(f"hardware: {describe(args.threads)}", flush=True)
        for seed in seeds:  # one seed of everything first: a partial run already compares the variants
            for model in models:
                for variant in variants:  # the other variants need the plain run's round 0: skip with it
                    if not run(args, model, variant, seed) and variant == "plain":
                        break
    summary = summarize(out, models, variants, seeds)
    text = table(summary)
    print(text)
    commands = {f"{m}/{v}/seed-{s}": " ".join(star_command(args, m, v, s)[1:]) for m in models for v in variants
                for s in seeds}
    from llm2diff.atomic import write_json_atomic

    write_json_atomic(out / "self_improvement.json", {**summary, "commands": commands, "recipe": str(args.recipe)})


if __name__ == "__main__":
    main()
