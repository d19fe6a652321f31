"""Process reward models: metrics, collation, the planted-signal training run, save/load, tokenizer checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff.prm import (
    PRMCollator,
    auroc,
    build_prm,
    check_tokenizer_match,
    evaluate_prm,
    load_prm,
    step_label_accuracy,
    tokenizer_fingerprint,
    train_prm,
)
from llm2diff.prm.model import step_loss


# -- metrics ----------------------------------------------------------------------------------------------------
def test_auroc_exact_values_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # one positive/negative pair tied at 0.5 counts one half: (0.5 + 1 + 1 + 1) / 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert auroc([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1]) == 0.5
    assert auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert auroc([0.2, 0.7, 0.7, 0.7, 0.9], [0, 1, 0, 1, 1]) == pytest.approx(5 / 6)


def test_auroc_errors():
    with pytest.raises(ValueError, match="needs both classes, got 3 positive and 0 negative"):
        auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="needs hard 0/1 labels, got \\[0.5\\]"):
        auroc([0.1, 0.2], [0.5, 1])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        auroc([0.1, 0.2], [0, 1, 1])


def test_step_label_accuracy_binarises_labels_at_half():
    scores, labels = [0.9, 0.2, 0.6, 0.5, 0.49], [1, 0, 0, 0.5, 0.7]
    assert step_label_accuracy(scores, labels) == 0.6  # predictions 1 0 1 1 0 vs truth 1 0 0 1 1
    assert step_label_accuracy(scores, labels, threshold=0.55) == 0.4  # predictions 1 0 1 0 0


class _FixedScores:
    """Stands in for a PRM: returns preset step scores."""

    def __init__(self, scores):
        self.scores = scores

    def step_scores(self, prompts, responses, step_ends, batch_size=16):
        return self.scores


def test_evaluate_prm_flattens_steps():
    rows = [{"prompt_ids": [1], "response_ids": [4, 5, 6], "step_ends": [0, 2], "step_labels": [1.0, 0.25]},
            {"prompt_ids": [1, 2], "response_ids": [4, 5], "step_ends": [1], "step_labels": [0.75]}]
    result = evaluate_prm(_FixedScores([[0.8, 0.6], [0.7]]), rows)
    # labels -> 1 0 1; predictions 1 1 1; the negative (0.6) ranks below both positives
    assert result == {"accuracy": pytest.approx(2 / 3), "auroc": 1.0, "num_steps": 3,
                      "positive_rate": pytest.approx(2 / 3)}
    one_class = evaluate_prm(_FixedScores([[0.8, 0.6], [0.7]]), [{**rows[0], "step_labels": [1, 1]}, rows[1]])
    assert one_class["auroc"] is None and one_class["positive_rate"] == 1.0


# -- collation and loss -----------------------------------------------------------------------------------------
def test_collator_exact_tensors():
    rows = [{"prompt_ids": [5, 6], "response_ids": [7, 8, 9], "step_ends": [0, 2], "step_labels": [1.0, 0.25]},
            {"prompt_ids": [5], "response_ids": [7, 8], "step_ends": [1], "step_labels": [0]}]
    batch = PRMCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[-100, -100, 1.0, -100, 0.25], [-100, -100, 0.0, -100, -100]]


GOOD = {"prompt_ids": [5], "response_ids": [7, 8, 9], "step_ends": [0, 2], "step_labels": [1, 0]}


@pytest.mark.parametrize("change, message", [
    ({"step_ends": [0, 3]}, "row 1: step end 3 is outside the response \\(length 3\\)"),
    ({"step_ends": [-1, 2]}, "row 1: step end -1 is outside the response"),
    ({"step_ends": [2, 2]}, "row 1: step_ends must be strictly increasing, got \\[2, 2\\]"),
    ({"step_ends": [2, 1]}, "row 1: step_ends must be strictly increasing, got \\[2, 1\\]"),
    ({"step_labels": [1]}, "row 1 has 2 step_ends but 1 step_labels"),
    ({"step_labels": [1, 1.5]}, "row 1: step label 1.5 is outside \\[0, 1\\]"),
    ({"step_labels": [-0.1, 1]}, "row 1: step label -0.1 is outside \\[0, 1\\]"),
    ({"step_ends": [], "step_labels": []}, "row 1 has no steps"),
    ({"step_labels": None}, "row 1 lacks \\['step_labels'\\]"),
    ({"id": "q7", "step_ends": [0, 5]}, "row 1 \\(id 'q7'\\): step end 5 is outside"),
])
def test_collator_validation_errors(change, message):
    bad = {**GOOD, **change}
    if change.get("step_labels", 0) is None:
        del bad["step_labels"]
    with pytest.raises(ValueError, match=message):
        PRMCollator(pad_token_id=0)([GOOD, bad])


def test_collator_hard_labels_must_be_binary():
    PRMCollator(pad_token_id=0, label_type="hard")([GOOD])
    with pytest.raises(ValueError, match="row 0: label_type='hard' needs step labels 0 or 1, got 0.5"):
        PRMCollator(pad_token_id=0, label_type="hard")([{**GOOD, "step_labels": [1, 0.5]}])


def test_step_loss_is_bce_on_labelled_positions_only():
    logits = torch.tensor([[[0.0], [2.0], [-1.0]]])
    labels = torch.tensor([[-100.0, 1.0, 0.25]])
    expected = ((math.log1p(math.exp(2.0)) - 2.0) + (math.log1p(math.exp(-1.0)) + 0.25)) / 2
    assert step_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="no labelled step ends"):
        step_loss(logits, torch.full((1, 3), -100.0))


# -- model ------------------------------------------------------------------------------------------------------
def _save_tiny(root, arch):
    path = root / f"tiny-{arch}"
    make_model(arch, layers=2).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return _save_tiny(tmp_path_factory.mktemp("prm"), "qwen2")


def _ids(tok, text: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(text.split())
    assert tok.unk_token_id not in ids, text
    return ids


# Planted signal: a step "a + b = c" is good (label 1) with the true sum and bad (label 0) with a corrupted result.
# Training and held-out pairs use different prompts (names, objects) and different operand orders.
TRAIN_EQUATIONS = [("3 + 4", "7", "9"), ("2 + 3", "5", "8"), ("1 + 5", "6", "1")]
HELD_OUT_EQUATIONS = [("4 + 3", "7", "9"), ("3 + 2", "5", "8"), ("5 + 1", "6", "1")]
TRAIN_PROMPTS = ["tom has apples . he buys more . how many ?", "ana has pears . she finds more . how many ?",
                 "max has cards . he gives more . how many ?"]
HELD_OUT_PROMPTS = ["lea has cookies . she buys more . how many ?", "sam has books . he finds more . how many ?"]
PRE_STEP = "1 + 1 = 2"  # a correct first step some responses start with, so the tested step is not always first


def _planted_rows(tok, prompts, equations):
    """Pairs of rows identical up to the tested step's result token: (good row, bad row)."""
    pairs = []
    for prompt in prompts:
        for lhs, right, wrong in equations:
            for with_pre_step in (False, True):
                rows = []
                for result, label in ((right, 1.0), (wrong, 0.0)):
                    steps = ([_ids(tok, PRE_STEP)] if with_pre_step else []) + [_ids(tok, f"{lhs} = {result}")]
                    ends = [sum(len(s) for s in steps[: k + 1]) - 1 for k in range(len(steps))]
                    rows.append({"prompt_ids": _ids(tok, prompt), "response_ids": [t for s in steps for t in s],
                                 "step_ends": ends, "step_labels": [1.0] * (len(steps) - 1) + [label]})
                pairs.append(tuple(rows))
    return pairs


def _training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    fields = dict(output_dir=str(output_dir), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0, data_seed=0)
    fields.update(overrides)
    return TrainingArguments(**fields)


@pytest.fixture(scope="module")
def trained(qwen2_dir, tmp_path_factory):
    """A PRM trained on the planted rows, its training summary and the held-out pairs."""
    from datasets import Dataset
    from transformers import set_seed

    torch.set_num_threads(1)
    set_seed(0)
    prm = build_prm(str(qwen2_dir), make_tokenizer(), lora_r=8, lora_alpha=16, label_type="hard")
    train = [row for pair in _planted_rows(prm.tokenizer, TRAIN_PROMPTS, TRAIN_EQUATIONS) for row in pair]
    held_out = _planted_rows(prm.tokenizer, HELD_OUT_PROMPTS, HELD_OUT_EQUATIONS)
    eval_rows = [row for pair in held_out for row in pair]
    out = tmp_path_factory.mktemp("prm-run") / "prm"
    summary = train_prm(prm, Dataset.from_list(train), _training_args(out), eval_rows=eval_rows)
    return prm, summary, held_out, out


def _scores(prm, rows):
    return prm.step_scores([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows],
                           [r["step_ends"] for r in rows])


def test_planted_signal_is_learned(trained):
    prm, summary, held_out, out = trained
    losses = summary["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.25 * (sum(losses[:5]) / 5), losses
    good, bad = [p[0] for p in held_out], [p[1] for p in held_out]
    good_scores = [s[-1] for s in _scores(prm, good)]
    bad_scores = [s[-1] for s in _scores(prm, bad)]
    for pair, g, b in zip(held_out, good_scores, bad_scores):
        assert g > b, (pair, g, b)
    assert auroc(good_scores + bad_scores, [1] * len(good) + [0] * len(bad)) == 1.0
    evaluation = summary["eval"]
    assert evaluation["num_steps"] == 36  # 12 pairs x (1 or 2 steps) x 2 rows
    assert evaluation["positive_rate"] == pytest.approx(24 / 36)
    assert evaluation["auroc"] == 1.0 and evaluation["accuracy"] == 1.0
    prm.model.train()
    _scores(prm, good[:1])
    assert prm.model.training  # step_scores switches to eval mode only while it scores
    prm.model.eval()
    config = json.loads((out / "prm_config.json").read_text())
    assert config["training"]["num_train_rows"] == 36 and config["training"]["global_step"] == 40


def test_save_load_reproduces_scores_from_safetensors(trained, monkeypatch):
    prm, _, held_out, out = trained
    rows = [row for pair in held_out for row in pair]
    before = _scores(prm, rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*"))
    config = json.loads((out / "prm_config.json").read_text())
    assert config["label_type"] == "hard"
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(make_tokenizer())
    assert config["architecture"] == "Qwen2ForTokenClassification" and "transformers" in config["versions"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called: weights must come from safetensors")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_prm(out)
    assert loaded.config.label_type == "hard" and loaded.model.training is False
    after = _scores(loaded, rows)
    for b, a in zip(before, after):
        assert a == pytest.approx(b, abs=1e-6)
    # the head really comes from the adapter: a freshly built PRM scores differently
    fresh = build_prm(config["base_model_name_or_path"], make_tokenizer())
    fresh_scores = _scores(fresh, rows)
    assert max(abs(x - y) for f, a in zip(fresh_scores, after) for x, y in zip(f, a)) > 1e-2


def test_check_tokenizer_match(trained):
    prm = trained[0]
    check_tokenizer_match(prm, make_tokenizer())
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    size = len(make_tokenizer())
    with pytest.raises(ValueError, match=f"different tokenizer .*vocab size {size} for the PRM vs {size + 1} for the "
                                         "policy.*train a PRM on the policy's base model"):
        check_tokenizer_match(prm, other)


def test_build_from_in_memory_model(qwen2_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="has no name_or_path.*save it with save_pretrained"):
        build_prm(make_model("qwen2"), make_tokenizer())
    causal = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    prm = build_prm(causal, make_tokenizer())
    assert prm.config.base_model_name_or_path == str(qwen2_dir)
    backbone = prm.model.get_base_model().model
    assert torch.equal(backbone.embed_tokens.weight, causal.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_architectures_build_and_score(arch, tmp_path):
    path = _save_tiny(tmp_path, arch)
    prm = build_prm(str(path), make_tokenizer(), lora_r=4)
    base = prm.model.get_base_model()
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[arch]
    assert type(base).__name__ == f"{family}ForTokenClassification"
    trainable = {n for n, p in prm.model.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("lora" in n for n in trainable if ".score." in n)  # the head is trained whole, not LoRA'd
    assert base.config.pad_token_id == make_tokenizer().pad_token_id
    prompts, responses, ends = [[5, 6, 7], [8]], [[9, 10, 11, 12], [13, 14]], [[1, 3], [0]]
    batched = prm.step_scores(prompts, responses, ends)
    assert [len(s) for s in batched] == [2, 1] and all(0.0 < x < 1.0 for s in batched for x in s)
    alone = [prm.step_scores([p], [r], [e])[0] for p, r, e in zip(prompts, responses, ends)]
    for b, a in zip(batched, alone):  # right padding does not change the scores
        assert b == pytest.approx(a, abs=1e-5)
    with pytest.raises(ValueError, match="solution 1: step end 2 is outside the response \\(length 2\\)"):
        prm.step_scores(prompts, responses, [[1, 3], [2]])


def test_save_replaces_its_own_files_and_keeps_everything_else(trained, tmp_path):
    prm = trained[0]
    target = tmp_path / "prm"
    (target / "checkpoint-3").mkdir(parents=True)
    (target / "checkpoint-3" / "marker").write_text("kept")
    (target / "notes.txt").write_text("mine")
    prm.save_pretrained(target)
    prm.save_pretrained(target)  # again, over its own files
    assert (target / "checkpoint-3" / "marker").read_text() == "kept"
    assert (target / "notes.txt").read_text() == "mine" and (target / "prm_config.json").is_file()
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == [".llm2diff-save.json"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
