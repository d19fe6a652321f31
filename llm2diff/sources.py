"""Where rows come from: a local .jsonl/.json/.parquet/.csv file or a directory of such files (split by file name),
a Hugging Face Hub dataset name, or a built-in dataset (`builtin:<task>`: the names are checked here, the rows are
made by `llm2diff.training.data`). Used by the training data and recipe keys (`llm2diff.training.data`,
`llm2diff.training.arguments`) and the evaluation tasks (`llm2diff.tasks`).

    rows = load_local_dataset("data/train.jsonl")              # a local file: its only split is "train"
    rows = load_hub_dataset("openai/gsm8k", "main", "test")    # from the Hub (or its cache)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

#: Local file extension -> `datasets` packaged builder.
LOCAL_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED_LOCAL = "a .jsonl/.json/.parquet/.csv file or a directory of such files"
#: Split names recognised in local file names (see ``local_split_files``).
KNOWN_SPLIT_NAMES: tuple[str, ...] = ("train", "test", "validation", "valid", "val", "dev", "eval")
#: Prefix of a built-in dataset's name (``"builtin:<task>"``; its rows are made by `llm2diff.training.data`).
BUILTIN_PREFIX = "builtin:"
#: Built-in ARC-AGI training sets -> ARC-AGI version (`llm2diff.tasks.arc_agi.training_rows`).
ARC_BUILTINS: dict[str, int] = {"arc-agi-1": 1, "arc-agi-2": 2}
BUILTIN_TASKS: tuple[str, ...] = ("arithmetic", *ARC_BUILTINS)
BUILTIN_NAMES = ", ".join(f"'{BUILTIN_PREFIX}{t}'" for t in BUILTIN_TASKS)


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub name.

    True if it exists, ends with a known data extension, starts with ``/``, ``.``
    or ``~``, contains a backslash / OS separator other than ``/``, or has more
    than one ``/`` (Hub names are ``name`` or ``owner/name``).
    """
    if Path(name).expanduser().exists():
        return True
    if name.lower().endswith(tuple(LOCAL_FORMATS)):
        return True
    if name.startswith(("/", ".", "~")) or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    return name.count("/") > 1


def _split_pattern(split: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![a-z0-9]){re.escape(split.lower())}(?![a-z0-9])")


def local_split_files(directory: Path, split: str) -> list[Path]:
    """Data files of ``split`` in ``directory`` (searched recursively, hidden entries skipped).

    Rule: a file belongs to ``split`` if its path relative to ``directory`` contains the
    split name as a word (``test.jsonl``, ``gsm8k_test.jsonl``, ``test/0.parquet``,
    ``data/test-00000-of-00001.parquet``). If no file matches and ``split`` is
    ``"train"``, all files are used, provided none of them is named after another
    split (a directory of unsplit files is all training data).
    """
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in LOCAL_FORMATS
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"Directory {directory} contains no data files; expected {ACCEPTED_LOCAL}."
        )
    rel = {p: p.relative_to(directory).as_posix().lower() for p in files}
    matched = [p for p in files if _split_pattern(split).search(rel[p])]
    if matched:
        return matched
    others = [s for s in KNOWN_SPLIT_NAMES if s != split.lower()]
    named = [p for p in files if any(_split_pattern(s).search(rel[p]) for s in others)]
    if split.lower() == "train" and not named:
        return files
    raise FileNotFoundError(
        f"No file for split {split!r} in {directory}: a split's files must contain the split name "
        f"as a word in their path (e.g. {split}.jsonl). Found: {[rel[p] for p in files]}."
    )


def _builder_for(files: list[Path]) -> str:
    builders = {LOCAL_FORMATS[p.suffix.lower()] for p in files}
    if len(builders) != 1:
        raise ValueError(
            f"Files {[str(p) for p in files]} mix formats {sorted(builders)}; keep one format per split."
        )
    return builders.pop()


def load_local_dataset(path: str | os.PathLike[str], split: str = "train") -> "datasets.Dataset":
    """Load a local file (its only split is ``"train"``) or a split of a local directory."""
    from datasets import load_dataset

    location = Path(path).expanduser()
    if not location.exists():
        raise FileNotFoundError(
            f"Local dataset path {str(path)!r} does not exist (resolved to {location.resolve()}). "
            f"Expected {ACCEPTED_LOCAL}, a Hub dataset name, or a built-in dataset (builtin:arithmetic, "
            "builtin:arc-agi-1, builtin:arc-agi-2)."
        )
    if location.is_dir():
        files = local_split_files(location, split)
    else:
        if location.suffix.lower() not in LOCAL_FORMATS:
            raise ValueError(
                f"Unsupported data file {str(location)!r}: expected {ACCEPTED_LOCAL}."
            )
        if split != "train":
            raise ValueError(
                f"{str(location)!r} is a single file, whose only split is 'train', but split {split!r} "
                "was requested. Use eval_fraction to hold out eval data, set eval_split to the path "
                "of an eval file, or point dataset_name at a directory with one file per split."
            )
        files = [location]
    empty = [p for p in files if p.stat().st_size < 65536 and not p.read_bytes().strip()]
    if empty:
        raise ValueError(f"dataset file {empty[0]} is empty: it holds no rows to load; check the path, or write the "
                         "data first")
    builder = _builder_for(files)
    try:
        return load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except StopIteration:  # the reader found no table at all
        raise ValueError(f"no rows could be read from {', '.join(str(p) for p in files)}: is it "
                         f"{ACCEPTED_LOCAL}?") from None


def load_hub_dataset(name: str, config: str | None, split: str) -> "datasets.Dataset":
    """`split` of the Hub dataset `name` (or its local cache); an unreachable Hub or an unknown name ends in one
    line that says what to do."""
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split)
    except (ConnectionError, OSError) as error:  # offline, or not on the Hub: one line that says what to do
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"dataset {name!r} is not a local path ({str(Path(name).resolve())!r} does not exist) and could not be "
            f"loaded from the Hugging Face Hub ({reason}): give {ACCEPTED_LOCAL}, or load it while online once so "
            "that it is cached") from error
    except Exception as error:  # add a hint but keep the original exception type
        error.add_note(
            f"llm2diff: {name!r} was treated as a Hugging Face Hub dataset name because no local path "
            f"{str(Path(name).resolve())!r} exists. For local data give {ACCEPTED_LOCAL}."
        )
        raise


def is_builtin_dataset(name: str | None) -> bool:
    """Whether ``name`` selects a built-in task (``"builtin:<task>"``)."""
    return bool(name) and name.strip().lower().startswith(BUILTIN_PREFIX)


def builtin_task(name: str) -> str:
    """The task of a ``"builtin:<task>"`` name (case and surrounding spaces ignored); unknown names raise."""
    task = name.strip().lower()[len(BUILTIN_PREFIX):]
    if task not in BUILTIN_TASKS:
        raise ValueError(f"Unknown built-in dataset {name!r}; available: {BUILTIN_NAMES}.")
    return task


def is_arc_builtin(name: str | None) -> bool:
    """Whether ``name`` selects a built-in ARC-AGI training set (``"builtin:arc-agi-1"``/``-2``); never raises."""
    if not is_builtin_dataset(name):
        return False
    return name.strip().lower()[len(BUILTIN_PREFIX):] in ARC_BUILTINS  # type: ignore[union-attr]
