"""What several benchmark scripts share: running one resumable llm2diff run as a logged subprocess, and the
built-in arithmetic task's held-out problems of the kind a model was trained on.

    from benchmarks.common import arithmetic_held_out, run_logged     # after the script puts the checkout on sys.path
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

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
