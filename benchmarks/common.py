"""What several benchmark scripts share: running one resumable llm2diff run as a logged subprocess (and whether a
run can be resumed, or is held by another process), the built-in
arithmetic task's held-out problems of the kind a model was trained on, and the results archive.

The results archive (`benchmarks/results/<benchmark>/<settings>/`, committed with the code) keeps the small record
files of every measured run (reports, per-problem grading; never models) in the places they have under the
benchmark's `--out`; `<settings>` names the recipe and a digest of everything that changes a measurement (the
recipe's values with the command line's overrides, the benchmark's own settings), so a quick look with other
settings never mixes with, or overwrites, the real table. Output directories do not outlive the machine they were written on, and a table over three seeds takes
more CPU-hours than one sitting has: each sitting archives what it measured, and the tables read the outputs and
the archive together, so a table grows across machines and sessions.

    from benchmarks.common import arithmetic_held_out, run_logged     # after the script puts the checkout on sys.path
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IN_USE = "is in use by another llm2diff run"  # llm2diff.rundir.output_lock's refusal


def run_logged(name: str, command: list[str], directory: Path, threads: int, cwd: Path | None = None,
               record: dict | None = None) -> bool:
    """Run (or resume) the run writing `directory`, its output appended to `<directory>.log`, with `threads`
    OpenMP threads. Returns False when another process holds the directory now (its lock refused this one), so two
    copies of a benchmark share the work; any other failure stops the benchmark naming the log. `record`, when
    given, receives the process's "output" (its part of the log) and "seconds"."""
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    log = directory.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    size = log.stat().st_size if log.is_file() else 0
    with log.open("a") as sink:
        proc = subprocess.run(command, check=False, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - start
    with log.open() as text:
        text.seek(size)
        output = text.read()
    if proc.returncode != 0:
        if IN_USE in output:
            print(f"[{name}] running in another process: skipped", flush=True)
            return False
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}); see {log}")
    if record is not None:
        record.update(output=output, seconds=seconds)
    print(f"[{name}] finished in {seconds / 60:.1f} min", flush=True)
    return True


def resume_step(directory: Path) -> int | None:
    """The step of the newest complete checkpoint in `directory` (None: nothing to resume)."""
    from llm2diff.training.checkpoints import (
        checkpoint_step,
        newest_complete_checkpoint,
    )

    if not directory.is_dir():
        return None
    checkpoint = newest_complete_checkpoint(directory)
    return None if checkpoint is None else checkpoint_step(checkpoint)


def held_elsewhere(directory: Path) -> bool:
    """Whether another process holds `directory`'s lock now (a training or an evaluation of another copy)."""
    from llm2diff.rundir import RunDirectoryError, output_lock

    try:
        with output_lock(directory):
            return False
    except RunDirectoryError:
        return True


def arithmetic_held_out(dlm, problems: int):
    """The built-in task's first `problems` held-out problems of the kind `dlm` was trained on (its recipe's task
    settings: the same problems for every model of the recipe), and their prompts in the model's prompt format."""
    from llm2diff.evaluation.prompts import PromptRenderer
    from llm2diff.tasks.base import get_task

    recipe = (dlm.config.training or {}).get("recipe", {})
    task = get_task("arithmetic", max_operand=recipe.get("builtin_max_operand", 10),
                    operations=recipe.get("builtin_operations", "+-"), min_steps=recipe.get("builtin_min_steps", 1),
                    max_steps=recipe.get("builtin_max_steps", 2), num_problems=problems)
    rows = task.load_rows(None, "test", problems)
    render = PromptRenderer(dlm)
    return task, rows, [render(task, row, []) for row in rows]


def settings_key(recipe: str | Path, settings: dict) -> str:
    """`<recipe name>-<8 hex digits>`: the archive folder of one benchmark setting (the digest of `settings`, the
    parsed recipe values with overrides and the benchmark's settings; comments and key order do not count)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{Path(recipe).stem}-{digest}"


def archive_records(out: Path, archive: Path, runs: Iterable[Path],
                    patterns: Iterable[str] | Callable[[Path], Iterable[str]],
                    progress: Callable[[Path], int] | None = None,
                    transform: Callable[[Path, bytes], bytes] | None = None,
                    identity: Callable[[Path], object] | None = None) -> list[Path]:
    """Copy each run's record files (`patterns`: globs relative to the run directory, or a function of the run's
    directory giving them) from under `out` to the same place under `archive`; returns the runs copied. `runs` are run directories relative to `out`. A run is copied
    whole (its archived record files replaced) and only when it is at least as far as the archived copy by
    `progress` (e.g. rounds graded; default: always), so a run begun again on a new machine does not overwrite a
    more complete one measured earlier; with `identity` (which run a directory holds, e.g. its start time), a run as
    far as the archived copy replaces it only when it is the same run: another machine's run of the same seed,
    no further along, does not replace a measurement (the archive keeps the first; delete it to take the other).
    `transform(file, content)` gives what is archived of a file (e.g. without fields the task can regenerate)."""
    from llm2diff.atomic import write_bytes_atomic

    copied = []
    for run in runs:
        source, target = out / run, archive / run
        globs = list(patterns(source) if callable(patterns) else patterns)
        files = sorted({f for pattern in globs for f in source.glob(pattern) if f.is_file()})
        if not files:
            continue
        if progress is not None and target.is_dir():
            ahead = progress(source) - progress(target)
            if ahead < 0 or (ahead == 0 and identity is not None and identity(source) != identity(target)):
                continue
        old_globs = list(patterns(target) if callable(patterns) else patterns)
        for old in {f for pattern in old_globs for f in target.glob(pattern) if f.is_file()}:
            old.unlink()
        for file in files:
            content = file.read_bytes()
            write_bytes_atomic(target / file.relative_to(source), transform(file, content) if transform else content)
        copied.append(run)
    return copied


def locate(roots: Iterable[Path], run: Path, marker: str, progress: Callable[[Path], int] | None = None) -> Path:
    """Where the run `run` (relative to each root: the outputs, then the archive) is read from: the root whose copy
    has `marker` and is furthest along by `progress` (the first such root on a tie); the first root when none has
    it."""
    roots = list(roots)
    found = [root / run for root in roots if (root / run / marker).is_file()]
    if not found:
        return roots[0] / run
    if progress is None:
        return found[0]
    return max(found, key=progress)  # max keeps the first of equals


def without_fields(fields: Iterable[str]) -> Callable[[Path, bytes], bytes]:
    """An `archive_records` transform: JSON-lines files (`*.jsonl`) lose `fields` on every line; other files stay."""
    import json

    fields = tuple(fields)

    def transform(file: Path, content: bytes) -> bytes:
        if file.suffix != ".jsonl":
            return content
        lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
        return "".join(json.dumps({k: v for k, v in line.items() if k not in fields}) + "\n"
                       for line in lines).encode()

    return transform
