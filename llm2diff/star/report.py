"""The per-round report of a STaR run: a table (printed, report.md, report.json) and a plot (accuracy.png)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm2diff.atomic import write_json_atomic, write_text_atomic


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def report_table(records: list[dict]) -> str:
    """Markdown table, one row per round."""
    lines = [
        "| round | held-out accuracy | vs round 0 (95% interval) | by difficulty | pass@k (train) | kept | rationalized "
        "| wrong steps | SFT mixed | sampling tokens/s | NFE/token (sampling) | sample s | rationalize s | train s "
        "| eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        sampling = r.get("sampling") or {}
        seconds = r.get("seconds") or {}
        pass_at_k = None if r.get("pass_at_k") is None else f"{r['pass_at_k']:.1%} (k={r['k']})"
        lines.append(
            f"| {r['round']} | {r['accuracy']:.1%} ({r['eval_examples']}) | {_change(r.get('vs_round_0'))} "
            f"| {_by_difficulty(r.get('by_difficulty'))} | {_fmt(pass_at_k)} | {_fmt(r.get('kept'))} "
            f"| {_fmt(r.get('rationalized'))} | {_fmt(r.get('wrong_steps'))} | {_fmt(r.get('sft_mixed'))} | {_fmt(sampling.get('tokens_per_second'), '.1f')} "
            f"| {_fmt(sampling.get('nfe_per_token'), '.2f')} | {_fmt(seconds.get('sample'), '.0f')} "
            f"| {_fmt(seconds.get('rationalize'), '.0f')} | {_fmt(seconds.get('train'), '.0f')} "
            f"| {_fmt(seconds.get('eval'), '.0f')} |")
    return "\n".join(lines)


def _change(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (+{d['gained']}/-{d['lost']})"


def with_changes(root: Path, records: list[dict]) -> list[dict]:
    """Each later round's held-out change against round 0, paired over the problems both graded
    (`llm2diff.evaluation.intervals`: bootstrap interval over problems, McNemar's exact p), as `vs_round_0`."""
    from llm2diff.evaluation.intervals import paired_difference, read_correct

    base = root / "round-0" / "eval" / "results.jsonl"
    if not base.is_file():
        return records
    before = read_correct(base)
    out = []
    for r in records:
        results = root / f"round-{r['round']}" / "eval" / "results.jsonl"
        if r["round"] > 0 and results.is_file():
            r = {**r, "vs_round_0": paired_difference(before, read_correct(results)).to_dict()}
        out.append(r)
    return out


def plot_accuracy(records: list[dict], path: Path, title: str) -> None:
    """Held-out accuracy by round as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    accuracy = [100 * r["accuracy"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(rounds, accuracy, marker="o")
    for x, y in zip(rounds, accuracy):
        ax.annotate(f"{y:.0f}%", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks(rounds)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def with_difficulty(root: Path, records: list[dict], groups: dict[str, str]) -> list[dict]:
    """Each round's held-out results by the task's difficulty groups (`groups`: problem id -> label), as
    `by_difficulty` {label: {"correct", "n"}}; nothing when the task has no groups."""
    from llm2diff.evaluation.intervals import read_correct

    if not groups:
        return records
    out = []
    for r in records:
        results = root / f"round-{r['round']}" / "eval" / "results.jsonl"
        if results.is_file():
            by: dict[str, dict[str, int]] = {}
            for problem, right in read_correct(results).items():
                label = groups.get(problem)
                if label is not None:
                    entry = by.setdefault(label, {"correct": 0, "n": 0})
                    entry["correct"] += int(right)
                    entry["n"] += 1
            r = {**r, "by_difficulty": dict(sorted(by.items()))}
        out.append(r)
    return out


def difficulty_groups(star) -> dict[str, str]:
    """Problem id -> difficulty label of the held-out problems STaR grades ({} for a task without labels)."""
    from llm2diff.tasks.base import EvalTask, get_task, parse_task_options

    task = get_task(star.star_task, **parse_task_options(star.star_task_options, star.star_task))
    if type(task).difficulty is EvalTask.difficulty:
        return {}
    rows = task.load_rows(star.star_source, star.star_eval_split, star.star_eval_problems)
    return {task.row_id(row, i): label for i, row in enumerate(rows) if (label := task.difficulty(row)) is not None}


def _by_difficulty(by: dict | None) -> str:
    if not by:
        return "-"
    return " · ".join(f"{label} {c['correct'] / max(c['n'], 1):.0%} ({c['n']})" for label, c in by.items())


def write_report(root: Path, records: list[dict], star) -> str:
    """Write report.md, report.json and accuracy.png under `root`; print and return the table."""
    records = with_difficulty(root, with_changes(root, records), difficulty_groups(star))
    table = report_table(records)
    title = f"STaR on {star.star_task}: {len(records) - 1} rounds, k={star.star_samples_per_problem}"
    write_text_atomic(root / "report.md", f"# {title}\n\n{table}\n\n![accuracy by round](accuracy.png)\n")
    run_file = root / "star_run.json"  # the recipe (seed included) and library versions of this run
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    write_json_atomic(root / "report.json", {"rounds": records, **{k: v for k, v in run.items() if k != "key"}})
    plot_accuracy(records, root / "accuracy.png", title)
    print(f"\n{title}\n{table}\n", flush=True)
    return table
