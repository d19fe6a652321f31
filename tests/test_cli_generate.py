"""`llm2diff generate`: streaming prints what the plain call prints, the step replay and saved trajectories show
the same generate call, the sampler flags reach `DiffusionLM.generate`, lossless mode, and the errors."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from conftest import adapted_with_saved_base

from llm2diff.cli import main
from llm2diff.modeling.diffusion_lm import DiffusionLM
from llm2diff.modeling.loading import load
from llm2diff.sampling.trajectory_render import render_terminal, replay_terminal

PROMPT, OTHER = "tom has 5 apples", "how many pears does ana have"
NEW = 12  # three blocks of 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A LoRA-adapted tiny Qwen3 (block size 4) saved with its base, as training saves it."""
    root = tmp_path_factory.mktemp("generate")
    adapted_with_saved_base(root).save_pretrained(root / "dlm")
    return root / "dlm"


@pytest.fixture(scope="module")
def dlm(model_dir):
    return load(model_dir)


def prompt_ids(dlm, text: str) -> torch.Tensor:
    """The prompt as the model was trained on it: the chat template with the generation prompt."""
    rendered = dlm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
    return torch.tensor([dlm.tokenizer(rendered, add_special_tokens=False).input_ids])


def generate(model_dir, capsys, *flags, prompts=(PROMPT,)):
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", str(NEW)]
    for text in prompts:
        argv += ["--prompt", text]
    code = main(argv + list(flags))
    out, err = capsys.readouterr()
    return code, out, err


def answer(dlm, out, ids) -> str:
    new = out.sequences[0, ids.shape[1]: ids.shape[1] + int(out.num_new_tokens[0])]
    return dlm.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_stream_prints_exactly_what_the_plain_call_prints(model_dir, dlm, capsys):
    code, plain, _ = generate(model_dir, capsys)
    assert code == 0
    code, streamed, _ = generate(model_dir, capsys, "--stream")
    assert code == 0
    assert streamed == plain
    ids = prompt_ids(dlm, PROMPT)
    out = dlm.generate(ids, max_new_tokens=NEW, seed=0)
    text = answer(dlm, out, ids)
    assert text  # the check below means something
    assert plain.startswith(f"### prompt 0: {PROMPT}\n{text}\n\n[{int(out.num_new_tokens[0])} new tokens in 1 rows, "
                            f"{out.nfe} forward passes of the batch")


def test_stream_needs_one_prompt(model_dir, capsys):
    code, out, err = generate(model_dir, capsys, "--stream", prompts=(PROMPT, OTHER))
    assert code == 2
    assert out == ""
    assert "llm2diff generate: error: --stream prints one answer as it is decoded: give one --prompt (got 2)" in err


def test_show_steps_replays_the_trajectory_of_the_same_call(model_dir, dlm, capsys):
    code, shown, _ = generate(model_dir, capsys, "--show-steps", "--no-color")
    assert code == 0
    ids = prompt_ids(dlm, PROMPT)
    out = dlm.generate(ids, max_new_tokens=NEW, seed=0, record_trajectory=True)
    kept = out.sequences[0, ids.shape[1]: ids.shape[1] + int(out.num_new_tokens[0])].tolist()
    frames = io.StringIO()
    replay_terminal(out.trajectory, dlm.tokenizer, stream=frames, final_tokens=kept, color=False)
    annotated = render_terminal(out.trajectory, dlm.tokenizer, color=False, final_tokens=kept)
    assert re.search(r"\[\d+\]", annotated) and frames.getvalue().startswith("step ")
    assert (f"--- denoising, step by step:\n{frames.getvalue()}--- each token and the step that committed it:\n"
            f"{annotated}\n") in shown
    assert "\x1b[" not in shown


def test_save_trajectory_one_file_per_prompt(model_dir, dlm, capsys, tmp_path):
    code, out, _ = generate(model_dir, capsys, "--save-trajectory", str(tmp_path / "one.html"))
    assert code == 0
    assert (tmp_path / "one.html").read_text().count("Denoising trajectory, row 0") == 2  # title and heading
    assert f"[trajectory of prompt 0 saved to {tmp_path / 'one.html'}]" in out

    code, out, _ = generate(model_dir, capsys, "--save-trajectory", str(tmp_path / "two.html"), prompts=(PROMPT, OTHER))
    assert code == 0
    assert not (tmp_path / "two.html").exists()
    assert "Denoising trajectory, row 0" in (tmp_path / "two-0.html").read_text()
    assert "Denoising trajectory, row 1" in (tmp_path / "two-1.html").read_text()

    code, out, _ = generate(model_dir, capsys, "--save-trajectory", str(tmp_path / "all.json"), prompts=(PROMPT, OTHER))
    assert code == 0
    saved = json.loads((tmp_path / "all.json").read_text())
    assert saved["num_rows"] == 2 and saved["block_size"] == 4
    assert "[trajectory of every prompt saved to" in out


def test_save_trajectory_with_a_bad_suffix_fails_before_loading(tmp_path, capsys):
    code, out, err = generate(tmp_path / "no-model-here", capsys, "--save-trajectory", str(tmp_path / "steps.txt"))
    assert code == 2 and out == ""
    assert ("--save-trajectory " + str(tmp_path / "steps.txt") + ": cannot save a trajectory as '.txt'; use one of "
            ".html, .gif, .png, .json") in err
    assert not (tmp_path / "steps.txt").exists()


def test_sampler_flags_reach_generate(model_dir, capsys, monkeypatch):
    seen = []
    original = DiffusionLM.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionLM, "generate", spy)
    code, _, _ = generate(model_dir, capsys)
    assert code == 0
    defaults = seen.pop()
    for name in ("commit_rule", "entropy_bound", "sub_block_size", "max_steps_per_block", "remask_threshold",
                 "remask_budget", "threshold", "tokens_per_step", "temperature", "merge_lora", "mode"):
        assert name not in defaults, name  # left out: the model's saved setting
    assert defaults["decoding"] is None  # the saved decoding is the base
    code, out, _ = generate(model_dir, capsys, "--commit-rule", "entropy", "--entropy-bound", "0.5", "--sub-block-size",
                            "2", "--max-steps-per-block", "3", "--remask-threshold", "0.25", "--remask-budget", "1")
    assert code == 0
    given = seen.pop()
    code, merged_out, _ = generate(model_dir, capsys, "--commit-rule", "entropy", "--entropy-bound", "0.5",
                                   "--sub-block-size", "2", "--max-steps-per-block", "3", "--remask-threshold", "0.25",
                                   "--remask-budget", "1", "--merge-lora")
    assert code == 0 and seen.pop()["merge_lora"] is True
    assert merged_out == out  # the same answer with the LoRA folded in
    assert {name: given[name] for name in ("commit_rule", "entropy_bound", "sub_block_size", "max_steps_per_block",
                                           "remask_threshold", "remask_budget")} == {
        "commit_rule": "entropy", "entropy_bound": 0.5, "sub_block_size": 2, "max_steps_per_block": 3,
        "remask_threshold": 0.25, "remask_budget": 1}


def test_one_step_per_block_shows_in_the_forward_passes(model_dir, dlm, capsys):
    ids = prompt_ids(dlm, PROMPT)
    capped = dlm.generate(ids, max_new_tokens=NEW, seed=0, max_steps_per_block=1)
    free = dlm.generate(ids, max_new_tokens=NEW, seed=0)
    assert capped.steps == 3 and free.steps == NEW  # a step per block versus a token per step
    code, out, _ = generate(model_dir, capsys, "--max-steps-per-block", "1")
    assert code == 0
    assert f"{capped.nfe} forward passes of the batch" in out
    assert answer(dlm, capped, ids) in out
    assert capped.nfe < free.nfe


def test_every_commit_rule_is_a_choice(model_dir, capsys):
    for rule in ("threshold", "margin", "random"):
        code, _, err = generate(model_dir, capsys, "--commit-rule", rule)
        assert code == 0, err
    with pytest.raises(SystemExit) as exit_info:
        generate(model_dir, capsys, "--commit-rule", "loudest")
    assert exit_info.value.code == 2
    assert "invalid choice: 'loudest'" in capsys.readouterr().err


def test_lossless_prints_the_parent_greedy_answer(model_dir, dlm, capsys):
    lossless = pytest.importorskip("llm2diff.sampling.lossless")
    code, out, _ = generate(model_dir, capsys, "--lossless")
    assert code == 0
    ids = prompt_ids(dlm, PROMPT)
    with dlm.ar_parent() as parent:  # greedy, never the mask token or the spare embedding rows (as lossless)
        greedy = parent.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=dlm.tokenizer.pad_token_id,
                                 suppress_tokens=lossless.parent_suppressed_ids(dlm))
    text = dlm.tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert text
    expected = lossless.lossless_generate(dlm, ids, max_new_tokens=NEW)
    assert torch.equal(expected.sequences, greedy)
    assert out == (f"### prompt 0: {PROMPT}\n{text}\n\n[{int(expected.num_new_tokens[0])} new tokens in 1 rows, "
                   f"lossless: {expected.mean_accepted_length:.2f} draft tokens accepted per verification, "
                   f"{expected.nfe_draft} draft + {expected.nfe_verify} verify forward passes, block size 4]\n")
    code, merged, _ = generate(model_dir, capsys, "--lossless", "--merge-lora")
    assert code == 0 and merged == out  # drafting with the LoRA folded in: the same parent output
    code, tail, _ = generate(model_dir, capsys, "--lossless", "--parent-tail", "2")
    expected = lossless.lossless_generate(dlm, ids, max_new_tokens=NEW, parent_tail=2)
    assert torch.equal(expected.sequences, greedy) and expected.parent_steps > 0
    assert code == 0 and tail == (
        f"### prompt 0: {PROMPT}\n{text}\n\n[{int(expected.num_new_tokens[0])} new tokens in 1 rows, lossless: "
        f"{expected.mean_accepted_length:.2f} draft tokens accepted per verification, {expected.nfe_draft} draft + "
        f"{expected.nfe_verify} verify forward passes ({expected.parent_steps} of them the parent alone), block size 4]\n")


def test_lossless_refuses_diffusion_flags(model_dir, capsys):
    code, _, err = generate(model_dir, capsys, "--lossless", "--temperature", "0.7", "--max-steps-per-block", "1")
    assert code == 2
    assert ("--lossless returns the AR parent's greedy output, so --max-steps-per-block, --temperature do not "
            "apply: leave them out") in err
    code, _, err = generate(model_dir, capsys, "--lossless", "--stream")
    assert code == 2 and "it cannot --stream, --show-steps or --save-trajectory" in err
    code, _, err = generate(model_dir, capsys, "--parent-tail", "2")
    assert code == 2 and "parent_tail does not apply to block decoding (only to lossless)" in err
    code, _, err = generate(model_dir, capsys, "--lossless", "--parent-tail", "4")
    assert code == 2 and "parent_tail must be in [0, block size) = [0, 4), got 4" in err


def test_no_saved_defaults_ignores_the_sampler_saved_with_the_model(model_dir, dlm, capsys, tmp_path):
    ids = prompt_ids(dlm, PROMPT)
    capped = dlm.generate(ids, max_new_tokens=NEW, seed=0, max_steps_per_block=1)
    free = dlm.generate(ids, max_new_tokens=NEW, seed=0)
    saved = load(model_dir)
    saved.decoding = saved.decoding.replace(max_steps_per_block=1)  # as a recipe's sampler_max_steps_per_block
    saved.save_pretrained(tmp_path / "capped")
    code, out, _ = generate(tmp_path / "capped", capsys)
    assert code == 0 and f"{capped.nfe} forward passes of the batch" in out
    code, out, _ = generate(tmp_path / "capped", capsys, "--no-saved-defaults")
    assert code == 0 and f"{free.nfe} forward passes of the batch" in out and answer(dlm, free, ids) in out
    assert capped.nfe < free.nfe
    code, _, err = generate(tmp_path / "capped", capsys, "--no-saved-defaults", "--lossless")
    assert code == 2 and "--no-saved-defaults does not apply" in err


def test_the_summary_line_counts_corrections(model_dir, dlm, capsys):
    code, out, _ = generate(model_dir, capsys, "--reopen-threshold", "0.01", "--reopen-budget", "1",
                            "--edit-threshold", "0.01", "--remask-budget", "1", "--max-new-tokens", "12")
    assert code == 0
    ids = prompt_ids(dlm, PROMPT)
    reference = dlm.generate(ids, max_new_tokens=12, reopen_threshold=0.01, reopen_budget=1, edit_threshold=0.01,
                             remask_budget=1)
    expected = [f"{reference.stats[k]} {w}" for k, w in (("edited", "edited"),
                                                        ("reopened", "replaced in reopened blocks"))
                if reference.stats[k]]
    assert expected and f"; corrections: {', '.join(expected)}]" in out
    code, plain, _ = generate(model_dir, capsys, "--max-new-tokens", "12")
    assert "corrections" not in plain
