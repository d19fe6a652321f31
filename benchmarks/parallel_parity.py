"""Benchmark: parallel decoding at the AR twin's accuracy. Which training change closes the gap, at what speed?

One recipe (default recipes/quickstart-fast.yaml: SmolLM2-135M-Instruct, LoRA, block size 8, 360 steps on the
built-in arithmetic task), trained once per row and seed with the same steps, data and seed, everything else as
the recipe; each row only adds its overrides:

    baseline          the recipe as it is (random noise order)
    self-cond         --self_conditioning expected_embedding
    self-cond-hidden  --self_conditioning hidden
    latent-1          not trained: the self-cond model decoded with latent_steps 1 (a decoding setting)
    latent-2          the same with latent_steps 2
    curriculum        --block_size_schedule "2:0.25,4:0.5" (block size 2 for the first 25% of the steps, 4 until
                      50%, then the recipe's block size)
    semantic          --noise_order semantic --semantic_scorer surprisal (masked least significant first, by the AR
                      parent's surprisal)
    combined          the overrides of --combined "key=value,key=value" (default: self-conditioning with the
                      expected embedding and the curriculum), to be set to the best combination after a first table
    causal-ar         --clean_attention causal --ar_loss_weight 1.0: finished blocks read causally and trained
                      with the AR loss as well (recipes/quickstart-fast-causal.yaml), decoded by the same pure
                      parallel threshold rule (its own AR stream is not asked)
    causal-ar-reopen  not trained: the causal-ar model with reopening at 0.9 (budget 2): its AR stream judges each
                      finished block and replaces the tokens it confidently disputes (docs/sampling.md), one extra
                      pass per reopened block; a correction, not verified decoding (the causal judge takes the
                      first confident dispute, docs/sampling.md; the archived seeds were graded with that rule)
    causal-ar-reopen-last  the same with reopen_last: the last block (where the final answer is) judged too, one
                      more pass per answer
    causal-ar-reopen-unsure  the same, the last block judged only where one of its tokens was committed below 0.9
                      (reopen_last_below 0.9): the extra pass only for unsure final blocks (seeds 1, 2: 96.7%
                      and 97.0% at 0.194 / 0.193 passes per token, against 96.3% and 97.7% without: stays off)
    causal-ar-redenoise  the causal-ar-reopen row with reopen_tail redenoise: after a correction the block's
                      tokens after it are denoised again, under the corrected token (an inserted or dropped token
                      shifts them)
    causal-ar-redenoise-last  the same with reopen_last (the final answer's block judged too)
    causal-ar-redenoise-unsure  the same, the last block judged only where one of its tokens was committed below
                      0.9 (reopen_last_below 0.9)
    causal-ar-redenoise-unsure-merged  the same with the LoRA folded into the weights while decoding (merge_lora:
                      the same model, faster passes; recipes/quickstart-fast-reopen.yaml saves it)
    causal-ar3        --clean_attention causal --ar_loss_weight 3.0: the causal-ar row with the AR loss weighted
                      three times (reopening can be no better than the model's own AR stream, which the AR loss
                      trains; seed 1: 89.3%, reopened 96.0%, against 91.7% and 96.3% at weight 1.0: no gain)
    causal-ar3-reopen not trained: the causal-ar3 model decoded as causal-ar-reopen
    ar-twin           --block_size 1: the AR twin (the same recipe as causal-LM SFT), one token per pass

The self-cond, latent, curriculum and combined rows need an llm2diff with the recipe keys `self_conditioning` and
`block_size_schedule` and the decoding setting `latent_steps`; an older one stops them with its unknown-key error.
Each training is `python -m llm2diff train --config <recipe> --output_dir <out>/<row>/seed-N --seed N
--final_eval_samples 0 <overrides>` in its own process (OMP_NUM_THREADS=--threads). A finished run (its saved
model, `diffusion_config.json`, is there) is reused; an interrupted one resumes from its newest complete
checkpoint (`--resume_from_checkpoint true`); a run another process holds (its directory is locked) is skipped, so
two copies of the command share the work (run the command again afterwards for what was skipped).

Each (row, seed) then grades the same held-out problems (the built-in task's test split with the recipe's task
settings; the same problems for every row and seed) one at a time (batch 1), greedy, under each model's saved
decoding (the recipe's threshold rule: threshold 0.7 with correction; `--threshold` sets another threshold; the
AR twin keeps its own, which commits one token per pass). The AR parent (the same weights, adapter off) decodes
every k-th of the problems in the same process, between them, for the tokens/s ratio. Each evaluation goes to
<out>/<row>/seed-N/parity_eval.json (per-problem correctness, passes, tokens and seconds, the decoding used, the
parent's figures, library versions and hardware) and is reused when the command is run again.

Each evaluation's records (parity_eval.json, the model's parity_train.json) are also copied into the committed
results archive, benchmarks/results/parallel-parity/<recipe>-<digest of the recipe's values, the overrides, problems,
tokens, threshold and --combined>/ (--archive; '' for none): a (row, seed) found there with the same settings is
neither trained nor graded again (unless its model is trained here for another row of the run: the rows decoded
from one model are graded from that model, so that they pair problem by problem), and the table reads --out and the
archive together, so the 24 trainings can be spread over machines and sessions.

The table (printed, and written to <out>/parallel_parity.md and .json with the commands): per row, held-out
accuracy (mean over seeds, min-max), the paired difference against the baseline (mean, each seed's 95% bootstrap
interval over problems, how many seeds' intervals exclude 0), the AR twin minus the row (the same way), forward
passes per token, tokens/s and the ratio to the AR parent's tokens/s, and the training time per step against the
baseline's (the trainer's own train_runtime over the steps it trained, as reported by each training process; the
wall time of the process where the trainer reported none). Asserts nothing.

    nohup python benchmarks/parallel_parity.py > parity.log 2>&1 &      # 24 trainings of ~50 min: ~20 h on 1 core
    nohup python benchmarks/parallel_parity.py > parity-2.log 2>&1 &    # a second core shares the work
    python benchmarks/parallel_parity.py --rows baseline,ar-twin --seeds 0 --problems 50      # a first look
    python benchmarks/parallel_parity.py --rows combined --combined "self_conditioning=hidden,noise_order=semantic"
    python benchmarks/parallel_parity.py --table-only                       # the table from what is done
    python benchmarks/parallel_parity.py --seeds 0 -- --max_steps 20        # every training shorter (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    archive_records,
    arithmetic_held_out,
    held_elsewhere,
    locate,
    resume_step,
    run_logged,
    settings_key,
)

DEFAULT_COMBINED = "self_conditioning=expected_embedding,block_size_schedule=2:0.25,4:0.5"
# rows trained with these recipe overrides (`combined`: those of --combined)
TRAINED: dict[str, dict[str, str]] = {
    "baseline": {},
    "self-cond": {"self_conditioning": "expected_embedding"},
    "self-cond-hidden": {"self_conditioning": "hidden"},
    "curriculum": {"block_size_schedule": "2:0.25,4:0.5"},
    "semantic": {"noise_order": "semantic", "semantic_scorer": "surprisal"},
    "combined": {},
    "causal-ar": {"clean_attention": "causal", "ar_loss_weight": "1.0"},
    "causal-ar3": {"clean_attention": "causal", "ar_loss_weight": "3.0"},
    "ar-twin": {"block_size": "1"},
}
# rows that decode another row's model with these decoding settings (no training of their own)
DECODED: dict[str, tuple[str, dict[str, object]]] = {
    "latent-1": ("self-cond", {"latent_steps": 1}),
    "latent-2": ("self-cond", {"latent_steps": 2}),
    "causal-ar-reopen": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2}),
    "causal-ar-reopen-last": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2, "reopen_last": True}),
    "causal-ar-reopen-unsure": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2, "reopen_last": True,
                                              "reopen_last_below": 0.9}),
    "causal-ar-redenoise": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2, "reopen_tail": "redenoise"}),
    "causal-ar-redenoise-last": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2, "reopen_tail": "redenoise",
                                               "reopen_last": True}),
    "causal-ar-redenoise-unsure": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2,
                                                 "reopen_tail": "redenoise", "reopen_last": True,
                                                 "reopen_last_below": 0.9}),
    "causal-ar-redenoise-unsure-merged": ("causal-ar", {"reopen_threshold": 0.9, "reopen_budget": 2,
                                                        "reopen_tail": "redenoise", "reopen_last": True,
                                                        "reopen_last_below": 0.9, "merge_lora": True}),
    "causal-ar3-reopen": ("causal-ar3", {"reopen_threshold": 0.9, "reopen_budget": 2}),
}
ROWS = ("baseline", "self-cond", "self-cond-hidden", "latent-1", "latent-2", "curriculum", "semantic", "combined",
        "causal-ar", "causal-ar-reopen", "causal-ar-reopen-last", "causal-ar-reopen-unsure", "causal-ar-redenoise",
        "causal-ar-redenoise-last", "causal-ar-redenoise-unsure", "causal-ar-redenoise-unsure-merged", "causal-ar3",
        "causal-ar3-reopen", "ar-twin")
EVAL_NAME = "parity_eval.json"
TRAIN_RECORD = "parity_train.json"
KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def run_dir(out: Path, row: str, seed: int) -> Path:
    """Where the row's training (or, for a decoded row, only its evaluation) lives."""
    return out / row / f"seed-{seed}"


def model_row(row: str) -> str:
    """The row whose trained model `row` decodes (itself unless it is a decoding of another row's model)."""
    return DECODED[row][0] if row in DECODED else row


def parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: the rows are {', '.join(ROWS)}")
    return rows


def parse_combined(text: str) -> dict[str, str]:
    """`"key=value,key=value"` -> {key: value}. A value may hold commas (`block_size_schedule=2:0.25,4:0.5`): a
    piece without `=` continues the value before it, unless it starts like a key (a letter or underscore)."""
    fields: dict[str, str] = {}
    key = None
    for piece in text.split(","):
        name, equals, value = piece.partition("=")
        if equals:
            key = name.strip()
            if not KEY.match(key) or not value.strip():
                raise SystemExit(f"--combined entry {piece.strip()!r} is not key=value (a recipe key, then a value; "
                                 f"e.g. --combined \"{DEFAULT_COMBINED}\")")
            if key in fields:
                raise SystemExit(f"--combined sets {key} twice")
            if key in ("output_dir", "seed", "resume_from_checkpoint"):
                raise SystemExit(f"--combined cannot set {key}: the benchmark sets it for every run")
            fields[key] = value.strip()
        elif key is not None and piece.strip() and not re.match(r"[A-Za-z_]", piece.strip()):
            fields[key] += "," + piece.strip()  # a comma inside the value before it
        else:
            raise SystemExit(f"--combined entry {piece.strip()!r} is not key=value (a recipe key, then a value; "
                             f"e.g. --combined \"{DEFAULT_COMBINED}\")")
    return fields


def overrides(args, row: str) -> dict[str, str]:
    """The recipe overrides that train `row` (a decoded row: those of the row whose model it decodes)."""
    row = model_row(row)
    return parse_combined(args.combined) if row == "combined" else dict(TRAINED[row])


def train_command(args, row: str, seed: int, resume: bool = False) -> list[str]:
    """The `llm2diff train` command of (row, seed); `resume` continues its newest complete checkpoint."""
    fields = {"output_dir": run_dir(Path(args.out), model_row(row), seed), "seed": seed, "final_eval_samples": 0,
              **overrides(args, row)}
    command = [sys.executable, "-m", "llm2diff", "train", "--config", str(args.recipe)]
    for key, value in fields.items():
        command += [f"--{key}", str(value)]
    if resume:
        command += ["--resume_from_checkpoint", "true"]
    return command + list(args.extra)


def recipe_fields(args) -> dict:
    """The recipe's keys with the `-- --key value` overrides every training gets (typed as YAML reads them)."""
    import yaml

    fields = yaml.safe_load(Path(args.recipe).read_text()) or {}
    extra = list(args.extra)
    for key, value in zip(extra[::2], extra[1::2]):
        fields[key.removeprefix("--")] = yaml.safe_load(value)
    return fields


def finished(directory: Path) -> bool:
    """A training that saved its model (`trainer.save_model` writes diffusion_config.json last of all, at the end;
    checkpoints keep theirs inside checkpoint-N)."""
    return (directory / "diffusion_config.json").is_file()


def check_trained_with(directory: Path, fields: dict[str, object]) -> None:
    """Refuse to reuse a run whose recorded recipe (llm2diff_run.json) differs from `fields` (e.g. --combined
    changed after the combined row was trained)."""
    import yaml

    record = directory / "llm2diff_run.json"
    if not record.is_file():
        return
    recipe = json.loads(record.read_text()).get("recipe", {})
    for key, value in fields.items():
        stored, wanted = recipe.get(key), yaml.safe_load(str(value))
        if stored != wanted and str(stored).lower() != str(value).lower():
            raise SystemExit(f"{directory} was trained with {key}={stored!r}, not {value!r}: give another --out, or "
                             "delete that run to train it with the new settings")


def train_runtime(log: str) -> float | None:
    """The trainer's `train_runtime` (seconds of its training loop) in a training process's output."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", log)
    return float(found[-1]) if found else None


def train(args, row: str, seed: int) -> bool:
    """Train (or resume) the model of (row, seed) unless it is finished; False when another process holds it.
    Each training process adds its time and the steps it trained to <run>/parity_train.json."""
    from llm2diff.atomic import write_json_atomic

    directory = run_dir(Path(args.out), model_row(row), seed)
    name = f"{model_row(row)}/seed {seed}"
    expected = {"seed": seed, **overrides(args, row)}
    if finished(directory):
        check_trained_with(directory, expected)
        return True
    if held_elsewhere(directory):
        print(f"[{name}] running in another process: skipped", flush=True)
        return False
    check_trained_with(directory, expected)  # a run cut short with other settings would be refused by train
    start_step = resume_step(directory)
    command = train_command(args, row, seed, resume=start_step is not None)
    ran: dict = {}
    if not run_logged(name, command, directory, args.threads, record=ran):
        return False
    record_path = directory / TRAIN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"segments": []}
    record["segments"].append({"from_step": start_step or 0, "to_step": int(recipe_fields(args)["max_steps"]),
                               "wall_seconds": round(ran["seconds"], 1), "train_runtime": train_runtime(ran["output"]),
                               "command": " ".join(command[1:]), "threads": args.threads})
    write_json_atomic(record_path, record)
    return True


def seconds_per_step(directory: Path) -> float | None:
    """Training seconds per step of a finished run from its parity_train.json: the trainer's train_runtime where
    every training process reported one, else their wall time, over the steps they trained."""
    path = directory / TRAIN_RECORD
    if not path.is_file():
        return None
    # a process that resumed at the last checkpoint trained nothing (it only saved the model)
    segments = [s for s in json.loads(path.read_text())["segments"] if s["to_step"] > s["from_step"]]
    if not segments:
        return None
    steps = sum(s["to_step"] - s["from_step"] for s in segments)
    key = "train_runtime" if all(s.get("train_runtime") is not None for s in segments) else "wall_seconds"
    return sum(s[key] for s in segments) / steps


def measure(dlm, task, rows, prompts, layer: dict, max_new_tokens: int, parent_every: int,
            label: str = "grading") -> dict:
    """Batch 1, greedy: each problem under `layer` (over the model's saved decoding), and the AR parent on every
    `parent_every`-th problem (0: never) right after it. Per-problem correctness, passes, tokens and seconds; a
    progress bar (stderr) shows the running accuracy."""
    from tqdm.auto import tqdm

    from llm2diff.evaluation.completions import complete
    from llm2diff.sampling.config import DecodingConfig

    decoding = DecodingConfig.resolve(dlm.decoding, {**layer, "max_new_tokens": max_new_tokens})
    parent_decoding = {"max_new_tokens": max_new_tokens}
    complete(dlm, [prompts[0]], decoding)  # warm-up, not counted
    if parent_every:
        complete(dlm, [prompts[0]], parent_decoding, ar_parent=True)
    result = {"ids": [], "correct": [], "passes": [], "tokens": [], "seconds": []}
    parent = {"ids": [], "correct": [], "tokens": [], "seconds": []}
    bar = tqdm(total=len(rows), desc=label, unit="problem", mininterval=10)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        done = complete(dlm, [prompt], decoding)
        answer = done.rows[0]
        result["ids"].append(task.row_id(row, i))
        result["correct"].append(bool(task.grade(answer.text, row).correct))
        bar.set_postfix(accuracy=f"{sum(result['correct']) / len(result['correct']):.1%}", refresh=False)
        bar.update()  # draws the count and the accuracy together
        result["passes"].append(answer.passes)
        result["tokens"].append(len(answer.tokens))
        result["seconds"].append(round(done.seconds, 4))
        if parent_every and i % parent_every == 0:
            done = complete(dlm, [prompt], parent_decoding, ar_parent=True)
            parent["ids"].append(task.row_id(row, i))
            parent["correct"].append(bool(task.grade(done.rows[0].text, row).correct))
            parent["tokens"].append(len(done.rows[0].tokens))
            parent["seconds"].append(round(done.seconds, 4))
    bar.close()
    tokens, seconds = sum(result["tokens"]), sum(result["seconds"])
    result.update(problems=len(rows), accuracy=sum(result["correct"]) / max(len(rows), 1),
                  passes_per_token=sum(result["passes"]) / max(tokens, 1),
                  tokens_per_second=tokens / max(seconds, 1e-9), decoding=decoding.non_default())
    if parent["ids"]:
        parent.update(problems=len(parent["ids"]), accuracy=sum(parent["correct"]) / len(parent["ids"]),
                      tokens_per_second=sum(parent["tokens"]) / max(sum(parent["seconds"]), 1e-9))
        result["parent"] = parent
        result["ratio_to_parent"] = result["tokens_per_second"] / parent["tokens_per_second"]
    return result


def eval_layer(args, row: str) -> dict:
    """The decoding settings over the model's saved decoding that `row` is graded with."""
    layer = dict(DECODED[row][1]) if row in DECODED else {}
    if args.threshold is not None and row != "ar-twin":  # the twin decodes one token per pass whatever the threshold
        layer["threshold"] = args.threshold
    return layer


def evaluate(args, row: str, seed: int) -> dict | None:
    """Grade (row, seed) into <out>/<row>/seed-N/parity_eval.json, or read it when it is there; None when its model
    is not trained yet or another process holds the directory."""
    directory = run_dir(Path(args.out), row, seed)
    path = directory / EVAL_NAME
    wanted = {"problems": args.problems, "max_new_tokens": args.max_new_tokens, "layer": eval_layer(args, row)}
    if path.is_file():
        return reuse(path, wanted)
    model = run_dir(Path(args.out), model_row(row), seed)
    if not finished(model):
        return None
    from llm2diff.rundir import RunDirectoryError, output_lock

    try:
        with output_lock(directory):
            if path.is_file():  # another copy graded it meanwhile
                return reuse(path, wanted)
            return grade(args, row, seed, model, path, wanted)
    except RunDirectoryError:
        print(f"[{row}/seed {seed}] evaluated in another process: skipped", flush=True)
        return None


def reuse(path: Path, wanted: dict) -> dict:
    """An earlier evaluation, refused when it was made with other settings than asked for now."""
    result = json.loads(path.read_text())
    differs = [f"{k} {result.get(k)!r}, not {v!r}" for k, v in wanted.items() if result.get(k) != v]
    if differs:
        raise SystemExit(f"{path} was graded with other settings ({'; '.join(differs)}): give another --out, or "
                         "delete it to grade again")
    return result


def grade(args, row: str, seed: int, model: Path, path: Path, wanted: dict) -> dict:
    import gc

    from llm2diff import load
    from llm2diff.atomic import write_json_atomic
    from llm2diff.hardware import describe
    from llm2diff.modeling.config import library_versions

    print(f"[{row}/seed {seed}] grading {args.problems} held-out problems ({model})", flush=True)
    dlm = load(model)
    task, rows, prompts = arithmetic_held_out(dlm, args.problems)
    parent_every = max(1, round(args.problems / args.parent_problems)) if args.parent_problems else 0
    start = time.perf_counter()
    measured = measure(dlm, task, rows, prompts, wanted["layer"], args.max_new_tokens, parent_every,
                       label=f"{row}/seed {seed}")
    result = {"row": row, "seed": seed, "model": str(model), "trained_with": overrides(args, row), **wanted,
              "block_size": dlm.config.block_size, **measured, "eval_seconds": round(time.perf_counter() - start, 1),
              "hardware": describe(args.threads), "versions": library_versions()}
    write_json_atomic(path, result)
    ratio = result.get("ratio_to_parent")
    print(f"[{row}/seed {seed}] accuracy {result['accuracy']:.1%}, {result['passes_per_token']:.3f} passes/token, "
          f"{result['tokens_per_second']:.1f} tokens/s" + (f" ({ratio:.2f}x the AR parent)" if ratio else ""),
          flush=True)
    del dlm
    gc.collect()
    return result


def archive_root(args) -> Path | None:
    """This setting's folder of the results archive (None without one): the recipe's values with the overrides
    after --, the held-out problems, new tokens, threshold and the combined row's overrides."""
    if not args.archive:
        return None
    settings = {"recipe": recipe_fields(args), "problems": args.problems, "max_new_tokens": args.max_new_tokens,
                "threshold": args.threshold, "combined": parse_combined(args.combined)}
    return Path(args.archive) / settings_key(args.recipe, settings)


def archived(args, row: str, seed: int) -> bool:
    """Whether the results archive holds (row, seed)'s evaluation with the settings asked for now (then it is
    neither trained nor graded again: its records stand for it)."""
    root = archive_root(args)
    if root is None:
        return False
    path = run_dir(root, row, seed) / EVAL_NAME
    wanted = {"problems": args.problems, "max_new_tokens": args.max_new_tokens, "layer": eval_layer(args, row),
              "trained_with": overrides(args, row)}
    if not path.is_file() or (run_dir(Path(args.out), row, seed) / EVAL_NAME).is_file():
        return False
    result = json.loads(path.read_text())
    return all(result.get(k) == v for k, v in wanted.items())


def stands_archived(args, rows: list[str], seed: int) -> set[str]:
    """The rows whose archived evaluation stands for them at `seed` (neither trained nor graded again): archived
    with the settings asked for now, and their model is not trained here, neither before nor for another row of
    this run (a decoded row not archived trains it): rows decoded from one model are graded from that one model, so
    that they pair problem by problem (an archived evaluation may come from another machine's training)."""
    archived_rows = {row for row in rows if archived(args, row, seed)}
    trained_here = {model_row(row) for row in rows if row not in archived_rows}
    return {row for row in archived_rows if model_row(row) not in trained_here
            and not finished(run_dir(Path(args.out), model_row(row), seed))}


def archive(out: Path, archive_dir: Path) -> list[Path]:
    """Copy every run's record files under `out` (parity_eval.json, parity_train.json: no models) into
    `archive_dir`; returns the runs copied. A run not graded yet (a training alone) does not replace an archived
    copy that holds an evaluation."""
    runs = sorted({p.parent.relative_to(out) for name in (EVAL_NAME, TRAIN_RECORD) for p in out.glob(f"*/seed-*/{name}")})
    return archive_records(out, archive_dir, runs, (EVAL_NAME, TRAIN_RECORD),
                           progress=lambda run: int((run / EVAL_NAME).is_file()))


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _correct(result: dict) -> dict[str, bool]:
    return dict(zip(result["ids"], result["correct"]))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(out: Path | list[Path], rows, seeds) -> dict:
    """Rows of the table from the evaluations under `out` (or several roots: the outputs, then the results
    archive; a seed without an evaluation is left out). The baseline and the AR twin are read for the paired columns
    whether or not they are among `rows`."""
    from llm2diff.evaluation.intervals import paired_difference, spread

    roots = [out] if isinstance(out, Path) else list(out)

    def evals(row):
        return {s: e for s in seeds
                if (e := _read(locate(roots, Path(row) / f"seed-{s}", EVAL_NAME) / EVAL_NAME)) is not None}

    def seconds_per_step_of(row, s):
        return seconds_per_step(locate(roots, Path(model_row(row)) / f"seed-{s}", TRAIN_RECORD))

    baseline, twin = evals("baseline"), evals("ar-twin")
    base_step = _mean([seconds_per_step_of("baseline", s) for s in seeds])
    summary = []
    for row in rows:
        results = evals(row)
        if not results:
            continue
        have = sorted(results)
        step = _mean([seconds_per_step_of(row, s) for s in have])
        summary.append({
            "row": row, "seeds": have, "problems": results[have[0]]["problems"],
            "accuracy": spread([results[s]["accuracy"] for s in have]).__dict__,
            "vs_baseline": [{"seed": s, **paired_difference(_correct(baseline[s]), _correct(results[s])).to_dict()}
                            for s in have if s in baseline and row != "baseline"],
            "twin_minus_row": [{"seed": s, **paired_difference(_correct(results[s]), _correct(twin[s])).to_dict()}
                               for s in have if s in twin and row != "ar-twin"],
            "passes_per_token": _mean([results[s]["passes_per_token"] for s in have]),
            "tokens_per_second": _mean([results[s]["tokens_per_second"] for s in have]),
            "ratio_to_parent": [results[s].get("ratio_to_parent") for s in have],
            "seconds_per_step": step,
            "step_vs_baseline": step / base_step if step is not None and base_step else None,
            "trained_with": results[have[0]].get("trained_with"), "decoding": results[have[0]]["decoding"],
            "hardware": sorted({results[s].get("hardware") or "-" for s in have}),
        })
    return {"rows": summary}


def _paired(changes: list[dict]) -> tuple[str, str]:
    """`+2.5: [+0.3, +4.7]; [-1.0, +3.0]` (mean, then each seed's interval) and `1/2 up, 0 down`."""
    if not changes:
        return "-", "-"
    mean = sum(c["difference"] for c in changes) / len(changes)
    per_seed = "; ".join(f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]" for c in changes)
    return (f"{100 * mean:+.1f}: {per_seed}",
            f"{sum(c['low'] > 0 for c in changes)}/{len(changes)} up, {sum(c['high'] < 0 for c in changes)} down")


def describe_row(row: str, trained_with: dict[str, str]) -> str:
    """`self_conditioning=expected_embedding`; a decoded row: `self-cond model, latent_steps 1`."""
    if row in DECODED:
        base, layer = DECODED[row]
        return f"{base} model, " + ", ".join(f"{k} {v}" for k, v in layer.items())
    return ", ".join(f"{k}={v}" for k, v in trained_with.items()) or "the recipe"


def table(summary: dict, header: str) -> str:
    columns = ("| row | trained / decoded as | held-out accuracy (mean, min-max) | vs baseline: mean, per seed [95%] "
               "| seeds excluding 0 | AR twin minus row: mean, per seed [95%] | passes/token | tokens/s "
               "| ratio to AR parent | training time per step vs baseline |")
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        acc = row["accuracy"]
        versus, excluding = _paired(row["vs_baseline"])
        gap, _ = _paired(row["twin_minus_row"])
        ratios = [r for r in row["ratio_to_parent"] if r is not None]
        ratio = f"{_mean(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        step = "-" if row["step_vs_baseline"] is None else \
            f"{row['step_vs_baseline']:.2f}x ({row['seconds_per_step']:.1f} s)"
        described = describe_row(row["row"], row["trained_with"] or {})
        lines.append(f"| {row['row']} | {described} | {100 * acc['mean']:.1f}% "
                     f"({100 * acc['low']:.1f}-{100 * acc['high']:.1f}, n={row['problems']}, {len(row['seeds'])} "
                     f"seeds) | {versus} | {excluding} | {gap} | {row['passes_per_token']:.3f} "
                     f"| {row['tokens_per_second']:.1f} | {ratio} | {step} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart-fast.yaml"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--problems", type=int, default=300, help="held-out problems graded per row and seed")
    parser.add_argument("--parent-problems", type=int, default=50,
                        help="problems (spread over the run) the AR parent decodes for the tokens/s ratio; 0: none")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the threshold rule's threshold (default: each model's saved decoding, 0.7)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--combined", default=DEFAULT_COMBINED,
                        help="recipe overrides of the combined row, 'key=value,key=value' (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every training and evaluation")
    parser.add_argument("--out", default="outputs/parallel-parity")
    parser.add_argument("--table-only", action="store_true", help="print the table of what is done; run nothing")
    parser.add_argument("--archive", default=str(RESULTS / "parallel-parity"),
                        help="the results archive: each evaluation's records (parity_eval.json, parity_train.json) "
                             "are copied here, a (row, seed) archived with the same settings is not run again, and "
                             "the table reads --out and the archive together (default: %(default)s, committed with "
                             "the code; '' for none)")
    parser.add_argument("extra", nargs="*", help="further recipe overrides for every training, after --, e.g. "
                                                 "-- --max_steps 20")
    args = parser.parse_args()
    rows = parse_rows(args.rows)
    combined = parse_combined(args.combined)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)

    from llm2diff.atomic import write_json_atomic, write_text_atomic
    from llm2diff.hardware import describe

    hardware = describe(args.threads)
    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
        print(f"parallel parity: {args.recipe}, rows {rows}, seeds {seeds}, {args.problems} held-out problems, "
              f"{args.threads} thread(s)", flush=True)
        print(f"hardware: {hardware}", flush=True)
        for seed in seeds:  # one seed of every row first: a partial run already compares the rows
            skipped = stands_archived(args, rows, seed)
            for row in rows:
                if row in skipped:
                    print(f"[{row}/seed {seed}] in the results archive ({archive_root(args)}): not run again", flush=True)
                    continue
                if archived(args, row, seed):
                    print(f"[{row}/seed {seed}] in the results archive, but its model is trained here: graded again "
                          "from it, so that the rows decoded from one model pair problem by problem", flush=True)
                if train(args, row, seed) and evaluate(args, row, seed) is not None and args.archive:
                    archive(out, archive_root(args))
    roots = [out]
    if args.archive:
        copied = archive(out, archive_root(args))
        if copied:
            print(f"archived in {archive_root(args)}: {', '.join(map(str, copied))}", flush=True)
        roots.append(archive_root(args))
    summary = summarize(roots, rows, seeds)
    decoding = f"threshold {args.threshold}" if args.threshold is not None else "each model's saved decoding"
    header = (f"parallel parity: {args.recipe}, seeds {','.join(map(str, seeds))}, batch 1, {decoding}\n"
              f"hardware: {hardware}")
    measured_on = sorted({h for row in summary["rows"] for h in row["hardware"]} - {hardware})
    if measured_on:  # evaluations made elsewhere (or at another thread count)
        header += "\nevaluations measured on: " + "; ".join(measured_on)
    text = table(summary, header)
    print(text)
    write_text_atomic(out / "parallel_parity.md", text + "\n")
    commands = {f"{row}/seed-{s}": " ".join(train_command(args, row, s)[1:]) for row in rows for s in seeds
                if row not in DECODED}
    write_json_atomic(out / "parallel_parity.json", {**summary, "hardware": hardware, "recipe": str(args.recipe),
                                                     "combined": combined, "commands": commands,
                                                     "args": {k: v for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
