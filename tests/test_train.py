"""End to end: `llm2diff train` on a tiny model learns, saves, reloads, resumes; bad input fails clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff import load
from llm2diff.cli import main

PROBLEMS = [
    {"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "ana has 9 pears . she eats 2 . how many ?", "answer": "9 - 2 = 7\n#### 7"},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model_dir = root / "tiny-qwen2"
    make_model("qwen2", layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS * 8))
    return root


def _recipe(workdir, name, **overrides):
    fields = dict(
        model_name_or_path=str(workdir / "tiny-qwen2"), dataset_name=str(workdir / "train.jsonl"), block_size=4,
        output_dir=str(workdir / name), max_steps=60, per_device_train_batch_size=4, learning_rate=0.01,
        lr_scheduler_type="constant", logging_steps=10, save_steps=1000, report_to="none", use_cpu=True,
        gradient_checkpointing=False, use_lora=False, t_min=0.3, loss_weighting="mean", seed=0,
    )
    fields.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def _prompt_ids(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def test_train_learns_saves_and_reloads(workdir, capsys):
    assert main(["train", "--config", _recipe(workdir, "full")]) == 0
    out = workdir / "full"
    dlm = load(out)
    config = json.loads((out / "diffusion_config.json").read_text())
    assert config["block_size"] == 4 and config["mask_token"] == "<|mask|>"
    assert config["training"]["seed"] == 0 and config["training"]["recipe"]["learning_rate"] == 0.01
    assert "transformers" in config["versions"] and "torch" in config["versions"]
    for problem in PROBLEMS:
        ids = _prompt_ids(dlm.tokenizer, problem["question"])
        expected = dlm.tokenizer(problem["answer"], add_special_tokens=False).input_ids + [dlm.tokenizer.eos_token_id]
        new = dlm.generate(ids, max_new_tokens=12).sequences[0, ids.shape[1]:]
        assert new[: len(expected)].tolist() == expected  # the memorised answer, then end-of-sequence
        assert (new[len(expected):] == dlm.tokenizer.pad_token_id).all()
    # the command line renders the prompt as training did and prints the same answer
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", PROBLEMS[0]["question"], "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert dlm.tokenizer.decode(dlm.tokenizer(PROBLEMS[0]["answer"]).input_ids) in printed
    assert "forward passes" in printed


def test_semantic_noise_run_saves_its_significance_table_and_samples_coarse_to_fine(workdir, capsys):
    cache = workdir / "score-cache"
    recipe = _recipe(workdir, "semantic", noise_order="semantic", semantic_scorer="idf", semantic_temperature=0.3,
                     t_sampling="stratified", semantic_cache_dir=str(cache), attention_anneal_steps=20)
    assert main(["train", "--config", recipe]) == 0
    assert "significance scores (idf): 16 examples" in capsys.readouterr().out
    out = workdir / "semantic"
    dlm = load(out)
    config = json.loads((out / "diffusion_config.json").read_text())
    assert config["noise"]["order"] == "semantic" and config["noise"]["semantic_temperature"] == 0.3
    assert config["significance_scorer"] == "idf"
    vocab = dlm.model.get_input_embeddings().weight.shape[0]
    assert dlm.significance.shape == (vocab,)
    tok = dlm.tokenizer
    # "####" is in every answer (low IDF), each problem's own numbers are rarer
    assert dlm.significance[tok.convert_tokens_to_ids("####")] < dlm.significance[tok.convert_tokens_to_ids("9")]
    for problem in PROBLEMS:
        ids = _prompt_ids(tok, problem["question"])
        expected = tok(problem["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        new = dlm.generate(ids, max_new_tokens=12, commit_rule="coarse_to_fine").sequences[0, ids.shape[1]:]
        assert new[: len(expected)].tolist() == expected
    # the same data and scorer again: the cached scores are reused, not recomputed
    assert main(["train", "--config", recipe, "--max_steps", "1", "--output_dir", str(workdir / "semantic2")]) == 0
    assert "significance scores (idf)" not in capsys.readouterr().out
    assert len(list((cache / "scores").iterdir())) == 1


def test_lora_run_saves_adapter_and_resumes(workdir):
    recipe = _recipe(workdir, "lora", use_lora=True, lora_r=4, max_steps=4, save_steps=2)
    assert main(["train", "--config", recipe]) == 0
    out = workdir / "lora"
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-4").is_dir()
    assert not (out / "model.safetensors").exists()  # only the adapter, not the base weights
    loaded = load(out)
    assert loaded.has_adapter
    assert main(["train", "--config", recipe, "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


@pytest.mark.parametrize("overrides,message", [
    ({"blok_size": 4}, "unknown recipe key 'blok_size'"),
    ({"model_name_or_path": "./no/such/model"}, "model path './no/such/model' does not exist"),
    ({"dataset_name": "./missing.jsonl"}, "missing.jsonl"),
    ({"block_size": 64, "max_length": 32}, "block_size=64 exceeds max_length=32"),
    ({"eval_strategy": "steps"}, "needs held-out data"),
])
def test_bad_input_fails_with_a_clear_message(workdir, capsys, overrides, message):
    assert main(["train", "--config", _recipe(workdir, "bad", **overrides)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dataset_without_needed_columns(workdir, capsys):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    assert main(["train", "--config", _recipe(workdir, "bad2", dataset_name=str(bad))]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "question" in err


def test_chat_data_needs_a_chat_template(workdir, capsys):
    no_template = workdir / "no-template"
    make_model("qwen2").save_pretrained(no_template)
    tok = make_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(no_template)
    assert main(["train", "--config", _recipe(workdir, "bad3", model_name_or_path=str(no_template))]) == 2
    assert "chat template" in capsys.readouterr().err


def test_no_half_written_output_on_failure(workdir):
    main(["train", "--config", _recipe(workdir, "bad4", dataset_name="./missing.jsonl")])
    assert not (workdir / "bad4").exists()


def test_same_recipe_runs_under_accelerate_launch(workdir):
    import os
    import subprocess
    import sys

    recipe = _recipe(workdir, "accel", max_steps=2, save_steps=1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm2diff", "train", "--config", recipe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((workdir / "accel" / "diffusion_config.json").read_text())
    assert config["training"]["recipe"]["max_steps"] == 2
    assert load(workdir / "accel").config.block_size == 4


def test_held_out_loss_is_logged_by_noise_bucket(workdir):
    recipe = _recipe(workdir, "evalrun", max_steps=4, eval_fraction=0.25, eval_strategy="steps", eval_steps=2,
                     logging_steps=2, loss_buckets=2, save_steps=4)
    assert main(["train", "--config", recipe]) == 0
    logs = json.loads((workdir / "evalrun" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert sum("eval_loss" in entry for entry in logs) == 2  # steps 2 and 4
    assert any(key.startswith("eval_loss_t") for entry in logs for key in entry)
    assert any(key in ("loss_t0.00-0.50", "loss_t0.50-1.00") for entry in logs for key in entry)


def test_sampler_keys_become_the_saved_model_defaults(workdir):
    from llm2diff.cli import main
    from llm2diff.sampling.config import DecodingConfig

    recipe = _recipe(workdir, "sampler-defaults", max_steps=2, sampler_commit_rule="threshold", sampler_threshold=0.7,
                     sampler_remask_threshold=0.3, sampler_remask_budget=1)
    assert main(["train", "--config", recipe]) == 0
    saved = DecodingConfig.from_pretrained(workdir / "sampler-defaults")
    assert (saved.commit_rule, saved.threshold, saved.remask_threshold, saved.remask_budget) == ("threshold", 0.7, 0.3, 1)
    assert saved.tokens_per_step == 1 and saved.sub_block_size is None  # unset keys keep the library defaults
    assert load(workdir / "sampler-defaults").decoding == saved


@pytest.mark.parametrize("block_size, causal, expected", [(4, False, [None, 0.9, "parent"]), (1, False, [None, "parent"]),
                                                     (4, True, [None, 0.9, "verified 0.9", "parent"])])
def test_final_eval_grades_an_ar_twin_once(monkeypatch, block_size, causal, expected):
    from types import SimpleNamespace

    from llm2diff.evaluation import exact_match

    calls = []

    def graded(dlm, problems, data_args, use_parent=False, mode="block", **kw):
        calls.append("parent" if use_parent else f"verified {kw['threshold']}" if mode == "verified" else
                     kw.get("threshold"))
        return len(calls)

    monkeypatch.setattr(exact_match, "evaluate_answers", graded)
    dlm = SimpleNamespace(config=SimpleNamespace(block_size=block_size, causal_clean=causal))
    results = exact_match.compare_with_parent(dlm, [], None, threshold=0.9, max_new_tokens=8)
    assert calls == expected and results == list(range(1, len(expected) + 1))


def test_editing_noise_trains_and_logs_its_terms(workdir):
    recipe = _recipe(workdir, "editrun", max_steps=4, logging_steps=2, save_steps=4, use_lora=True,
                     edit_fraction=0.3, edit_source="parent", edit_keep_weight=0.1)
    assert main(["train", "--config", recipe]) == 0
    logs = json.loads((workdir / "editrun" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in logs if "edit_loss" in entry]
    assert len(logged) == 2 and all(0 < e["edited_fraction"] < 0.3 and e["keep_loss"] > 0 for e in logged)
    recorded = json.loads((workdir / "editrun" / "diffusion_config.json").read_text())["training"]["recipe"]
    assert (recorded["edit_fraction"], recorded["edit_source"]) == (0.3, "parent")


def test_curriculum_and_self_conditioning_train_save_and_resume(workdir):
    from llm2diff.modeling.self_conditioning import self_conditioning_module

    recipe = _recipe(workdir, "curriculum", max_steps=4, logging_steps=1, save_steps=2, use_lora=True,
                     block_size_schedule="2:0.5", self_conditioning="expected_embedding")
    assert main(["train", "--config", recipe]) == 0
    out = workdir / "curriculum"
    logs = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [e["block_size"] for e in logs if "block_size" in e] == [2, 2, 4, 4]  # 2 for half the steps, then 4
    dlm = load(out)
    assert (dlm.config.block_size, dlm.config.self_conditioning) == (4, "expected_embedding")
    path = self_conditioning_module(dlm.model).modules_to_save["default"].proj.weight
    assert path.abs().sum() > 0  # trained away from its zero start, saved in the adapter
    recorded = json.loads((out / "diffusion_config.json").read_text())["training"]["recipe"]
    assert recorded["block_size_schedule"] == "2:0.5"
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint-2" / "adapter_model.safetensors"), framework="pt") as f:
        assert any("llm2diff_self_conditioning" in key for key in f.keys())  # noqa: SIM118 (safe_open is not a dict); checkpoints carry the path too
    assert main(["train", "--config", recipe, "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    assert self_conditioning_module(load(out).model).modules_to_save["default"].proj.weight.abs().sum() > 0
