"""Nothing lost, nothing stale: runs killed at chosen points (SIGKILL, no cleanup) resume to exactly the files an
uninterrupted run writes; saves replace only their own files; a second writer, another model's results or another
recipe's checkpoints are refused.

The kills go through tests/killpoints.py, which makes the command's own process SIGKILL itself at the n-th call of
a function: mid-way through sampling, between checkpoints, inside a checkpoint's save, after the last checkpoint,
between the commit and the move of a model save.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from llm2diff.cli import main

KILLPOINTS = Path(__file__).with_name("killpoints.py")
PROBLEMS = [
    {"question": "tom has 3 apples . he buys 4 more . how many ?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "ana has 9 pears . she eats 2 . how many ?", "answer": "9 - 2 = 7\n#### 7"},
]
SAVE = "llm2diff.training.trainer:DiffusionSFTTrainer._save"
CHECKPOINT = "transformers.trainer:Trainer._save_checkpoint"
LOSS = "llm2diff.training.trainer:DiffusionSFTTrainer.compute_loss"
GENERATE = "llm2diff.modeling.diffusion_lm:DiffusionLM.generate"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    make_model("qwen2", layers=2).save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS * 8))
    return root


def recipe(workdir, name, **overrides) -> str:
    fields = dict(
        model_name_or_path=str(workdir / "tiny"), dataset_name=str(workdir / "train.jsonl"), block_size=4,
        output_dir=str(workdir / name), max_steps=6, save_steps=2, per_device_train_batch_size=4, learning_rate=0.01,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True, gradient_checkpointing=False,
        use_lora=True, lora_r=4, lora_dropout=0.1, t_min=0.3, loss_weighting="mean", seed=0,
    )
    fields.update(overrides)
    path = workdir / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return str(path)


def killed(target: str, count: int, when: str, argv: list[str], match: str | None = None) -> None:
    """Run `llm2diff *argv` in a child process that SIGKILLs itself at the given point; assert that it did."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    spec = [target, str(count), when] + ([match] if match else [])
    proc = subprocess.run([sys.executable, str(KILLPOINTS), *spec, "--", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {spec} (rc {proc.returncode}): {proc.stderr[-3000:]}"


def same_model_files(a: Path, b: Path) -> None:
    """The saved weights equal bit for bit; the saved settings equal but for when and where the run started."""
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()

    def settings(path):
        config = json.loads((path / "diffusion_config.json").read_text())
        for key in ("started", "command"):
            config["training"].pop(key)
        for key in ("output_dir", "resume_from_checkpoint"):
            config["training"]["recipe"].pop(key, None)
        return config

    assert settings(a) == settings(b)


# -- saves -----------------------------------------------------------------------------------------------------------
def test_a_save_replaces_its_own_files_and_nothing_else(workdir, tmp_path):
    import torch

    from llm2diff import load

    assert main(["train", "--config", recipe(workdir, "save-base", max_steps=2)]) == 0
    dlm = load(workdir / "save-base")
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"kept")
    (out / "eval").mkdir()
    (out / "eval" / "results.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    dlm.significance = torch.rand(96)
    dlm.save_pretrained(out)
    assert (out / "significance.safetensors").is_file()
    dlm.significance = None
    dlm.save_pretrained(out)  # this save writes no significance table: the previous save's one goes
    assert not (out / "significance.safetensors").exists()
    assert (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == b"kept"
    assert (out / "eval" / "results.jsonl").read_text() == "{}\n" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".llm2diff-save.json"]
    assert load(out).config.block_size == 4


def test_saved_files_honour_the_umask(workdir, tmp_path):
    from llm2diff import load
    from llm2diff.atomic import write_json_atomic

    dlm = load(workdir / "save-base") if (workdir / "save-base").is_dir() else None
    if dlm is None:
        pytest.skip("needs the model of test_a_save_replaces_its_own_files_and_nothing_else")
    previous = os.umask(0o022)
    try:
        dlm.save_pretrained(tmp_path / "shared")
        write_json_atomic(tmp_path / "shared" / "record.json", {})
        os.umask(0o077)
        dlm.save_pretrained(tmp_path / "private")
    finally:
        os.umask(previous)
    for name in ("adapter_model.safetensors", "diffusion_config.json", "tokenizer.json", "record.json"):
        assert (tmp_path / "shared" / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private" / "diffusion_config.json").stat().st_mode & 0o777 == 0o600


# -- training --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(workdir):
    """The uninterrupted run the resumed ones must equal."""
    assert main(["train", "--config", recipe(workdir, "reference")]) == 0
    return workdir / "reference"


def test_training_killed_again_and_again_resumes_to_the_uninterrupted_weights(workdir, reference_run):
    """Killed between checkpoints, inside a checkpoint's save, after the last checkpoint (at max_steps), and
    between the commit and the move of the final save: each run resumes; the end is the reference, bit for bit."""
    from llm2diff import load

    path = recipe(workdir, "chain")
    out = workdir / "chain"
    resume = ["train", "--config", path, "--resume_from_checkpoint", "true"]
    killed(LOSS, 3, "before", ["train", "--config", path])  # during step 3: checkpoint-2 is the last one
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    killed(SAVE, 1, "after", resume)  # checkpoint-4's weights written, its trainer state not
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    killed(CHECKPOINT, 2, "after", resume)  # checkpoint-6 (= max_steps) complete, the final save not made
    assert (out / "checkpoint-6" / "trainer_state.json").is_file() and not (out / "adapter_model.safetensors").exists()
    killed("os:replace", 1, "after", resume, match=f"'{out}/.llm2diff-commit/adapter_model")  # mid-move
    assert (out / ".llm2diff-commit").is_dir()
    load(out)  # finishes the committed save
    assert not (out / ".llm2diff-commit").exists()
    same_model_files(out, reference_run)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6  # never a step past max_steps
    for step in (2, 4, 6):
        assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes() == \
            (reference_run / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()


def test_a_save_killed_before_its_commit_leaves_the_previous_save_whole(workdir, reference_run, tmp_path):
    from llm2diff import load

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    (out / "trainer_state.json").unlink(missing_ok=True)
    path = recipe(workdir, "precommit", output_dir=str(out), max_steps=8)
    killed("os:rename", 1, "before", ["train", "--config", path, "--resume_from_checkpoint", "true"],
           match=f"'{out}/.llm2diff-staging")  # the final save staged, not committed
    assert (out / "adapter_model.safetensors").read_bytes() == before  # the old save, whole
    assert load(out).config.block_size == 4
    assert main(["train", "--config", path, "--resume_from_checkpoint", "true"]) == 0  # the leftover is cleared
    assert not [p.name for p in out.iterdir() if p.name.startswith(".llm2diff-staging")]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8


def test_resume_skips_an_incomplete_checkpoint_and_refuses_what_cannot_resume(workdir, reference_run, tmp_path,
                                                                            capsys):
    from llm2diff.training.checkpoints import checkpoint_problem, newest_complete_checkpoint

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "checkpoint-8").mkdir()  # a kill right after the trainer made the folder
    data = (out / "checkpoint-6" / "adapter_model.safetensors").read_bytes()
    (out / "checkpoint-6" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # cut short
    assert newest_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert "cut short" in checkpoint_problem(out / "checkpoint-6")
    assert "no trainer_state.json" in checkpoint_problem(out / "checkpoint-8")
    base = ["train", "--config", recipe(workdir, "resume-errors", output_dir=str(out))]
    assert main([*base, "--resume_from_checkpoint", str(out / "checkpoint-6")]) == 2
    assert "cannot resume from" in capsys.readouterr().err
    assert main([*base, "--resume_from_checkpoint", str(out / "checkpoint-4"), "--max_steps", "2"]) == 2
    assert "beyond max_steps=2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--config", recipe(workdir, "resume-none", output_dir=str(empty)),
                 "--resume_from_checkpoint", "true"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_a_resume_with_another_recipe_or_data_is_refused(workdir, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    other = ["train", "--config", recipe(workdir, "other", output_dir=str(out))]
    assert main([*other, "--learning_rate", "0.02", "--resume_from_checkpoint", "true"]) == 2
    err = capsys.readouterr().err
    assert "holds a training run of a different recipe (it differs in learning_rate)" in err and "delete" in err
    assert main([*other, "--learning_rate", "0.02"]) == 2  # a fresh start beside these checkpoints would mix too
    assert "delete its checkpoint-2, checkpoint-4, checkpoint-6 to train afresh" in capsys.readouterr().err
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in reversed(PROBLEMS * 8)))
    assert main([*other, "--dataset_name", str(data), "--resume_from_checkpoint", "true"]) == 2
    assert "differs in data, dataset_name" in capsys.readouterr().err
    # the same recipe, or one that only trains longer, resumes
    assert main([*other, "--max_steps", "8", "--resume_from_checkpoint", "true"]) == 0


def test_a_second_writer_is_refused(workdir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".llm2diff.lock", "w") as holder:  # another run holds the directory
        holder.write("pid 4242 on host, `llm2diff train --config x.yaml`, since 2026-12-06 10:00:00\n")
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["train", "--config", recipe(workdir, "busy", output_dir=str(out), max_steps=2)]) == 2
        err = capsys.readouterr().err
        assert "is in use by another llm2diff run (pid 4242" in err and "llm2diff train --config x.yaml" in err
        assert sorted(p.name for p in out.iterdir()) == [".llm2diff.lock"]  # nothing written
    assert main(["train", "--config", recipe(workdir, "busy", output_dir=str(out), max_steps=2)]) == 0


def test_a_run_nests_its_own_locks_and_leaves_no_empty_directory(tmp_path):
    from llm2diff.rundir import output_lock

    out = tmp_path / "new"
    with output_lock(out):
        with output_lock(out):  # e.g. `rounds` holding the directory that its STaR stage locks again
            pass
        with open(out / ".llm2diff.lock") as other, pytest.raises(BlockingIOError):  # still held after the inner one
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not out.exists()  # created by the lock and nothing written: removed again


# -- evaluation ------------------------------------------------------------------------------------------------------
def _eval_args(model, out, *extra):
    return ["eval", "--task", "arithmetic", "--model", str(model), "--output_dir", str(out), "--max_new_tokens", "8",
            "--batch_size", "2", "--limit", "6", "--temperature", "1.0", *extra]


def test_a_sampled_eval_killed_mid_way_resumes_to_the_uninterrupted_results(reference_run, tmp_path):
    assert main(_eval_args(reference_run, tmp_path / "whole")) == 0
    out = tmp_path / "resumed"
    killed(GENERATE, 2, "after", _eval_args(reference_run, out))  # batch 2 drawn, not written
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    killed(GENERATE, 2, "before", _eval_args(reference_run, out))  # batch 2 again, then killed before batch 3
    assert main(_eval_args(reference_run, out)) == 0
    assert (out / "results.jsonl").read_bytes() == (tmp_path / "whole" / "results.jsonl").read_bytes()
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["metrics"] == whole["metrics"] and resumed["num_examples"] == 6


def test_eval_results_of_another_model_are_not_resumed(workdir, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["train", "--config", recipe(workdir, "eval-model", output_dir=str(model), max_steps=2,
                                             save_steps=1000)]) == 0
    out = tmp_path / "eval"
    assert main(_eval_args(model, out)) == 0
    retrain = ["train", "--config", recipe(workdir, "eval-model", output_dir=str(model), max_steps=4,
                                           save_steps=1000, learning_rate=0.02)]
    assert main(retrain) == 2  # its checkpoints would mix into a later resume
    assert "delete its checkpoint-2 to train afresh there" in capsys.readouterr().err
    shutil.rmtree(model / "checkpoint-2")
    assert main(retrain) == 0  # retrained in place
    capsys.readouterr()
    assert main(_eval_args(model, out)) == 2
    err = capsys.readouterr().err
    assert f"the model at {model} is not the one these results came from" in err and f"delete {out}" in err


# -- STaR ------------------------------------------------------------------------------------------------------------
def star_recipe(workdir, name, **overrides) -> str:
    return recipe(workdir, name, max_steps=4, save_steps=2, star_task="arithmetic",
                  star_source=str(workdir / "train.jsonl"), star_eval_split="test", star_num_problems=4,
                  star_eval_problems=4,
                  star_samples_per_problem=2, star_temperature=1.0, star_max_new_tokens=8, star_batch_size=4,
                  star_train_steps=4, star_eval_batch_size=4, star_rounds=1, star_rationalize=True,
                  star_mix_sft=2, **overrides)


def test_star_killed_at_every_stage_resumes_to_the_uninterrupted_rounds(workdir):
    assert main(["star", "--config", star_recipe(workdir, "star-whole")]) == 0
    argv = ["star", "--config", star_recipe(workdir, "star-killed")]
    out = workdir / "star-killed"
    killed(GENERATE, 2, "before", argv, match="'temperature': 1.0")  # round 1: one sampling batch written
    killed(CHECKPOINT, 2, "after", argv)  # round 1's model at its last checkpoint (step 4), not saved
    assert not (out / "round-1" / "model" / "adapter_model.safetensors").exists()
    killed("os:replace", 1, "after", argv, match=f"'{out}/round-1/model/.llm2diff-commit/adapter_model")
    assert main(argv) == 0
    whole = workdir / "star-whole"
    for name in ("samples.jsonl", "rationalized.jsonl", "eval/results.jsonl"):
        if (whole / "round-1" / name).is_file():
            assert (out / "round-1" / name).read_text() == (whole / "round-1" / name).read_text(), name
    same_model_files(out / "round-1" / "model", whole / "round-1" / "model")
    state = json.loads((out / "round-1" / "model" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (out / "round-1" / "model" / "checkpoint-5").exists()
    accuracy = [r["accuracy"] for r in json.loads((out / "report.json").read_text())["rounds"]]
    assert accuracy == [r["accuracy"] for r in json.loads((whole / "report.json").read_text())["rounds"]]
