"""lm-eval integration (`llm2diff.lm_eval`): the harness end to end on a tiny saved model and tiny local data, in
process (`simple_evaluate`) and through `python -m llm2diff.lm_eval`; stop strings and token budgets; scores equal
`llm2diff.evaluation.likelihood`; model-argument parsing; the shipped offline task YAMLs still match the stock ones."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import make_model, make_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from llm2diff import adapt  # noqa: E402
from llm2diff.evaluation.likelihood import loglikelihood  # noqa: E402
from llm2diff.lm_eval import LLM2DiffLM  # noqa: E402
from llm2diff.sampling.stops import cut_text_at_stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "lm_eval_tasks"
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
GSM8K_FALLBACK = [  # used only where the shared GSM8K file is absent
    {"question": "Tom has 3 apples. He buys 4 more. How many apples does Tom have now?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "Ana has 9 books. She gives 2 to Max. How many books does Ana have?",
     "answer": "Ana has 9 - 2 = <<9-2=7>>7 books.\n#### 7"},
    {"question": "Sam finds 2 cards and then 5 more. How many cards does Sam have?",
     "answer": "Sam has 2 + 5 = <<2+5=7>>7 cards.\n#### 7"},
]
ARC_ROWS = [  # AI2's ARC-Challenge layout
    {"id": "tiny-1", "question": "how many apples has tom ?",
     "choices": {"text": ["3", "4", "5", "6"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "tiny-2", "question": "who has the books ?",
     "choices": {"text": ["tom", "ana", "max"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "tiny-3", "question": "what is 2 + 2 ?",
     "choices": {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
]
GEN = "Question: tom has 3 apples . he buys 4 more . how many apples has tom now ?\nAnswer:"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lmevalmodel")
    make_model("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    dlm = adapt(AutoModelForCausalLM.from_pretrained(root / "base"), AutoTokenizer.from_pretrained(root / "base"),
                block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"),
                base_model_name_or_path=str(root / "base"))
    dlm.save_pretrained(root / "dlm")
    return root / "dlm"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Tiny local data, and task YAMLs that include the shipped ones and point them at it (as README.md shows)."""
    root = tmp_path_factory.mktemp("lmevaltasks")
    if GSM8K_TRAIN.is_file():
        with GSM8K_TRAIN.open() as f:
            gsm8k = [json.loads(next(f)) for _ in range(3)]
    else:
        gsm8k = GSM8K_FALLBACK
    train, test = _write_jsonl(root / "gsm8k_train.jsonl", gsm8k), _write_jsonl(root / "gsm8k_test.jsonl", gsm8k)
    arc = _write_jsonl(root / "arc.jsonl", ARC_ROWS)
    (root / "gsm8k_local.yaml").write_text(
        f"include: {TASKS / 'gsm8k_local.yaml'}\n"
        f"dataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n")
    (root / "arc_challenge_local.yaml").write_text(
        f"include: {TASKS / 'arc_challenge_local.yaml'}\n"
        f"dataset_kwargs:\n  data_files:\n    train: {arc}\n    validation: {arc}\n    test: {arc}\n")
    return root


@pytest.fixture(scope="module")
def lm(model_dir):
    return LLM2DiffLM(pretrained=str(model_dir), batch_size=2, max_new_tokens=8, elbo_samples=4, seed=0)


@pytest.fixture(scope="module")
def parent_lm(lm):
    return LLM2DiffLM(pretrained=lm.dlm, ar_parent=True, batch_size=2, max_new_tokens=8)


@pytest.fixture
def restore_global_state(tmp_path):
    """lm-eval reseeds the global RNGs; datasets caches into the user's cache: keep both as they were."""
    import datasets

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def _gen(context: str, **gen_kwargs) -> Instance:
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


def _ll(context: str, continuation: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def _check_results(results: dict, limit: int) -> None:
    gsm8k, arc = results["results"]["gsm8k_local"], results["results"]["arc_challenge_local"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= gsm8k[key] <= 1.0
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= arc[key] <= 1.0
    assert results["n-samples"]["gsm8k_local"]["effective"] == limit
    assert results["n-samples"]["arc_challenge_local"]["effective"] == limit


# -- end to end ------------------------------------------------------------------------------------------------
def test_simple_evaluate_runs_a_generation_and_a_multiple_choice_task(lm, task_dir, restore_global_state):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=lm, tasks=["gsm8k_local", "arc_challenge_local"], num_fewshot=0, limit=2, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    _check_results(results, limit=2)
    samples = results["samples"]
    assert len({s["doc_id"] for s in samples["gsm8k_local"]}) == 2
    for sample in samples["gsm8k_local"]:
        (text,) = sample["resps"][0]
        assert isinstance(text, str) and "Question:" not in text
    arc = sorted(samples["arc_challenge_local"], key=lambda s: s["doc_id"])
    assert [len(s["resps"]) for s in arc] == [len(row["choices"]["text"]) for row in ARC_ROWS[:2]]
    assert all(resp[0][1] is False for s in arc for resp in s["resps"])  # ELBO: no greedy flag
    info = results["config"]["llm2diff"]
    assert info["evaluated"] == "diffusion" and info["block_size"] == 4 and info["generated_tokens"] > 0


def test_main_runs_lm_eval_cli_with_the_model_registered(model_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "llm2diff.lm_eval", "--model", "llm2diff",
            "--model_args", f"pretrained={model_dir},ar_parent=false,batch_size=2,tokens_per_step=1,threshold=None,"
                            "elbo_samples=4,seed=0,max_new_tokens=8",
            "--include_path", str(task_dir), "--tasks", "gsm8k_local,arc_challenge_local", "--limit", "2",
            "--num_fewshot", "0", "--apply_chat_template", "--gen_kwargs", "max_gen_toks=6",
            "--output_path", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "gsm8k_local" in proc.stdout and "arc_challenge_local" in proc.stdout
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())
    _check_results(results, limit=2)
    assert results["config"]["llm2diff"]["max_new_tokens"] == 8
    assert results["config"]["llm2diff"]["generated_tokens"] <= 2 * 6  # --gen_kwargs max_gen_toks=6 honoured
    assert results["configs"]["gsm8k_local"]["dataset_path"] == "json"
    assert results["chat_template"] == make_tokenizer().chat_template and results["fewshot_as_multiturn"] is True


# -- generate_until --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["diffusion", "parent"])
def test_generate_until_cuts_at_stop_strings_and_honours_max_gen_toks(lm, parent_lm, which, monkeypatch, request):
    model = lm if which == "diffusion" else parent_lm
    # end-of-sequence on a token the tiny model never picks, so that its output is long enough to cut
    monkeypatch.setattr(model.dlm.model.generation_config, "eos_token_id", None)
    # set and restored by hand: a tokenizer's special tokens are not instance attributes, and pytest>=9.2's
    # monkeypatch would delete (not restore) an attribute it did not find in the instance's __dict__
    tokenizer, eos = model.dlm.tokenizer, model.dlm.tokenizer.eos_token
    tokenizer.eos_token = "<|im_start|>"
    request.addfinalizer(lambda: setattr(tokenizer, "eos_token", eos))
    (free,) = model.generate_until([_gen(GEN, until=[], max_gen_toks=8)])
    words = free.split()
    stop = next((w for w in words[1:] if free.find(w) > 0), None)
    assert stop is not None, f"the tiny model's output {free!r} has no word to stop at"
    before = model.stats["generated_tokens"]
    (cut,) = model.generate_until([_gen(GEN, until=[stop, "never-produced"], max_gen_toks=8)])
    assert cut == free[: free.find(stop)] and stop not in cut
    spent = model.stats["generated_tokens"] - before  # the sampler itself stopped early, not just the text cut
    assert spent < 8 and (which == "parent" or spent <= lm.dlm.config.block_size)
    before = model.stats["generated_tokens"]
    short = model.generate_until([_gen(GEN, until=[], max_gen_toks=3)])[0]
    assert model.stats["generated_tokens"] - before <= 3 and free.startswith(short.strip())
    # batching: left-padded prompts of different lengths with the same settings share a batch; mixed settings
    # are grouped; everything comes back in request order and as when generated alone
    other = "Question: who has the books ?\nAnswer:"
    (alone,) = model.generate_until([_gen(other, until=[], max_gen_toks=8)])
    batch = model.generate_until([_gen(GEN, until=[stop]), _gen(other, until=[], max_gen_toks=8),
                                  _gen(GEN, until=[], max_gen_toks=8), _gen(GEN, until=[], max_gen_toks=3)])
    assert batch == [cut, alone, free, short]


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_text_at_stop("a b\n\nQuestion: c", ["Question:", "\n\n"]) == "a b"
    assert cut_text_at_stop("no stop here", ["Question:"]) == "no stop here"
    assert cut_text_at_stop("x", []) == "x"


# -- loglikelihood -----------------------------------------------------------------------------------------------
def test_loglikelihood_is_the_likelihood_module_score(lm, parent_lm):
    pairs = [("Question: how many apples has tom ?\nAnswer:", " 4"),
             ("Question: who has the books ?\nAnswer: ", "ana has the books")]  # trailing space moves over
    scores = lm.loglikelihood([_ll(c, x) for c, x in pairs])
    for (context, continuation), (score, greedy) in zip(pairs, scores):
        expected = loglikelihood(lm.dlm, context.rstrip(), context[len(context.rstrip()):] + continuation,
                                 num_samples=4, seed=0, batch_size=2)
        assert score == pytest.approx(expected, rel=1e-6) and greedy is False
    parent = parent_lm.loglikelihood([_ll(c, x) for c, x in pairs])
    for (context, continuation), (score, _) in zip(pairs, parent):
        expected = loglikelihood(lm.dlm, context.rstrip(), context[len(context.rstrip()):] + continuation,
                                 use_parent=True)
        assert score == pytest.approx(expected, rel=1e-6)
    # the parent's greedy flag is exact: its own greedy continuation (mask token suppressed) is greedy, others not
    context = lm.tok_encode(pairs[0][0])
    greedy = lm.dlm.ar_generate(torch.tensor([context]), max_new_tokens=3)[0, len(context):].tolist()
    other = greedy[:2] + [next(i for i in range(5, 40) if i != greedy[2])]
    flags = [g for _, g in parent_lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])]
    assert flags == [True, False]


def test_empty_context_and_rolling_score_from_the_prefix_token(lm, parent_lm):
    text = "tom has 3 apples . ana has 4 books ."
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    prefix = [lm.prefix_token_id]
    for model, kwargs in ((lm, dict(num_samples=4, seed=0, batch_size=2)), (parent_lm, dict(use_parent=True))):
        expected = loglikelihood(lm.dlm, prefix, ids, **kwargs)
        (rolling,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        assert rolling == pytest.approx(expected, rel=1e-6)
        ((empty, _),) = model.loglikelihood([_ll("", text)])
        assert empty == pytest.approx(expected, rel=1e-6)
    # texts longer than max_length are scored window by window
    short = LLM2DiffLM(pretrained=lm.dlm, ar_parent=True, max_length=5)
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert np.isfinite(windowed) and windowed < 0


# -- construction, chat templates, task files ------------------------------------------------------------------
def test_model_args_are_parsed_and_checked(model_dir):
    model = LLM2DiffLM.create_from_arg_string(
        f"pretrained={model_dir},ar_parent=false,batch_size=8,tokens_per_step=2,threshold=None,elbo_samples=32,"
        "seed=0,max_new_tokens=256", {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert (model.ar_parent, model.batch_size, model.decoding, model.elbo_samples, model.seed,
            model.max_new_tokens) == (False, 8, {"tokens_per_step": 2}, 32, 0, 256)
    model = LLM2DiffLM.create_from_arg_obj({"pretrained": str(model_dir), "ar_parent": "true", "threshold": "0.9"},
                                           {"batch_size": "4"})
    assert model.ar_parent is True and model.decoding == {"threshold": 0.9} and model.batch_size == 4
    model = LLM2DiffLM.create_from_arg_string(f"pretrained={model_dir},decoding.mode=verified,"
                                              "decoding.threshold=0.7,decoding.stop_strings=[x]")
    assert model.decoding == {"mode": "verified", "threshold": 0.7, "stop_strings": ["x"]}
    with pytest.raises(ValueError, match="'tresh' is not a decoding setting .*did you mean 'threshold'"):
        LLM2DiffLM(pretrained=str(model_dir), **{"decoding.tresh": "0.5"})
    with pytest.raises(ValueError, match="'elbo_sample' \\(did you mean 'elbo_samples'\\?\\)"):
        LLM2DiffLM(pretrained=str(model_dir), elbo_sample=8)
    with pytest.raises(ValueError, match="ar_parent='maybe': expected true or false"):
        LLM2DiffLM(pretrained=str(model_dir), ar_parent="maybe")
    with pytest.raises(ValueError, match="pretrained is required"):
        LLM2DiffLM()
    no_adapter = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)  # untrained: the weights are the parent
    assert LLM2DiffLM(pretrained=no_adapter, ar_parent=True).ar_parent is True


def test_chat_template_hooks(lm):
    history = [{"role": "user", "content": "how many apples ?"}]
    assert lm.apply_chat_template(history) == "<|im_start|>user\nhow many apples ?<|im_end|>\n<|im_start|>assistant\n"
    assert lm.chat_template(True) == lm.tokenizer.chat_template
    assert isinstance(lm.tokenizer_name, str) and "/" not in lm.tokenizer_name
    saved = lm.dlm.config.system_prompt
    try:
        lm.dlm.config.system_prompt = "be brief"
        assert lm.apply_chat_template(history).startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    finally:
        lm.dlm.config.system_prompt = saved


@pytest.mark.parametrize("local,stock", [("gsm8k_local.yaml", "gsm8k/gsm8k.yaml"),
                                         ("arc_challenge_local.yaml", "arc/arc_challenge.yaml")])
def test_shipped_task_yamls_are_the_stock_tasks_on_local_files(local, stock):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(TASKS / local, resolve_func=False)
    theirs = load_yaml(Path(lm_eval.tasks.__file__).parent / stock, resolve_func=False)
    assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
    assert set(ours["dataset_kwargs"]["data_files"]) >= {"train", "test"}
    assert ours["task"] == theirs["task"] + "_local"
    dataset_keys = {"task", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in dataset_keys} == \
        {k: v for k, v in theirs.items() if k not in dataset_keys}
    assert ours["task"] in TaskManager(include_path=str(TASKS), include_defaults=False).all_tasks


def test_importing_llm2diff_does_not_import_lm_eval():
    code = ("import sys, llm2diff; from llm2diff.modeling import diffusion_lm, loading; "
            "from llm2diff.evaluation import likelihood, runner; assert 'lm_eval' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
