"""Run an llm2diff command and kill its own process at a chosen point: SIGKILL, so no `finally`, no cleanup, as when
a machine is shut down or a job is pre-empted. For the interruption tests (tests/test_reliability.py).

    python tests/killpoints.py TARGET COUNT WHEN [MATCH] -- train --config recipe.yaml

TARGET is `module:attribute.path` (e.g. `llm2diff.modeling.diffusion_lm:DiffusionLM.generate`, `os:replace`); the
process kills itself at the COUNT-th call (counting only calls whose arguments' text contains MATCH, when given),
WHEN "before" or "after" that call runs. Exits 0 without killing if the point is never reached.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys


def install(target: str, count: int, when: str, match: str | None = None) -> None:
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        hit = match is None or match in repr(args) + repr(kwargs)
        if hit:
            calls += 1
        if hit and calls == count and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and calls == count and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    split = sys.argv.index("--")
    spec, argv = sys.argv[1:split], sys.argv[split + 1 :]
    install(spec[0], int(spec[1]), spec[2], spec[3] if len(spec) > 3 else None)
    from llm2diff.cli import main

    sys.exit(main(argv))
