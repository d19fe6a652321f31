"""Bad input is refused, not absorbed: out-of-range sampler values, options that would be silently ignored, saved
configs that cannot be trusted, and every failure a new user meets ends in one line that says what to do (no
traceback unless --debug). Credentials never reach a file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.cli import main

PROBLEMS = [{"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"}]
SECRET = "hf_NotARealTokenButSecret123"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    make_model("qwen2", layers=2).save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS * 8))
    (root / "afile").write_text("not a directory")
    return root


def recipe(workdir, name, **overrides) -> str:
    fields = dict(
        model_name_or_path=str(workdir / "tiny"), dataset_name=str(workdir / "train.jsonl"), block_size=4,
        output_dir=str(workdir / name), max_steps=2, save_steps=1, per_device_train_batch_size=4, learning_rate=0.01,
        report_to="none", use_cpu=True, gradient_checkpointing=False, use_lora=True, lora_r=4, seed=0,
    )
    fields.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


@pytest.fixture(scope="module")
def model(workdir):
    assert main(["train", "--config", recipe(workdir, "model", hub_token=SECRET)]) == 0
    return workdir / "model"


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# -- sampler values --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--threshold", "-1"], "threshold must be in [0, 1]"),
    (["--threshold", "1.5"], "threshold must be in [0, 1]"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "1", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "1", "--top-k", "-1"], "top_k must be >= 0"),
    (["--top-p", "0.9"], "top_p filters what is sampled, but temperature 0 decodes greedily"),
    (["--top-k", "5", "--top-p", "0.9"], "top_k and top_p filter what is sampled"),
    (["--tokens-per-step", "0"], "tokens_per_step must be >= 1"),
    (["--lossless", "--max-new-tokens", "700"], "exceeds the model's maximum length 512"),
    (["--max-new-tokens", "700"], "exceeds the model's maximum length 512"),
])
def test_sampler_values_outside_their_range_are_refused(model, capsys, flags, message):
    line = one_line_error(capsys, ["generate", "--model", str(model), "--prompt", "tom has 3 apples", *flags])
    assert message in line


def test_options_a_decoding_would_ignore_are_refused(model):
    import torch

    from llm2diff import load

    dlm = load(model)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="temperature, top_p do not apply to lossless decoding"):
        dlm.generate(ids, max_new_tokens=4, mode="lossless", temperature=0.7, top_p=0.9)
    with pytest.raises(ValueError, match="threshold does not apply to lossless decoding"):
        dlm.generate(ids, max_new_tokens=4, mode="lossless", threshold=0.5)
    with pytest.raises(ValueError, match="tokens_per_step does not apply to verified decoding"):
        dlm.generate(ids, max_new_tokens=4, mode="verified", tokens_per_step=2)
    sampled = dlm.generate(ids, max_new_tokens=8, temperature=1.0, top_k=1, seed=3).sequences
    assert torch.equal(sampled, dlm.generate(ids, max_new_tokens=8).sequences)  # top_k 1 applies: greedy


def test_max_steps_zero_is_refused_before_anything_is_written(workdir, capsys):
    line = one_line_error(capsys, ["train", "--config", recipe(workdir, "zero", max_steps=0)])
    assert "max_steps=0 cannot be trained" in line
    assert not (workdir / "zero").exists()


# -- one line, saying what to do -------------------------------------------------------------------------------------
def test_failures_a_new_user_meets_end_in_one_line(workdir, model, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["train", "--config", recipe(workdir, "hub", model_name_or_path="Qwen/Qwen2.5-0.5B")],
         "'Qwen/Qwen2.5-0.5B' is not a local directory, and the Hugging Face Hub could not provide it"),
        (["train", "--config", recipe(workdir, "hubdata", dataset_name="openai/gsm8k")],
         "could not be loaded from the Hugging Face Hub"),
        (["train", "--config", recipe(workdir, "empty", dataset_name=str(empty))], f"dataset file {empty} is empty"),
        (["train", "--config", recipe(workdir, "nomodel", model_name_or_path=str(tmp_path))],
         "is a directory without config.json"),
        (["train", "--config", recipe(workdir, "ro", output_dir=str(workdir / "afile" / "out"))],
         f"cannot write {workdir / 'afile' / 'out'}"),
        (["eval", "--task", "arithmetic", "--model", str(model), "--output_dir", str(workdir / "afile" / "ev")],
         f"cannot write {workdir / 'afile' / 'ev'}"),
        (["export", str(model), "--merge", "--out", str(workdir / "afile" / "merged")], "cannot write"),
        (["generate", "--model", str(model), "--prompt", "hi", "--save-trajectory",
          str(workdir / "afile" / "t.html")], "--save-trajectory location must be writable"),
        (["eval", "--task", "arithmetic", "--model", str(model), "--task_options", '{"foo": 1}',
          "--output_dir", str(tmp_path / "ev")], "task 'arithmetic' has no option 'foo' (its options:"),
        (["eval", "--task", "arithmetic", "--model", str(model), "--task_options", "[1]",
          "--output_dir", str(tmp_path / "ev")], "must be a JSON object"),
        (["generate", "--model", str(tmp_path), "--prompt", "hi"], "is not a model saved by llm2diff"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, argv), argv
    star = recipe(workdir, "star-ro", output_dir=str(workdir / "afile" / "star"), star_task="arithmetic")
    assert "cannot write" in one_line_error(capsys, ["star", "--config", star])


def test_a_damaged_model_file_is_named(model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    line = one_line_error(capsys, ["generate", "--model", str(broken), "--prompt", "hi"])
    assert "adapter_model.safetensors cannot be loaded: adapter_model.safetensors is cut short" in line
    assert "save (or download) the model again" in line


def test_debug_shows_the_traceback_and_unexpected_errors_stay_one_line(model, capsys, monkeypatch):
    from llm2diff import cli

    def broken(argv):
        raise KeyError("boom")

    monkeypatch.setitem(cli.COMMANDS, "generate", broken)
    line = one_line_error(capsys, ["generate", "--model", str(model)], code=1)
    assert "KeyError: 'boom'" in line and "--debug" in line
    with pytest.raises(KeyError):
        main(["generate", "--debug", "--model", str(model)])
    monkeypatch.setenv("LLM2DIFF_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["generate", "--model", str(model)])


def test_an_interruption_says_the_command_resumes(model, capsys, monkeypatch):
    from llm2diff import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    assert main(["eval"]) == 130
    assert "interrupted; what was finished is kept, and the same command resumes" in capsys.readouterr().err


# -- saved configs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("block_size"), "lacks block_size"),
    (lambda c: c.pop("mask_token_id"), "lacks mask_token_id"),
    (lambda c: c.update(block_size="4"), "block_size must be int, got '4'"),
    (lambda c: c.update(shift=1), "shift must be bool, got 1"),
    (lambda c: c.update(new_setting=1), "does not know: ['new_setting']; the file is damaged or was edited"),
    (lambda c: (c.update(new_setting=1), c["versions"].update(llm2diff="99.0")),
     "written by llm2diff 99.0, newer than this"),
])
def test_a_saved_config_that_cannot_be_trusted_is_refused(model, tmp_path, capsys, edit, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    config = json.loads((copy / "diffusion_config.json").read_text())
    edit(config)
    (copy / "diffusion_config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, ["generate", "--model", str(copy), "--prompt", "hi"])
    assert str(copy / "diffusion_config.json") in line and message in line


def test_a_model_from_a_newer_llm2diff_loads_with_a_warning(model, tmp_path, caplog):
    import shutil

    from llm2diff import load

    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    config = json.loads((copy / "diffusion_config.json").read_text())
    config["versions"]["llm2diff"] = "99.0"
    (copy / "diffusion_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        assert load(copy).config.block_size == 4
    assert "written by llm2diff 99.0, newer than this" in caplog.text


# -- credentials -------------------------------------------------------------------------------------------------------
def test_a_token_given_to_train_is_written_nowhere(model):
    written = [p for p in Path(model).rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and any("checkpoint-" in str(p) for p in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    config = json.loads((model / "diffusion_config.json").read_text())
    assert config["training"]["recipe"]["hub_token"] == "<redacted>"


def test_command_lines_and_arguments_are_redacted():
    from types import SimpleNamespace

    from llm2diff.redact import redact, redact_argv, redacted_training_args

    assert redact_argv(["train", "--hub_token", SECRET, "--hub-token=" + SECRET, "--mask_token", "<m>"]) == \
        ["train", "--hub_token", "<redacted>", "--hub-token=<redacted>", "--mask_token", "<m>"]
    assert redact({"hub_token": SECRET, "mask_token": "<m>", "nested": ["--token " + SECRET]}) == \
        {"hub_token": "<redacted>", "mask_token": "<m>", "nested": ["--token <redacted>"]}
    args = SimpleNamespace(hub_token=SECRET, push_to_hub_token=None, learning_rate=1e-4)
    clean = redacted_training_args(args)
    assert clean.hub_token is None and clean.learning_rate == 1e-4 and args.hub_token == SECRET


def test_push_uploads_no_symbolic_link(model, tmp_path, monkeypatch, caplog):
    import shutil

    from llm2diff.hub import saved_model_files

    copy = tmp_path / "copy"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    outside = tmp_path / "system-file"
    outside.write_text("private")
    os.symlink(outside, copy / "vocab.txt")
    with caplog.at_level(logging.WARNING):
        files = saved_model_files(copy).files
    assert "vocab.txt" not in files and "adapter_model.safetensors" in files
    assert "symbolic links are never uploaded" in caplog.text
    (copy / "tokenizer.json").unlink()
    os.symlink(outside, copy / "tokenizer.json")
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="symbolic links are not model files: tokenizer.json"):
        saved_model_files(copy)


def test_push_while_offline_says_so(model, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(capsys, ["push", str(model), "--repo-id", "alice/tiny", "--token", SECRET], code=1)
    assert "cannot reach the Hugging Face Hub" in line and "nothing was uploaded" in line
    assert SECRET not in line
