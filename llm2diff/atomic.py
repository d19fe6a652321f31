"""Writing outputs so that an interruption never leaves a half-written file or directory behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it into place."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, then rename it into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole, on error it is removed.

    An existing directory at `path` stays intact until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_jsonl_records(path: str | os.PathLike, key: str = "id") -> dict[str, dict]:
    """Records of an append-only JSON Lines file, by `key`. A line cut short by an interruption is dropped (and
    removed from the file, so appending starts on a fresh line); its record is produced again by the caller."""
    path = Path(path)
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[record[key]] = record
        kept.append(line)
    if len(kept) != len(lines) or (lines and not text.endswith("\n")):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return done
