"""Writing outputs so that an interruption never leaves a half-written file or directory behind.

Three shapes of write:
- one file: `write_bytes_atomic` / `write_text_atomic` / `write_json_atomic` (a temporary file, then a rename);
- a directory that is one thing (a cache entry, a dataset): `atomic_directory` (replaced whole);
- a saved model inside a directory that also holds other things (checkpoints, evaluation results, the user's own
  files): `atomic_save`. The files of one save are staged, then committed by one rename; they replace their
  namesakes and the files of the previous save that this one no longer writes (listed in its manifest,
  `.llm2diff-save.json`), and nothing else. A save cut short after its commit is finished by the next
  `finish_interrupted_save` (every save and every `load` calls it), so a reader sees the old save or the new
  one, never a mix (a new adapter beside an old `diffusion_config.json`).

Everything written here honours the process umask, as an ordinary `open()` does (temporary files and
directories would otherwise be created 0600 / 0700, unreadable to a team sharing the folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST_NAME = ".llm2diff-save.json"  # the files of the last `atomic_save` into a directory, with their hashes
COMMIT_NAME = ".llm2diff-commit"  # a complete save not yet moved into place
STAGING_PREFIX = ".llm2diff-staging-"  # a save being written (abandoned when its process is gone)


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_mode(directory: bool = False) -> int:
    return (0o777 if directory else 0o666) & ~current_umask()


def _ordinary_modes(root: Path) -> None:
    """Give everything under `root` the mode an ordinary write would (libraries that write through temporary
    files leave 0600 behind)."""
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, _ordinary_mode(directory=path.is_dir()))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it into place."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, then rename it into place (parents created).

    The file gets the mode an ordinary write would give it: an existing file's own, else 0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else _ordinary_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
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

    An existing directory at `path` stays intact until the new one is complete. For a model saved into a
    directory that holds anything else, use `atomic_save`, which leaves the rest alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, _ordinary_mode(directory=True))
        yield tmp
        _ordinary_modes(tmp)
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


# -- a save among other files ------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_save(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory for the files of one save into `directory`; commit them on success.

    On success the staged files (with a manifest of their sizes and SHA-256) replace their namesakes in
    `directory`, and the files the previous save listed in its manifest but this one did not write are removed.
    Nothing else in `directory` is touched. On error the staging directory is removed and `directory` is as it
    was. The commit point is one rename (staging -> `.llm2diff-commit`); see `finish_interrupted_save`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(directory)
    _remove_abandoned_staging(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    try:
        os.chmod(tmp, _ordinary_mode(directory=True))
        yield tmp
        _ordinary_modes(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {"files": {name: _file_record(tmp / name) for name in files}}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        os.rename(tmp, directory / COMMIT_NAME)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_interrupted_save(directory)


def finish_interrupted_save(directory: str | os.PathLike) -> bool:
    """Move a committed save (`.llm2diff-commit`) into place, if one is waiting; True if there was one.

    Safe to repeat after an interruption of its own: the old manifest, which says what the previous save wrote,
    is replaced last, and every step before it can be done twice.
    """
    directory = Path(directory)
    commit = directory / COMMIT_NAME
    if not commit.is_dir():
        return False
    new = json.loads((commit / MANIFEST_NAME).read_text())["files"]
    for name in read_manifest(directory):
        if name not in new:  # written by the previous save, not by this one
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
    for name in new:
        staged = commit / name
        if staged.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, directory / name)
    os.replace(commit / MANIFEST_NAME, directory / MANIFEST_NAME)
    shutil.rmtree(commit, ignore_errors=True)
    return True


def read_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """`{file: {"size", "sha256"}}` of the last `atomic_save` into `directory` ({} when there was none)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        return {}


def _remove_abandoned_staging(directory: Path) -> None:
    """Remove staging directories of saves whose process is gone (killed before their commit point)."""
    for staging in directory.glob(f"{STAGING_PREFIX}*"):
        pid = staging.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


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
