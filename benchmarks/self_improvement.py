"""Benchmark: do STaR rounds, process rewards and RL improve the model, by how much, and which variant helps most
(mean over seeds, paired intervals over problems).

Runs `llm2diff star` with one recipe (default recipes/star-headroom.yaml: round 0 learns from a small set of easy
worked problems, the rounds sample harder problems given with final answers only, 300 held-out harder problems) for
every (model, variant, seed):
  - models: the block-diffusion model (the recipe's block size) and its AR twin (`block_size: 1`);
  - variants, at equal sampling budget (same problems, k and decoding): `plain` STaR (rationalization on, answer
    filtering), `no-rationalize`, `steps` (process-filtered: keep only rationales whose every step is right by the
    task's exact step labels), `steps-balanced` (and each problem's rationales repeated by how rarely it is solved,
    `star_balance: pass_rate`), `steps-balanced-hot` (the same, sampling rationales at temperature 1.3 instead of
    the recipe's 0.7: more exploration, the same problems, k and commit rule), `balanced-hot` (the same balance and
    temperature with answer filtering only: what the step filter adds), `prm` (process-filtered by a trained PRM:
    every step scores >= star_prm_threshold);
  - seeds: the training seed of round 0 and the rounds, and the sampling seed.
Variants other than `plain` start from the plain run's round-0 model of the same model and seed, so the variants
differ only in their rounds. The `prm` variant first trains a PRM on the round-0 model's rollouts
(`llm2diff prm`, --prm-recipe, into <out>/<model>/reward-model/seed-N).

After STaR (--after, each from the last round of one STaR variant's run of the same model and seed, at the same
held-out problems; --after-from, default `steps-balanced-hot`, the STaR settings the quickstart recipes ship): `rl-outcome` and `rl-process` run `llm2diff rl` (--rl-recipe) with the outcome reward alone and with
outcome + process rewards from the PRM above; `selection` samples k solutions per held-out problem and compares a
single sample, majority vote, best-of-k by the PRM and the PRM-guided step search (k candidate lines per step)
(benchmarks/prm_selection.py --step-search).

Every run is an ordinary run under --out: run the command again to resume; a finished run is read, not redone;
a run another process holds (its directory is locked) is skipped, so two copies of the command share the work.

The table: per model, variant and round, held-out accuracy (mean, min-max over seeds), the change against round 0
(mean over seeds, each seed's 95% paired bootstrap interval, and how many seeds' intervals exclude 0), pass@k on
the training pool, kept / rationalized / wrong-step rationales, sampling tokens/s and passes per token; then each
variant against plain STaR (and against the variants it varies: steps-balanced-hot against steps-balanced and
balanced-hot, steps-balanced against steps) at the same round, paired over the same problems per seed; then the gap between
the AR twin and the diffusion model per round (paired over problems, per seed); then the stages after STaR against
the STaR model they start from. Rows also go to <out>/self_improvement.json with the commands that produced them.
Every invocation (--table-only too) copies the runs' record files (reports, per-problem grading; no models) into the
committed results archive, benchmarks/results/self-improvement/<recipe>-<digest of its values and the overrides
after -->/ (--archive; '' for none), and the table reads --out and the archive together: runs measured on other
machines count.
Asserts nothing.

    nohup python benchmarks/self_improvement.py > self_improvement.log 2>&1 &      # hours on a 2-core CPU
    nohup python benchmarks/self_improvement.py > second.log 2>&1 &                # a second core shares the work
    python benchmarks/self_improvement.py --seeds 0 --variants plain --rounds 1    # a first look
    python benchmarks/self_improvement.py --models diffusion --variants prm --after rl-outcome,rl-process,selection
    python benchmarks/self_improvement.py --variants steps-balanced --plain-rounds 0   # one variant first
    python benchmarks/self_improvement.py --table-only                             # the table from what is done
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    archive_records,
    locate,
    run_logged,
    settings_key,
    without_fields,
)

MODELS = {"diffusion": {}, "ar-twin": {"block_size": 1}}
VARIANTS = {"plain": {}, "no-rationalize": {"star_rationalize": False}, "steps": {"star_filter": "steps"},
            "steps-balanced": {"star_filter": "steps", "star_balance": "pass_rate"},
            "steps-balanced-hot": {"star_filter": "steps", "star_balance": "pass_rate",
                                   "star_decoding": {"temperature": 1.3, "threshold": 0.9}},
            "balanced-hot": {"star_balance": "pass_rate", "star_decoding": {"temperature": 1.3, "threshold": 0.9}},
            "prm": {"star_filter": "prm"}}
# each variant is compared with plain STaR at the same round, seed and problems; and these with the variants they vary
# (steps-balanced-hot against balanced-hot: process filtering alone, at the shipped balance and temperature)
AGAINST = {"steps-balanced-hot": ("steps-balanced", "balanced-hot"), "steps-balanced": ("steps",)}
AFTER = {"rl-outcome": {"process_weight": 0.0}, "rl-process": {}, "selection": {}}
AFTER_FROM = "steps-balanced-hot"  # the STaR variant the quickstart recipes ship: the stages after STaR start from it


def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return out / model / variant / f"seed-{seed}"


def prm_dir(out: Path, model: str, seed: int) -> Path:
    """Where the PRM trained on (model, seed)'s round-0 rollouts lives (`llm2diff prm` output; the model is prm/)."""
    return out / model / "reward-model" / f"seed-{seed}"


def _rounds(run: Path) -> int:
    """Rounds a STaR run has graded (its report.json), for choosing between its copies."""
    report = run / "report.json"
    return len(json.loads(report.read_text())["rounds"]) if report.is_file() else -1


def _started(run: Path) -> str | None:
    """Which STaR run a directory holds (its report's start time, kept across resumes); None without a report."""
    report = run / "report.json"
    return json.loads(report.read_text()).get("started") if report.is_file() else None


def _roots(out: Path | list[Path]) -> list[Path]:
    return [out] if isinstance(out, Path) else list(out)


def found_run(out: Path | list[Path], model: str, variant: str, seed: int) -> Path:
    """The STaR run's directory under the first of the roots (outputs, then archive) with the most rounds graded."""
    return locate(_roots(out), Path(model) / variant / f"seed-{seed}", "report.json", _rounds)


def found_prm(out: Path | list[Path], model: str, seed: int) -> Path:
    return locate(_roots(out), Path(model) / "reward-model" / f"seed-{seed}", "prm_report.json")


def found_after(out: Path | list[Path], model: str, stage: str, seed: int, variant: str = AFTER_FROM) -> Path:
    marker = "selection.json" if stage == "selection" else "rl_report.json"
    return locate(_roots(out), after_dir(Path(), model, stage, seed, variant), marker)


def star_model(out: Path, model: str, seed: int, r: int, variant: str = "plain") -> Path:
    return run_dir(out, model, variant, seed) / f"round-{r}" / "model"


def _command(subcommand: str, recipe, fields: dict, extra=()) -> list[str]:
    command = [sys.executable, "-m", "llm2diff", subcommand, "--config", str(recipe)]
    for key, value in fields.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return command + list(extra)


def variant_rounds(args, variant: str) -> int:
    """How many rounds this invocation runs for `variant` (--plain-rounds can hold the plain run at round 0)."""
    plain = getattr(args, "plain_rounds", None)
    return plain if variant == "plain" and plain is not None else args.rounds


def star_command(args, model: str, variant: str, seed: int) -> list[str]:
    out = Path(args.out)
    fields = {"output_dir": run_dir(out, model, variant, seed), "seed": seed,
              "star_rounds": variant_rounds(args, variant),
              **MODELS[model], **VARIANTS[variant]}
    if variant != "plain":  # the same round 0 as the plain run of this model and seed
        fields["star_init_model"] = star_model(out, model, seed, 0)
    if variant == "prm":
        fields["star_prm"] = prm_dir(out, model, seed) / "prm"
    return _command("star", args.recipe, fields, args.extra)


def prm_command(args, model: str, seed: int) -> list[str]:
    """Train the PRM of (model, seed): rollouts of the plain run's round-0 model label the steps."""
    fields = {"output_dir": prm_dir(Path(args.out), model, seed), "seed": seed,
              "prm_policy": star_model(Path(args.out), model, seed, 0)}
    return _command("prm", args.prm_recipe, fields)


def after_command(args, model: str, stage: str, seed: int) -> list[str]:
    """A stage after STaR, from the last round of the --after-from variant's run: GRPO (outcome or outcome + process)
    or selection."""
    out = Path(args.out)
    policy = star_model(out, model, seed, args.rounds, args.after_from)
    prm = prm_dir(out, model, seed) / "prm"
    if stage == "selection":
        recipe = _recipe_fields(args.recipe, args.extra)
        return [sys.executable, str(ROOT / "benchmarks" / "prm_selection.py"), "--model", str(policy),
                "--prm", str(prm), "--task", recipe.get("star_task", "arithmetic"),
                "--task-options", recipe.get("star_task_options") or "{}",
                "--split", recipe.get("star_eval_split", "test"),
                "--problems", str(recipe.get("star_eval_problems", 300)), "--k", str(args.selection_k),
                "--max-new-tokens", str(recipe.get("star_max_new_tokens", 64)), "--seed", str(seed), "--step-search",
                "--threads", str(args.threads),
                "--out", str(after_dir(out, model, stage, seed, args.after_from) / "selection.json")]
    fields = {"output_dir": after_dir(out, model, stage, seed, args.after_from), "seed": seed, "rl_policy": policy,
              "rl_prm": prm, **AFTER[stage]}
    return _command("rl", args.rl_recipe, fields)


def after_dir(out: Path, model: str, stage: str, seed: int, variant: str = AFTER_FROM) -> Path:
    """Where a stage after STaR from `variant`'s last round writes (one folder per starting variant)."""
    return out / model / f"{stage}-after-{variant}" / f"seed-{seed}"


def _recipe_fields(path, extra=()) -> dict:
    """The STaR recipe's keys with the `--key value` overrides every STaR run gets (values as given)."""
    import yaml

    fields = yaml.safe_load(Path(path).read_text()) or {}
    extra = list(extra)
    for key, value in zip(extra[::2], extra[1::2]):
        fields[key.removeprefix("--")] = yaml.safe_load(value)  # typed as the recipe's own values
    return fields


def run(args, model: str, variant: str, seed: int) -> bool:
    """Run (or resume) one STaR run (after the PRM it needs); False when another process is running it now."""
    report = run_dir(Path(args.out), model, variant, seed) / "report.json"
    if report.is_file() and len(json.loads(report.read_text())["rounds"]) >= variant_rounds(args, variant) + 1:
        return True
    if variant == "prm" and not run_prm(args, model, seed):
        return False
    return run_logged(f"{model}/{variant}/seed {seed}", star_command(args, model, variant, seed),
                     run_dir(Path(args.out), model, variant, seed), args.threads)


def run_prm(args, model: str, seed: int) -> bool:
    directory = prm_dir(Path(args.out), model, seed)
    if (directory / "prm_report.json").is_file():
        return True
    return run_logged(f"{model}/reward-model/seed {seed}", prm_command(args, model, seed), directory, args.threads)


def run_after(args, model: str, stage: str, seed: int) -> bool:
    """Run one stage after STaR (the PRM first where it needs one); False when another process holds it."""
    directory = after_dir(Path(args.out), model, stage, seed, args.after_from)
    done = directory / ("selection.json" if stage == "selection" else "rl_report.json")
    if done.is_file():
        return True
    if stage != "rl-outcome" and not run_prm(args, model, seed):
        return False
    name = f"{model}/{stage}/seed {seed}"
    if stage != "selection":
        return run_logged(name, after_command(args, model, stage, seed), directory, args.threads)
    from llm2diff.rundir import RunDirectoryError, output_lock

    try:  # a script, not an llm2diff run: this process holds its directory
        with output_lock(directory):
            return run_logged(name, after_command(args, model, stage, seed), directory, args.threads)
    except RunDirectoryError:
        print(f"[{name}] running in another process: skipped", flush=True)
        return False


def records(run: Path) -> list[str]:
    """The record files of a run directory (globs): a STaR run's report and the grading of the rounds its report
    lists (not a round being graded now), a reward model's report, a stage after STaR's report and grading."""
    if (run / "report.json").is_file():
        graded = [r["round"] for r in json.loads((run / "report.json").read_text())["rounds"]]
        return ["report.json", "report.md", *(f"round-{r}/eval/{name}" for r in graded
                                              for name in ("results.jsonl", "summary.json"))]
    return ["prm_report.json", "rl_report.json", "eval/results.jsonl", "eval/summary.json", "selection.json"]


def archive(out: Path, archive_dir: Path) -> list[Path]:
    """Copy the record files of every run under `out` (STaR runs, reward models, stages after STaR: reports and
    per-problem grading, no models) into `archive_dir`; a STaR run only when it has graded more rounds than its
    archived copy, or as many and it is the same run (its report's start time: another machine's run of the same
    seed does not replace a measured one). Returns the runs copied."""
    runs = sorted({p.parent.relative_to(out) for marker in ("report.json", "prm_report.json", "rl_report.json",
                                                             "selection.json")
                   for p in out.glob(f"*/*/seed-*/{marker}")})
    # the graded lines keep id, output, prediction and correctness; the prompt is the task's own (its id gives it)
    return archive_records(out, archive_dir, runs, records, progress=_rounds, transform=without_fields(["prompt"]),
                           identity=_started)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def difficulty_groups(recipe_fields: dict) -> dict[str, str]:
    """Held-out problem id -> difficulty label ("3 steps") for the STaR recipe's task ({} without labels)."""
    from llm2diff.star.config import StarArguments
    from llm2diff.star.report import difficulty_groups as groups

    names = StarArguments.__dataclass_fields__
    return groups(StarArguments(**{k: v for k, v in recipe_fields.items()
                                   if k in names and k in ("star_task", "star_task_options", "star_source",
                                                           "star_eval_split", "star_eval_problems")}))


def _by_difficulty(paths: list[Path], groups: dict[str, str]) -> dict[str, float] | None:
    """Mean over seeds of each difficulty group's held-out accuracy."""
    from llm2diff.evaluation.intervals import read_correct

    if not groups or not paths:
        return None
    per_seed = []
    for path in paths:
        by: dict[str, list[int]] = {}
        for problem, right in read_correct(path).items():
            if problem in groups:
                by.setdefault(groups[problem], []).append(int(right))
        per_seed.append({label: sum(v) / len(v) for label, v in by.items()})
    labels = sorted({label for seed in per_seed for label in seed})
    return {label: sum(seed.get(label, 0.0) for seed in per_seed) / len(per_seed) for label in labels}


def summarize(out: Path | list[Path], models, variants, seeds, last_round: int | None = None,
              groups: dict[str, str] | None = None, after_from: str = AFTER_FROM) -> dict:
    """Rows of the table from the finished rounds under `out` (a round missing for some seed is left out);
    `groups` (problem id -> difficulty label) adds the accuracy per difficulty."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct, spread

    rows, gaps = [], []
    for model in models:
        for variant in variants:
            reports = {}
            for seed in seeds:
                path = found_run(out, model, variant, seed) / "report.json"
                if path.is_file():
                    reports[seed] = {r["round"]: r for r in json.loads(path.read_text())["rounds"]}
            rounds = sorted({r for rep in reports.values() for r in rep})
            for r in rounds:
                have = [s for s in reports if r in reports[s]]
                records = [reports[s][r] for s in have]
                changes = []
                for s in have:
                    base = found_run(out, model, variant, s) / "round-0" / "eval"
                    now = found_run(out, model, variant, s) / f"round-{r}" / "eval"
                    if r > 0 and (base / "results.jsonl").is_file() and (now / "results.jsonl").is_file():
                        changes.append({"seed": s, **paired_difference(read_correct(base), read_correct(now)).to_dict()})
                sampling = [rec.get("sampling") or {} for rec in records]
                results = [found_run(out, model, variant, s) / f"round-{r}" / "eval" / "results.jsonl" for s in have]
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
                    "by_difficulty": _by_difficulty([p for p in results if p.is_file()], groups or {}),
                })
    for variant in variants:  # the AR twin minus the diffusion model, paired over the same held-out problems
        for seed in seeds:
            for r in range(0, 100):
                twin = found_run(out, "ar-twin", variant, seed) / f"round-{r}" / "eval" / "results.jsonl"
                diffusion = found_run(out, "diffusion", variant, seed) / f"round-{r}" / "eval" / "results.jsonl"
                if not (twin.is_file() and diffusion.is_file()):
                    break
                gaps.append({"variant": variant, "seed": seed, "round": r,
                             **paired_difference(read_correct(diffusion), read_correct(twin)).to_dict()})
    return {"rows": rows, "gaps": gaps, "versus": summarize_versus(out, models, variants, seeds),
            **summarize_after(out, models, seeds, last_round, after_from)}


def summarize_versus(out: Path | list[Path], models, variants, seeds) -> list[dict]:
    """Each variant against plain STaR (and against the variant it varies, `AGAINST`) at the same round: per seed,
    the paired difference over the same held-out problems, for the rounds both have graded, and whether both runs
    started from the same round-0 model (`same_start`: their round-0 gradings agree problem by problem; runs of one
    seed made on two machines may not, and then the difference also holds the round-0 models' difference)."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    def graded(model: str, variant: str, seed: int) -> set[int]:  # rounds whose grading finished (not one under way)
        path = found_run(out, model, variant, seed) / "report.json"
        return {r["round"] for r in json.loads(path.read_text())["rounds"]} if path.is_file() else set()

    rows = []
    for model in models:
        for variant in variants:
            for against in dict.fromkeys(a for a in ("plain", *AGAINST.get(variant, ())) if a != variant):
                for r in range(1, 100):
                    per_seed = []
                    for seed in seeds:
                        mine = found_run(out, model, variant, seed) / f"round-{r}" / "eval"
                        theirs = found_run(out, model, against, seed) / f"round-{r}" / "eval"
                        if r in graded(model, variant, seed) and r in graded(model, against, seed):
                            starts = [read_correct(found_run(out, model, v, seed) / "round-0" / "eval")
                                      for v in (against, variant)]
                            per_seed.append({"seed": seed, **paired_difference(read_correct(theirs),
                                                                               read_correct(mine)).to_dict(),
                                             "same_start": starts[0] == starts[1],
                                             "round_0": [sum(c.values()) / max(len(c), 1) for c in starts]})
                    if not per_seed:
                        break
                    rows.append({"model": model, "variant": variant, "against": against, "round": r,
                                 "per_seed": per_seed})
    return rows


def _start(difference: dict) -> str:
    """What a versus cell says when the two runs did not start from one round-0 model."""
    if difference.get("same_start", True):
        return ""
    theirs, mine = difference["round_0"]
    return f" (other round-0 models: {theirs:.1%} and {mine:.1%})"


def summarize_after(out: Path | list[Path], models, seeds, last_round: int | None = None,
                    after_from: str = AFTER_FROM) -> dict:
    """The PRMs (AUROC against rollout and exact step labels) and the stages after STaR, per model and seed:
    GRPO's held-out accuracy paired against the STaR model it starts from (the last round of `after_from`'s run) and
    against round 0; selection accuracy per rule at k samples and each rule against a single sample."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    reward_models, after = [], []
    for model in models:
        for seed in seeds:
            report = found_prm(out, model, seed) / "prm_report.json"
            if report.is_file():
                data = json.loads(report.read_text())
                reward_models.append({"model": model, "seed": seed, "eval_steps": data.get("eval_steps"),
                                      **{k: data.get(k) for k in ("rollout_auroc", "exact_auroc", "rollout_accuracy",
                                                                  "exact_accuracy")},
                                      "rollout_vs_exact": data.get("rollout_vs_exact")})
            star = found_run(out, model, after_from, seed)
            last = last_round
            if last is None and (star / "report.json").is_file():
                last = max(r["round"] for r in json.loads((star / "report.json").read_text())["rounds"])
            for stage in ("rl-outcome", "rl-process"):
                directory = found_after(out, model, stage, seed, after_from)
                if not (directory / "rl_report.json").is_file():
                    continue
                data = json.loads((directory / "rl_report.json").read_text())
                row = {"model": model, "stage": stage, "seed": seed, "accuracy": data.get("accuracy"),
                       "train_seconds": data.get("train_seconds"), "from": after_from, "from_round": last,
                       # the share of GRPO groups whose completions all got one reward: no advantage, no gradient
                       "no_signal": _mean([float(e["frac_reward_zero_std"]) for e in data.get("rewards", [])
                                           if "frac_reward_zero_std" in e])}
                now = directory / "eval"
                for name, r in (("vs_star", last), ("vs_round_0", 0)):
                    base = star / f"round-{r}" / "eval"
                    if r is not None and (base / "results.jsonl").is_file() and (now / "results.jsonl").is_file():
                        row[name] = paired_difference(read_correct(base), read_correct(now)).to_dict()
                after.append(row)
            selection = found_after(out, model, "selection", seed, after_from) / "selection.json"
            if selection.is_file():
                data = json.loads(selection.read_text())
                after.append({"model": model, "stage": "selection", "seed": seed, "k": data["k"],
                              "problems": data["problems"], "rules": data["accuracy"],
                              "passes_per_problem": data["passes_per_problem"], "vs_single": data.get("vs_single", {}),
                              "from": after_from, "from_round": last})
    return {"reward_models": reward_models, "after": after}


def _interval(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def table(summary: dict) -> str:
    lines = ["| model | variant | round | held-out accuracy (mean, min-max) | vs round 0: mean, per seed [95% interval] "
             "| seeds excluding 0 | by difficulty (mean) | pass@k | kept + rationalized | wrong steps | tokens/s "
             "| NFE/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        acc = row["accuracy"]
        changes = row["vs_round_0"]
        if changes:
            mean = sum(c["difference"] for c in changes) / len(changes)
            per_seed = "; ".join(f"seed {c.get('seed', '?')}: [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"
                                 for c in changes)
            change = f"{100 * mean:+.1f}: {per_seed}"
            excluding = f"{sum(c['low'] > 0 for c in changes)}/{len(changes)} up, {sum(c['high'] < 0 for c in changes)} down"
        else:
            change = excluding = "-"
        kept = "-" if row["kept"] is None else f"{row['kept']:.0f} + {row['rationalized']:.0f}"

        lines.append(f"| {row['model']} | {row['variant']} | {row['round']} | {100 * acc['mean']:.1f}% "
                     f"({100 * acc['low']:.1f}-{100 * acc['high']:.1f}, n={row['eval_examples']}, "
                     f"{len(row['seeds'])} seeds) | {change} | {excluding} "
                     f"| {' · '.join(f'{k} {v:.0%}' for k, v in (row.get('by_difficulty') or {}).items()) or '-'} "
                     f"| {_num(row['pass_at_k'], '.0%')} | {kept} "
                     f"| {_num(row['wrong_steps'], '.0f')} | {_num(row['tokens_per_second'], '.1f')} "
                     f"| {_num(row['nfe_per_token'], '.2f')} |")
    if summary.get("versus"):
        lines += ["", "| model | variant | against | round | difference: mean, per seed [95% interval] "
                      "| seeds excluding 0 |", "|---|---|---|---|---|---|"]
        for row in summary["versus"]:
            seeds = row["per_seed"]
            mean = sum(d["difference"] for d in seeds) / len(seeds)
            per_seed = "; ".join(f"seed {d['seed']}: {_interval(d)}" + _start(d) for d in seeds)
            excluding = f"{sum(d['low'] > 0 for d in seeds)}/{len(seeds)} up, {sum(d['high'] < 0 for d in seeds)} down"
            lines.append(f"| {row['model']} | {row['variant']} | {row['against']} | {row['round']} "
                         f"| {100 * mean:+.1f}: {per_seed} | {excluding} |")
    if summary["gaps"]:
        lines += ["", "| variant | round | AR twin minus diffusion, per seed [95% interval] |", "|---|---|---|"]
        keys = sorted({(g["variant"], g["round"]) for g in summary["gaps"]})
        for variant, r in keys:
            per_seed = "; ".join(f"seed {g['seed']}: {100 * g['difference']:+.1f} [{100 * g['low']:+.1f}, "
                                 f"{100 * g['high']:+.1f}]" for g in summary["gaps"]
                                 if g["variant"] == variant and g["round"] == r)
            lines.append(f"| {variant} | {r} | {per_seed} |")
    if summary.get("reward_models"):
        lines += ["", "| model | seed | PRM AUROC vs rollout labels | vs exact labels | held-out steps | rollout labels "
                      "agree with exact |", "|---|---|---|---|---|---|"]
        for row in summary["reward_models"]:
            agree = (row.get("rollout_vs_exact") or {}).get("agreement")
            lines.append(f"| {row['model']} | {row['seed']} | {_num(row['rollout_auroc'], '.2f')} "
                         f"| {_num(row['exact_auroc'], '.2f')} | {row['eval_steps']} | {_num(agree, '.0%')} |")
    rl = [row for row in summary.get("after", []) if row["stage"] != "selection"]
    if rl:
        lines += ["", "| model | after STaR (variant, round) | stage | seed | held-out accuracy "
                      "| vs the STaR model [95%] | vs round 0 [95%] | groups without signal | train min |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rl:
            minutes = None if row["train_seconds"] is None else row["train_seconds"] / 60
            lines.append(f"| {row['model']} | {row.get('from', 'plain')}, {row['from_round']} | {row['stage']} "
                         f"| {row['seed']} "
                         f"| {_num(row['accuracy'], '.1%')} | {_interval(row.get('vs_star'))} "
                         f"| {_interval(row.get('vs_round_0'))} | {_num(row.get('no_signal'), '.0%')} "
                         f"| {_num(minutes, '.0f')} |")
    chosen = [row for row in summary.get("after", []) if row["stage"] == "selection"]
    if chosen:
        rules = list(chosen[0]["rules"])
        lines += ["", "| model | seed | k | " + " | ".join(rules) + " | best PRM rule vs single [95%] | majority vs "
                      "single [95%] |", "|---|---|---|" + "---|" * len(rules) + "---|---|"]
        for row in chosen:
            prm_rules = [r for r in rules if r.startswith("prm")]
            best = max(prm_rules, key=lambda r: row["rules"][r]) if prm_rules else None
            accuracy = " | ".join(f"{100 * row['rules'][r]:.1f}%" for r in rules)
            lines.append(f"| {row['model']} | {row['seed']} | {row['k']} | {accuracy} "
                         f"| {(best + ': ' + _interval(row['vs_single'].get(best))) if best else '-'} "
                         f"| {_interval(row['vs_single'].get('majority'))} |")
    return "\n".join(lines)


def _num(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "star-headroom.yaml"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain-rounds", type=int, default=None,
                        help="rounds of the plain run in this invocation (default --rounds); 0 trains only the "
                             "round 0 the other variants start from, and leaves its rounds to a later call")
    parser.add_argument("--after", default="", help=f"stages after STaR, comma-separated: {', '.join(AFTER)}")
    parser.add_argument("--after-from", default=AFTER_FROM, choices=list(VARIANTS),
                        help="the STaR variant whose last round (--rounds) the stages after STaR start from "
                             "(default: %(default)s, the settings the quickstart recipes ship)")
    parser.add_argument("--prm-recipe", default=str(ROOT / "recipes" / "star-headroom-prm.yaml"))
    parser.add_argument("--rl-recipe", default=str(ROOT / "recipes" / "star-headroom-rl.yaml"))
    parser.add_argument("--selection-k", type=int, default=4, help="samples per problem for the selection stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (runs go one at a time)")
    parser.add_argument("--out", default="outputs/self-improvement")
    parser.add_argument("--table-only", action="store_true", help="print the table of what is finished; run nothing")
    parser.add_argument("--archive", default=str(RESULTS / "self-improvement"),
                        help="the results archive: record files (reports, per-problem grading) of every run under "
                             "--out are copied here, and the table reads --out and the archive together "
                             "(default: %(default)s, committed with the code; '' for none)")
    parser.add_argument("extra", nargs="*", help="further STaR recipe overrides for every STaR run, after --, e.g. "
                                                 "-- --star_num_problems 50")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    after = [a for a in args.after.split(",") if a]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS] + \
        [a for a in after if a not in AFTER]
    if unknown:
        raise SystemExit(f"unknown models/variants/stages {unknown}: models {list(MODELS)}, variants "
                         f"{list(VARIANTS)}, stages after STaR {list(AFTER)}")
    if not args.table_only:  # the other variants start from the plain run's round 0, the stages after STaR from the
        # --after-from run's last round
        variants = list(dict.fromkeys(["plain", *variants, *([args.after_from] if after else [])]))
    out = Path(args.out)
    if not args.table_only:
        from llm2diff.hardware import describe

        print(f"self-improvement benchmark: {args.recipe}, models {models}, variants {variants}, after STaR "
              f"{after or 'nothing'}, seeds {seeds}, {args.rounds} rounds, {args.threads} thread(s) per run",
              flush=True)
        print(f"hardware: {describe(args.threads)}", flush=True)
        for seed in seeds:  # one seed of everything first: a partial run already compares the variants
            for model in models:
                start_done = False
                for variant in variants:  # the other variants need the plain run's round 0 only
                    finished = run(args, model, variant, seed)
                    if variant == args.after_from:
                        start_done = finished and variant_rounds(args, variant) == args.rounds
                    if variant == "plain" and not (star_model(out, model, seed, 0) / "adapter_config.json").is_file():
                        break  # no round 0 yet (another process is training it): nothing else can start
                else:
                    if start_done:  # the stages after STaR start from the --after-from run's last round
                        for stage in after:
                            run_after(args, model, stage, seed)
    roots = [out]
    if args.archive:
        # this setting's folder: the STaR recipe's values with the overrides after -- (variants are folders below)
        root = Path(args.archive) / settings_key(args.recipe, _recipe_fields(args.recipe, args.extra))
        archived = archive(out, root)
        if archived:
            print(f"archived in {root}: {', '.join(map(str, archived))}", flush=True)
        roots.append(root)
    summary = summarize(roots, models, variants, seeds, args.rounds,
                        difficulty_groups(_recipe_fields(args.recipe, args.extra)), args.after_from)
    text = table(summary)
    print(text)
    commands = {f"{m}/{v}/seed-{s}": " ".join(star_command(args, m, v, s)[1:]) for m in models for v in variants
                for s in seeds}
    commands.update({f"{m}/reward-model/seed-{s}": " ".join(prm_command(args, m, s)[1:]) for m in models
                     for s in seeds if "prm" in variants or set(after) - {"rl-outcome"}})
    commands.update({f"{m}/{a}/seed-{s}": " ".join(after_command(args, m, a, s)[1:]) for m in models for a in after
                     for s in seeds})
    from llm2diff.atomic import write_json_atomic

    write_json_atomic(out / "self_improvement.json", {**summary, "commands": commands, "recipe": str(args.recipe)})


if __name__ == "__main__":
    main()
