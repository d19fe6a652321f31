"""What an output directory holds besides the outputs: a lock against a second writer, and a record of what
produced it, so that a resumed run never mixes with another one.

    with output_lock("outputs/run", enabled=is_main_process):
        check_run_record("outputs/run", {"recipe": key, "data": data_fingerprint}, name="llm2diff_run.json")
        ...   # write outputs

`output_lock` takes an exclusive `flock` on `<dir>/.llm2diff.lock` (released by the operating system when the
process ends, however it ends): a second `llm2diff` command writing into the same directory stops at once and
says which process holds it. `check_run_record` compares what a resume depends on (the recipe, fingerprints of
the data and of the model) with what the directory recorded when the run started, and refuses a mismatch
naming what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llm2diff.atomic import read_manifest, sha256_file, write_json_atomic

logger = logging.getLogger("llm2diff")

LOCK_NAME = ".llm2diff.lock"
RUN_RECORD = "llm2diff_run.json"

_held: dict[str, list] = {}  # resolved directory -> [file descriptor, depth]: a process may nest its own locks


# recipe keys that may change between invocations of one run: they say how long, how often or where, not what the
# next step computes (raising `max_steps` or `star_rounds` continues a finished run)
RESUMABLE_KEYS = ("max_steps", "num_train_epochs", "resume_from_checkpoint", "report_to", "logging_steps",
                  "logging_dir", "logging_strategy", "save_steps", "save_strategy", "save_total_limit", "eval_steps",
                  "disable_tqdm", "dataloader_num_workers", "output_dir", "run_name", "push_to_hub", "hub_model_id",
                  "hub_strategy", "hub_private_repo", "hub_token", "star_rounds", "rounds")


def resume_key(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without the keys a resumed run may change (`RESUMABLE_KEYS`, and the settings of the final
    evaluation and of the saved sampler defaults, which act after training)."""
    return {k: v for k, v in recipe.items() if k not in RESUMABLE_KEYS and not k.startswith(("final_eval_", "sampler_"))}


class RunDirectoryError(ValueError):
    """An output directory that this run must not write into (in use, or holding another run's outputs)."""


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, enabled: bool = True) -> Iterator[Path]:
    """Hold `directory` (created if needed) for this process; a second writer gets `RunDirectoryError`.

    Re-entrant within a process. On leaving, a directory that this call created and that holds nothing but the
    lock file is removed again, so a run that fails before writing anything leaves nothing behind.
    """
    path = Path(directory).expanduser()
    key = str(path.resolve())
    if not enabled or key in _held:
        if key in _held:
            _held[key][1] += 1
        try:
            yield path
        finally:
            if key in _held:
                _held[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        yield path
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirectoryError(
            f"{path} is in use by another llm2diff run ({holder}); two runs writing one directory would mix their "
            "outputs: wait for that run to finish, or choose another output directory") from None
    except OSError as error:  # a file system without locks (some network mounts): go on, unguarded
        os.close(fd)
        logger.warning("cannot lock %s (%s): a second run writing there at the same time would not be stopped",
                       path, error.strerror)
        yield path
        return
    from llm2diff.redact import redact_argv

    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, `{' '.join(redact_argv(sys.argv))}`, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())
    _held[key] = [fd, 1]
    try:
        yield path
    finally:
        del _held[key]
        os.close(fd)  # releases the lock
        if created:
            with contextlib.suppress(OSError):
                if [p.name for p in path.iterdir()] == [LOCK_NAME]:
                    lock.unlink()
                    path.rmdir()


def check_writable(path: str | os.PathLike, what: str = "output directory") -> None:
    """Fail now, before any work, when `path` (a directory, existing or to be created) cannot be written.

    Tries what the run will do (create a file in it, or a directory beside it) and removes the attempt: permission
    bits alone do not tell (a read-only mount, or root on a system folder).
    """
    path = Path(path).expanduser()
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(20, "not a directory", str(probe_in))
        import tempfile

        with tempfile.TemporaryDirectory(dir=probe_in, prefix=".llm2diff-write-check-"):
            pass
    except OSError as error:
        raise PermissionError(error.errno, f"{error.strerror}; the {what} must be writable", str(path)) from None


def check_run_record(directory: str | os.PathLike, key: dict[str, Any], name: str = RUN_RECORD,
                     what: str = "run", replace: bool = False, recipe: dict[str, Any] | None = None,
                     remedy: str | None = None) -> None:
    """Refuse to continue a run in `directory` that was started with a different `key`; record `key` otherwise.

    `key` maps names (recipe keys, "data", "policy", ...) to what a resume depends on. The record
    (`directory/name`) keeps it with the whole `recipe` as last run (for reports), the library versions and the
    start time. An entry the earlier record lacks (written by an older llm2diff) is not held against it. With
    `replace`, a different record is replaced instead of refused (a fresh start that leaves nothing of the old run
    to resume). `remedy` replaces the default advice of the refusal (another directory, or delete this one).
    """
    from llm2diff.modeling.config import library_versions

    path = Path(directory) / name
    record = {"recipe": recipe if recipe is not None else key, "key": key, "versions": library_versions(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            recorded = previous.get("key", previous["recipe"])  # older records kept the key as "recipe"
        except (ValueError, KeyError, TypeError, AttributeError):
            previous, recorded = {}, None
        changed = ["the record itself (damaged)"] if recorded is None else describe_changes(recorded, key)
        if not changed:
            if previous.get("recipe") != record["recipe"]:  # e.g. star_rounds raised: the report shows it
                write_json_atomic(path, {**record, "started": previous.get("started", record["started"])})
            return
        if not replace:
            raise RunDirectoryError(
                f"{directory} holds a {what} of a different recipe (it differs in {', '.join(changed)}), so "
                "resuming there would mix the two: " + (remedy or f"choose another output directory, or delete "
                                                                  f"{directory} to start fresh"))
        logger.warning("%s held a %s of a different recipe (it differs in %s); starting afresh", directory, what,
                       ", ".join(changed))
    write_json_atomic(path, record)


def describe_changes(recorded: dict[str, Any], key: dict[str, Any]) -> list[str]:
    """The names whose values differ between two keys (entries missing from `recorded` excepted)."""
    return sorted(k for k in set(recorded) | set(key) if k in recorded and recorded.get(k) != key.get(k))


# -- fingerprints ----------------------------------------------------------------------------------------------------
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


def model_fingerprint(directory: str | os.PathLike) -> str:
    """A digest of what loading the model at `directory` reads (weights, configs, tokenizer).

    From the manifest of its last save when there is one (`llm2diff.atomic.atomic_save` hashed the files as it
    wrote them), else from the files themselves.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest:
        files = {name: record["sha256"] for name, record in manifest.items() if not name.startswith("training_args")}
    else:
        files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
                 if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith(".")
                 and p.name not in ("final_eval.json", "trainer_state.json", RUN_RECORD)}
    return _digest(json.dumps(files, sort_keys=True))


def rows_fingerprint(rows: Iterable[Any]) -> str:
    """A digest of JSON-like rows (problems, prompts), in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset, columns: Iterable[str] | None = None, batch_size: int = 1024) -> str:
    """A digest of a `datasets.Dataset`'s rows (only `columns` when given), in order."""
    names = [c for c in (columns or dataset.column_names) if c in dataset.column_names]
    digest = hashlib.sha256()
    for batch in dataset.select_columns(names).iter(batch_size=batch_size):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
